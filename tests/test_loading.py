"""Loading diffusers transformer folders (config.json + safetensors) and resolving model names."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adatsq.errors import InputError, UnsupportedArchitectureError
from adatsq.frontend.architectures import BUILTINS
from adatsq.frontend.export import export_model
from adatsq.frontend.layers import LayerTable
from adatsq.frontend.loading import load_folder, resolve_model

pytestmark = pytest.mark.usefixtures("seeded")

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every tiny builtin saved with save_pretrained(safe_serialization=True), once per module."""
    root = tmp_path_factory.mktemp("folders")
    folders = {}
    for name, adapter in BUILTINS.items():
        folders[name] = root / name
        adapter.tiny(0).save_pretrained(folders[name], safe_serialization=True)
    return folders


@pytest.fixture
def dit_copy(saved, tmp_path) -> Path:
    folder = tmp_path / "tiny-dit"
    shutil.copytree(saved["tiny-dit"], folder)
    return folder


# --------------------------------------------------------------------------- round trips
def test_load_folder_round_trips_weights(saved, artifacts, tiny_arch):
    folder = saved[tiny_arch]
    assert (folder / "config.json").is_file() and (folder / WEIGHTS).is_file()
    model = load_folder(folder)
    assert type(model).__name__ == artifacts.adapter(tiny_arch).arch
    assert not model.training
    ref, got = artifacts.model(tiny_arch).state_dict(), model.state_dict()
    assert list(got) == list(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_load_folder_keeps_checkpoint_dtype(tmp_path, artifacts):
    model = BUILTINS["tiny-dit"].tiny(0).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16", safe_serialization=True)
    loaded = load_folder(tmp_path / "bf16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    ref = model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize("name", ["tiny-dit", "tiny-flux"])
def test_export_from_folder_gives_same_table_and_numbers(saved, artifacts, name):
    graph = export_model(saved[name])
    assert graph.arch == artifacts.adapter(name).arch
    table = LayerTable.from_graph(graph)
    assert table.same_layers(artifacts.table(name)) == []
    assert table.names == artifacts.table(name).names
    inputs = artifacts.inputs(name)
    diff = (graph(*inputs.values()) - artifacts.graph(name)(*inputs.values())).abs().max().item()
    assert diff <= 1e-6


def test_resolve_model_accepts_builtin_path_and_instance(saved):
    model, adapter = resolve_model("tiny-sd3")
    assert adapter is BUILTINS["tiny-sd3"] and type(model).__name__ == "SD3Transformer2DModel"
    model2, adapter2 = resolve_model(saved["tiny-pixart"])  # a Path
    assert adapter2 is BUILTINS["tiny-pixart"]
    model3, adapter3 = resolve_model(str(saved["tiny-pixart"]))  # a str
    assert adapter3 is adapter2
    assert all(torch.equal(a, b) for a, b in zip(model2.state_dict().values(), model3.state_dict().values()))
    same, _ = resolve_model(model)
    assert same is model


def test_resolve_model_rejects_unknowns(tmp_path):
    with pytest.raises(InputError, match="no such file or folder") as info:
        resolve_model(tmp_path / "nothing-here")
    assert str(tmp_path / "nothing-here") in str(info.value)
    with pytest.raises(UnsupportedArchitectureError, match="dict"):
        resolve_model({"a": 1})


# --------------------------------------------------------------------------- bad folders
def _write_config(folder: Path, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        del cfg[k]
    (folder / "config.json").write_text(json.dumps(cfg))


def _truncate(path: Path, keep: float):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _rewrite_weights(folder: Path, edit):
    state = load_file(str(folder / WEIGHTS))
    edit(state)
    save_file(state, str(folder / WEIGHTS))


BAD_FOLDERS = {
    # case: (mutation, file named in the message (relative to the folder; "" = the folder), other words)
    "no-config": (lambda f: (f / "config.json").unlink(), "", ["no config.json"]),
    "config-not-json": (lambda f: (f / "config.json").write_text("{not json"), "config.json", ["not valid JSON"]),
    "config-not-utf8": (lambda f: (f / "config.json").write_bytes(b"\xff\xfe\x00{"), "config.json",
                        ["not valid JSON"]),
    "config-is-a-list": (lambda f: (f / "config.json").write_text("[1, 2]"), "config.json", ["_class_name"]),
    "config-no-class-name": (lambda f: _write_config(f, _class_name=None), "config.json", ["_class_name"]),
    "config-unbuildable": (lambda f: _write_config(f, num_layers="two"), "config.json",
                           ["cannot build DiTTransformer2DModel"]),
    "no-safetensors": (lambda f: (f / WEIGHTS).rename(f / "diffusion_pytorch_model.bin"), "",
                       ["no *.safetensors"]),
    "truncated-safetensors": (lambda f: _truncate(f / WEIGHTS, 0.5), WEIGHTS, ["corrupt or truncated"]),
    "truncated-header": (lambda f: _truncate(f / WEIGHTS, 0.0001), WEIGHTS, ["corrupt or truncated"]),
    "empty-safetensors": (lambda f: (f / WEIGHTS).write_bytes(b""), WEIGHTS, ["corrupt or truncated"]),
    "missing-weight": (lambda f: _rewrite_weights(f, lambda s: s.pop("proj_out_2.weight")), "",
                       ["1 missing", "proj_out_2.weight"]),
    "extra-weight": (lambda f: _rewrite_weights(f, lambda s: s.__setitem__("stray.weight", torch.zeros(2))), "",
                     ["1 unexpected", "stray.weight"]),
    "mis-shaped-weight": (lambda f: _rewrite_weights(
        f, lambda s: s.__setitem__("proj_out_2.weight", s["proj_out_2.weight"][:-1].clone())), "",
        ["proj_out_2.weight", "shape"]),
    "config-disagrees-with-weights": (lambda f: _write_config(f, num_layers=3), "",
                                      ["weights do not match config.json", "missing", "transformer_blocks.2"]),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_bad_folder_is_input_error_naming_the_file(dit_copy, case):
    mutate, file, words = BAD_FOLDERS[case]
    mutate(dit_copy)
    with pytest.raises(InputError) as info:
        load_folder(dit_copy)
    msg = str(info.value)
    named = dit_copy / file if file else dit_copy
    assert msg.startswith(str(named)), f"message does not start with {named}: {msg}"
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    # the same error reaches the user through export_model
    with pytest.raises(InputError, match=re.escape(str(named))):
        export_model(dit_copy)


def test_missing_folder_is_input_error(tmp_path):
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'gone'}: not a folder")):
        load_folder(tmp_path / "gone")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        load_folder(tmp_path / "file.txt")


def test_unknown_class_name_is_unsupported_architecture(dit_copy):
    _write_config(dit_copy, _class_name="UNet2DConditionModel")
    with pytest.raises(UnsupportedArchitectureError, match="UNet2DConditionModel") as info:
        load_folder(dit_copy)
    assert isinstance(info.value, InputError)
    assert "DiTTransformer2DModel" in str(info.value), "lists the supported classes"


def test_unknown_class_name_error_names_the_config_file(dit_copy):
    _write_config(dit_copy, _class_name="UNet2DConditionModel")
    with pytest.raises(UnsupportedArchitectureError) as info:
        load_folder(dit_copy)
    assert str(dit_copy / "config.json") in str(info.value)
