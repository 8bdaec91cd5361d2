"""Resolving what a user names as a model: a builtin name, a diffusers transformer folder, or an instance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import InputError, UnsupportedArchitectureError
from .architectures import ADAPTERS, BUILTINS, Adapter, Resolution, adapter_for


def load_folder(path: str | Path) -> nn.Module:
    """Load a diffusers transformer folder (``config.json`` + ``*.safetensors``) without pickle.

    Every failure (no folder, no/corrupt config, unknown ``_class_name``, missing, truncated or
    mismatching safetensors) is an :class:`InputError` naming the file.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise InputError(f"{folder}: no config.json (expected a diffusers transformer folder)")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{cfg_path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or "_class_name" not in config:
        raise InputError(f"{cfg_path}: no '_class_name' entry; not a diffusers model config")
    try:
        adapter = adapter_for(config["_class_name"])
    except UnsupportedArchitectureError as exc:
        raise UnsupportedArchitectureError(f"{cfg_path}: {exc}") from None
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise InputError(f"{folder}: no *.safetensors weights (pickled .bin weights are not loaded)")
    state = {}
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for w in weights:
        try:
            state.update(load_file(str(w)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise InputError(f"{w}: corrupt or truncated safetensors file ({exc})") from None
    cls = adapter.model_class()
    init_keys = set(cls.extract_init_dict(config)[0]) if hasattr(cls, "extract_init_dict") else set(config)
    try:
        model = cls.from_config({k: v for k, v in config.items() if not k.startswith("_") or k in init_keys})
    except Exception as exc:  # diffusers raises many kinds for a bad config
        raise InputError(f"{cfg_path}: cannot build {config['_class_name']} from this config ({exc})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise InputError(f"{folder}: weights do not match config.json: {', '.join(parts)}")
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        k = bad[0]
        raise InputError(f"{folder}: weight {k} has shape {tuple(state[k].shape)}, config expects "
                         f"{tuple(expected[k].shape)}")
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) == 1 and next(iter(dtypes)) != next(model.parameters()).dtype:
        model = model.to(dtypes.pop())  # keep the checkpoint's precision (bf16 checkpoints stay bf16)
    model.load_state_dict(state, strict=True)
    return model.eval()


#: trained reference models shipped in ``models/`` and the resolution they are sampled at
REFERENCE_RESOLUTIONS = {"flux-fmnist": Resolution(height=32, width=32, text_len=4, batch=2)}


def builtin_names() -> list[str]:
    return sorted(BUILTINS) + sorted(REFERENCE_RESOLUTIONS)


def default_resolution(model: Any, adapter: Adapter) -> Resolution:
    """The resolution a model is exported at when none is given: a reference model's own, else the
    architecture's default."""
    return REFERENCE_RESOLUTIONS.get(str(model), adapter.default_resolution) if isinstance(model, (str, Path)) \
        else adapter.default_resolution


def resolve_model(model: Any, seed: int = 0) -> tuple[nn.Module, Adapter]:
    """A builtin name (``tiny-flux``, ``flux-fmnist``), a folder path, or an ``nn.Module`` -> (model, adapter).

    Tiny builtins are random-init for ``seed``; reference models (``flux-fmnist``) load their
    shipped trained transformer."""
    if isinstance(model, nn.Module):
        return model, adapter_for(model)
    if isinstance(model, (str, Path)):
        name = str(model)
        if name in BUILTINS:
            adapter = BUILTINS[name]
            return adapter.tiny(seed), adapter
        if name in REFERENCE_RESOLUTIONS:
            from .reference import load_reference

            m = load_reference(name).denoiser.transformer
            return m, adapter_for(m)
        if Path(name).exists():
            m = load_folder(name)
            return m, adapter_for(m)
        raise InputError(f"{name}: no such file or folder, and not a builtin model "
                         f"({', '.join(builtin_names())})")
    raise UnsupportedArchitectureError(
        f"cannot use a {type(model).__name__} as a model; give a diffusers transformer instance, a folder, "
        f"or one of {', '.join(sorted(BUILTINS))}")


__all__ = ["load_folder", "resolve_model", "ADAPTERS", "BUILTINS"]
