"""On-disk cache of analysis results, with resumable partial state.

One folder per (model fingerprint, calibration set): ``<root>/<fingerprint>-<calibration key>/``.
Each analysis writes one safetensors file per option key (``fisher-<opts>.safetensors``); its JSON
metadata (done units, scalars) lives in the safetensors header, so tensors and bookkeeping are
written by one atomic rename and can never disagree. While a pass runs it checkpoints its running
state to ``<name>.partial.safetensors``; a rerun after an interruption resumes from the units
recorded there, and the final file replaces the partial one when the pass completes.

Files are read with ``safetensors`` only (no pickle).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import InputError

CACHE_VERSION = 1


def default_cache_root() -> Path:
    base = os.environ.get("ADATSQ_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "adatsq")
    return Path(base) / "analysis"


def options_key(options: Mapping[str, Any]) -> str:
    text = json.dumps({"cache_version": CACHE_VERSION, **options}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class AnalysisCache:
    """``folder`` holds every result for one model and calibration set; ``None`` disables caching."""

    def __init__(self, folder: str | Path | None, checkpoint_every_s: float = 30.0):
        self.folder = None if folder is None else Path(folder)
        self.checkpoint_every_s = float(checkpoint_every_s)
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str, key: str, partial: bool = False) -> Path:
        assert self.folder is not None
        return self.folder / f"{name}-{key}{'.partial' if partial else ''}.safetensors"

    # ------------------------------------------------------------------ read
    def load(self, name: str, key: str, partial: bool = False) -> tuple[dict[str, torch.Tensor], dict] | None:
        if self.folder is None:
            return None
        path = self._path(name, key, partial)
        if not path.is_file():
            return None
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("adatsq", "{}"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as exc:
            if partial:  # a damaged checkpoint is dropped, the pass starts over
                path.unlink(missing_ok=True)
                return None
            raise InputError(f"{path}: corrupt analysis cache file ({exc}); delete it to recompute") from None
        if meta.get("cache_version") != CACHE_VERSION:
            return None
        return tensors, meta

    # ------------------------------------------------------------------ write
    def save(self, name: str, key: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
             partial: bool = False) -> None:
        if self.folder is None:
            return
        from safetensors.torch import save_file

        from ..tools.io import atomic_path

        meta = {"cache_version": CACHE_VERSION, **meta}
        with atomic_path(self._path(name, key, partial)) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                      metadata={"adatsq": json.dumps(meta, sort_keys=True)})
        if not partial:
            self._path(name, key, partial=True).unlink(missing_ok=True)


class Checkpointer:
    """Calls ``save()`` at most every ``every_s`` seconds (0: after every unit)."""

    def __init__(self, cache: AnalysisCache):
        self.cache = cache
        self.last = time.monotonic()

    def due(self) -> bool:
        if self.cache.folder is None:
            return False
        now = time.monotonic()
        if now - self.last >= self.cache.checkpoint_every_s:
            self.last = now
            return True
        return False
