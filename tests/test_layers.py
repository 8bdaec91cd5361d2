"""The quantizable-layer table built from torch.export: coverage, roles, blocks, calls, MACs, JSON."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import OrderedDict

import pytest
import torch

from adatsq.errors import InputError
from adatsq.frontend.layers import LayerRef, LayerTable, Role, block_of, classify_role
from adatsq.passes.annotations import get_annotation

pytestmark = pytest.mark.usefixtures("seeded")


# --------------------------------------------------------------------------- coverage
def test_table_covers_every_linear_exactly_once(artifacts, tiny_arch):
    table = artifacts.table(tiny_arch)
    model = artifacts.model(tiny_arch)
    table.check_covers(model)  # raises AssertionError on a mismatch
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) > 0
    assert {f"{n}.weight" for n in linears} <= set(table.names)
    assert len(table.names) == len(set(table.names))
    assert table.arch == artifacts.adapter(tiny_arch).arch and table.source == "torch.export"
    assert all(i.calls >= 1 for i in table)


def test_check_covers_detects_missing_and_extra_layers(artifacts):
    table = artifacts.table("tiny-dit")
    model = artifacts.model("tiny-dit")
    victim = "transformer_blocks.1.attn1.to_v.weight"
    missing = LayerTable(table.arch, table.source, OrderedDict((k, v) for k, v in table.layers.items() if k != victim))
    with pytest.raises(AssertionError, match="to_v"):
        missing.check_covers(model)
    extra = LayerTable(table.arch, table.source, OrderedDict(table.layers))
    extra.layers["not_a_layer.weight"] = dataclasses.replace(table[victim], param="not_a_layer.weight")
    with pytest.raises(AssertionError, match="not_a_layer"):
        extra.check_covers(model)


def test_table_shapes_bias_and_params_match_the_model(artifacts, tiny_arch):
    table = artifacts.table(tiny_arch)
    modules = dict(artifacts.model(tiny_arch).named_modules())
    for info in table:
        mod = modules[info.module]
        assert info.shape == tuple(mod.weight.shape), info.param
        assert info.bias == (getattr(mod, "bias", None) is not None), info.param
        assert info.params == mod.weight.numel() + (mod.bias.numel() if info.bias else 0), info.param
        assert info.kind == ("linear" if isinstance(mod, torch.nn.Linear) else "conv")
        assert info.out_features == info.shape[0]
        assert info.in_features == math.prod(info.shape[1:])
        assert info.macs_per_token == info.in_features * info.out_features
        assert info.macs == info.tokens * info.macs_per_token


# --------------------------------------------------------------------------- roles
ROLES = {
    "tiny-flux": {
        "transformer_blocks.0.attn.to_q.weight": "attn_q",
        "transformer_blocks.1.attn.add_k_proj.weight": "attn_k",
        "transformer_blocks.0.attn.to_add_out.weight": "attn_out",
        "transformer_blocks.0.ff.net.0.proj.weight": "mlp_up",
        "transformer_blocks.0.ff_context.net.2.weight": "mlp_down",
        "transformer_blocks.0.norm1.linear.weight": "adaln",
        "transformer_blocks.0.norm1_context.linear.weight": "adaln",
        "single_transformer_blocks.0.proj_mlp.weight": "mlp_up",
        "single_transformer_blocks.1.proj_out.weight": "mlp_down",
        "single_transformer_blocks.0.norm.linear.weight": "adaln",
        "time_text_embed.text_embedder.linear_1.weight": "text_embed",
        "time_text_embed.timestep_embedder.linear_1.weight": "time_embed",
        "time_text_embed.guidance_embedder.linear_2.weight": "time_embed",
        "context_embedder.weight": "text_embed",
        "x_embedder.weight": "patch_embed",
        "norm_out.linear.weight": "adaln",
        "proj_out.weight": "final_proj",
    },
    "tiny-sd3": {
        "pos_embed.proj.weight": "patch_embed",
        "transformer_blocks.0.attn.add_v_proj.weight": "attn_v",
        "transformer_blocks.1.attn.to_out.0.weight": "attn_out",
        "time_text_embed.text_embedder.linear_2.weight": "text_embed",
        "norm_out.linear.weight": "adaln",
        "proj_out.weight": "final_proj",
    },
    "tiny-pixart": {
        "pos_embed.proj.weight": "patch_embed",
        "adaln_single.linear.weight": "adaln",
        "adaln_single.emb.timestep_embedder.linear_1.weight": "time_embed",
        "caption_projection.linear_1.weight": "text_embed",
        "transformer_blocks.0.attn2.to_k.weight": "attn_k",
        "transformer_blocks.1.ff.net.2.weight": "mlp_down",
        "proj_out.weight": "final_proj",
    },
    "tiny-dit": {
        "pos_embed.proj.weight": "patch_embed",
        "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1.weight": "time_embed",
        "transformer_blocks.0.norm1.linear.weight": "adaln",
        "transformer_blocks.0.attn1.to_q.weight": "attn_q",
        "proj_out_1.weight": "adaln",
        "proj_out_2.weight": "final_proj",
    },
    "tiny-wan": {
        "patch_embedding.weight": "patch_embed",
        "condition_embedder.time_proj.weight": "adaln",
        "condition_embedder.time_embedder.linear_1.weight": "time_embed",
        "condition_embedder.text_embedder.linear_1.weight": "text_embed",
        "blocks.0.attn2.to_v.weight": "attn_v",
        "blocks.1.ffn.net.0.proj.weight": "mlp_up",
        "blocks.1.ffn.net.2.weight": "mlp_down",
        "proj_out.weight": "final_proj",
    },
    "tiny-zimage": {
        "all_x_embedder.2-1.weight": "patch_embed",
        "t_embedder.mlp.0.weight": "time_embed",
        "cap_embedder.1.weight": "text_embed",
        "noise_refiner.0.attention.to_q.weight": "attn_q",
        "context_refiner.0.attention.to_out.0.weight": "attn_out",
        "layers.0.adaLN_modulation.0.weight": "adaln",
        "layers.0.feed_forward.w1.weight": "mlp_up",
        "layers.0.feed_forward.w3.weight": "mlp_up",
        "layers.1.feed_forward.w2.weight": "mlp_down",
        "all_final_layer.2-1.adaLN_modulation.1.weight": "adaln",
        "all_final_layer.2-1.linear.weight": "final_proj",
    },
}


def test_layer_roles_are_sensible(artifacts, tiny_arch):
    table = artifacts.table(tiny_arch)
    for param, role in ROLES[tiny_arch].items():
        assert table[param].role == role, f"{param}: {table[param].role} != {role}"
    # every layer is classified, and each model has the core roles
    others = [i.param for i in table if i.role == Role.OTHER.value]
    assert others == [], f"unclassified layers: {others}"
    roles = {i.role for i in table}
    assert {"attn_q", "attn_k", "attn_v", "attn_out", "mlp_up", "mlp_down", "adaln", "time_embed",
            "patch_embed", "final_proj"} <= roles
    assert ("text_embed" in roles) == (tiny_arch != "tiny-dit")
    # patch embedding is exactly one layer; convs only there
    assert [i.param for i in table if i.role == "patch_embed"] == [p for p, r in ROLES[tiny_arch].items()
                                                                  if r == "patch_embed"]
    assert all(i.role == "patch_embed" for i in table if i.kind == "conv")


@pytest.mark.parametrize("module,role", [
    ("transformer_blocks.3.attn.to_q", Role.ATTN_Q),
    ("transformer_blocks.3.attn.to_out.0", Role.ATTN_OUT),
    ("transformer_blocks.3.attn.to_out.1", Role.OTHER),  # dropout index, not a projection
    ("adaln_single.emb.timestep_embedder.linear_1", Role.TIME_EMBED),  # embedder wins over adaLN
    ("adaln_single.linear", Role.ADALN),
    ("single_transformer_blocks.7.proj_out", Role.MLP_DOWN),
    ("proj_out", Role.FINAL_PROJ),
    ("transformer_blocks.0.ff.net.0.proj", Role.MLP_UP),
    ("some.unknown.layer", Role.OTHER),
])
def test_classify_role(module, role):
    assert classify_role(module) is role


@pytest.mark.parametrize("module,block", [
    ("transformer_blocks.12.attn.to_q", "transformer_blocks.12"),
    ("single_transformer_blocks.0.proj_out", "single_transformer_blocks.0"),
    ("blocks.1.ffn.net.2", "blocks.1"),
    ("noise_refiner.0.attention.to_k", "noise_refiner.0"),
    ("layers.3.feed_forward.w1", "layers.3"),
    ("proj_out", None),
    ("time_text_embed.timestep_embedder.linear_1", None),
])
def test_block_of(module, block):
    assert block_of(module) == block


# --------------------------------------------------------------------------- blocks, calls, tokens
def test_block_index_follows_execution_order(artifacts, tiny_arch):
    table = artifacts.table(tiny_arch)
    seen: list[str] = []
    for info in table:
        assert (info.block is None) == (info.block_index is None), info.param
        if info.block is not None and info.block not in seen:
            seen.append(info.block)
        if info.block is not None:
            assert info.block_index == seen.index(info.block)
    assert len(seen) >= 2 and sorted({i.block_index for i in table if i.block is not None}) == list(range(len(seen)))


def test_flux_and_zimage_block_order(artifacts):
    flux = artifacts.table("tiny-flux")
    assert [flux[f"{b}.attn.to_q.weight"].block_index for b in
            ("transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
             "single_transformer_blocks.1")] == [0, 1, 2, 3]
    zimage = artifacts.table("tiny-zimage")
    assert [zimage[f"{b}.attention.to_q.weight"].block_index for b in
            ("noise_refiner.0", "context_refiner.0", "layers.0", "layers.1")] == [0, 1, 2, 3]


def test_dit_shared_timestep_embedder_is_called_twice(artifacts):
    table = artifacts.table("tiny-dit")
    info = table["transformer_blocks.0.norm1.emb.timestep_embedder.linear_1.weight"]
    # DiT reuses block 0's embedding for the final layer's conditioning
    assert info.calls == 2 and len(info.fx_nodes) == 2
    assert info.tokens == 2  # one token per call
    assert table["transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.weight"].calls == 1
    assert sum(i.calls for i in table) == len(table) + 2  # linear_1 and linear_2 of block 0


def test_each_call_node_is_annotated(artifacts, tiny_arch):
    graph = artifacts.graph(tiny_arch)
    table = artifacts.table(tiny_arch)
    nodes = {n.name: n for n in graph.graph.nodes}
    annotated = [n for n in graph.graph.nodes if get_annotation(n, LayerRef) is not None]
    assert len(annotated) == sum(i.calls for i in table)
    for info in table:
        assert len(info.fx_nodes) == info.calls
        refs = [get_annotation(nodes[name], LayerRef) for name in info.fx_nodes]
        assert [r.call_index for r in refs] == list(range(info.calls))
        assert all(r.param == info.param and r.role == info.role and r.block_index == info.block_index
                   for r in refs), info.param


TOKENS = {  # tokens per sample at the default resolution (16x16 latents, 8 text tokens)
    "tiny-flux": {"x_embedder.weight": 64, "context_embedder.weight": 8,
                  "transformer_blocks.0.attn.to_q.weight": 64, "transformer_blocks.0.attn.add_q_proj.weight": 8,
                  "single_transformer_blocks.0.attn.to_q.weight": 72,
                  "time_text_embed.timestep_embedder.linear_1.weight": 1},
    "tiny-sd3": {"pos_embed.proj.weight": 64, "context_embedder.weight": 8, "proj_out.weight": 64},
    "tiny-pixart": {"pos_embed.proj.weight": 64, "transformer_blocks.0.attn2.to_k.weight": 8,
                    "transformer_blocks.0.attn2.to_q.weight": 64},
    "tiny-dit": {"pos_embed.proj.weight": 64, "transformer_blocks.0.attn1.to_q.weight": 64},
    "tiny-wan": {"patch_embedding.weight": 3 * 8 * 8, "blocks.0.attn1.to_q.weight": 192,
                 "blocks.0.attn2.to_k.weight": 8, "condition_embedder.time_proj.weight": 1},
    "tiny-zimage": {"all_x_embedder.2-1.weight": 64, "cap_embedder.1.weight": 32,
                    "layers.0.attention.to_q.weight": 96},
}


def test_tokens_per_sample(artifacts, tiny_arch):
    table = artifacts.table(tiny_arch)
    for param, tokens in TOKENS[tiny_arch].items():
        assert table[param].tokens == tokens, f"{param}: {table[param].tokens} != {tokens}"


def test_totals_add_up(artifacts, tiny_arch):
    table = artifacts.table(tiny_arch)
    rows = table.totals()
    assert sum(r["layers"] for r in rows) == len(table)
    assert sum(r["params"] for r in rows) == sum(i.params for i in table)
    assert sum(r["macs"] for r in rows) == sum(i.macs for i in table)
    assert math.isclose(sum(r["param_share"] for r in rows), 1.0)
    assert math.isclose(sum(r["mac_share"] for r in rows), 1.0)
    macs = [r["macs"] for r in rows]
    assert macs == sorted(macs, reverse=True)
    assert len({r["role"] for r in rows}) == len(rows)


# --------------------------------------------------------------------------- comparison and JSON
def test_same_layers_reports_differences(artifacts):
    table = artifacts.table("tiny-sd3")
    assert table.same_layers(table) == []
    key = "transformer_blocks.0.attn.to_q.weight"
    changed = LayerTable(table.arch, table.source, OrderedDict(table.layers))
    changed.layers[key] = dataclasses.replace(table[key], role="mlp_up", tokens=1)
    diffs = changed.same_layers(table)
    assert any(key in d and "role" in d for d in diffs)
    assert any(key in d and "tokens" in d for d in diffs)
    fewer = LayerTable(table.arch, table.source, OrderedDict((k, v) for k, v in table.layers.items() if k != key))
    assert any("keys differ" in d and key in d for d in table.same_layers(fewer))
    # calls are deliberately not compared (ONNX merges identical calls)
    calls = LayerTable(table.arch, table.source, OrderedDict(table.layers))
    calls.layers[key] = dataclasses.replace(table[key], calls=5)
    assert calls.same_layers(table) == []


def test_json_round_trip(artifacts, tiny_arch, tmp_path):
    table = artifacts.table(tiny_arch)
    data = json.loads(json.dumps(table.to_json()))
    assert data["version"] == 1 and data["arch"] == table.arch and len(data["layers"]) == len(table)
    back = LayerTable.from_json(data)
    assert back.same_layers(table) == []
    assert list(back) == list(table)  # every field, including calls and fx node names
    path = tmp_path / "layers.json"
    table.save(path)
    assert LayerTable.from_json(json.loads(path.read_text())).same_layers(table) == []
    assert [p.name for p in tmp_path.iterdir()] == ["layers.json"], "atomic save leaves no temp file"


def test_from_json_rejects_bad_input(artifacts):
    data = artifacts.table("tiny-dit").to_json()
    with pytest.raises(InputError, match=r"my.json: unknown layer-table version 2"):
        LayerTable.from_json({**data, "version": 2}, where="my.json")
    with pytest.raises(InputError, match="unknown layer-table version"):
        LayerTable.from_json([1, 2, 3])
    broken = json.loads(json.dumps(data))
    del broken["layers"][0]["shape"]
    with pytest.raises(InputError, match="malformed layer entry"):
        LayerTable.from_json(broken)
