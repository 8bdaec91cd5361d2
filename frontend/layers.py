"""The quantizable-layer table: every Linear (and conv patch-embed), keyed by parameter name.

Built from an exported :class:`~adatsq.frontend.export.DiTGraph` (``LayerTable.from_graph``) or from
an ONNX model (``LayerTable.from_onnx``); both give the same keys, shapes, roles, blocks and MACs.
Decisions downstream (precision plans) are keyed by parameter name, never by graph node: one
Linear may be called several times.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from ..errors import InputError
from ..passes.annotations import register_annotation


class Role(str, enum.Enum):
    ATTN_Q = "attn_q"
    ATTN_K = "attn_k"
    ATTN_V = "attn_v"
    ATTN_OUT = "attn_out"
    MLP_UP = "mlp_up"
    MLP_DOWN = "mlp_down"
    ADALN = "adaln"
    TIME_EMBED = "time_embed"
    TEXT_EMBED = "text_embed"
    PATCH_EMBED = "patch_embed"
    FINAL_PROJ = "final_proj"
    OTHER = "other"


# Ordered (first match wins) rules on the module path (diffusers naming). Embedders are matched
# before adaLN so that e.g. ``adaln_single.emb.timestep_embedder.linear_1`` is a time embedder.
_ROLE_RULES: tuple[tuple[Role, str], ...] = (
    (Role.TIME_EMBED, r"(^|\.)(timestep_embedder|guidance_embedder|time_embedder|t_embedder)\."),
    (Role.TEXT_EMBED, r"(^|\.)(context_embedder|text_embedder|caption_projection|cap_embedder|"
                      r"image_embedder)(\.|$)"),
    (Role.PATCH_EMBED, r"(^|\.)(x_embedder|pos_embed\.proj|patch_embedding|all_x_embedder\.[^.]+)$"),
    (Role.ADALN, r"(^|\.)(norm1|norm1_context|norm|norm_out|norm2)\.linear$|adaLN_modulation|"
                 r"(^|\.)adaln_single\.linear$|(^|\.)condition_embedder\.time_proj$|(^|\.)proj_out_1$"),
    (Role.ATTN_Q, r"\.(to_q|add_q_proj)$"),
    (Role.ATTN_K, r"\.(to_k|add_k_proj)$"),
    (Role.ATTN_V, r"\.(to_v|add_v_proj)$"),
    (Role.ATTN_OUT, r"\.(to_out\.0|to_add_out)$"),
    (Role.MLP_UP, r"\.(ff|ff_context|ffn)\.net\.0\.proj$|\.proj_mlp$|\.feed_forward\.w[13]$"),
    # Flux single blocks fuse attention-out and MLP-down into one projection; it is the MLP's
    # down projection in shape and position, so it is classed as mlp_down.
    (Role.MLP_DOWN, r"\.(ff|ff_context|ffn)\.net\.2$|^single_transformer_blocks\.\d+\.proj_out$|"
                    r"\.feed_forward\.w2$"),
    (Role.FINAL_PROJ, r"^proj_out$|^proj_out_2$|^all_final_layer\.[^.]+\.linear$"),
)
_BLOCK_RE = re.compile(r"^((?:[A-Za-z_]*blocks|layers|noise_refiner|context_refiner|siglip_refiner)\.\d+)\.")


def classify_role(module: str) -> Role:
    for role, pattern in _ROLE_RULES:
        if re.search(pattern, module):
            return role
    return Role.OTHER


def block_of(module: str) -> str | None:
    m = _BLOCK_RE.match(module)
    return m.group(1) if m else None


@register_annotation("adatsq.layer")
@dataclasses.dataclass(frozen=True)
class LayerRef:
    """Annotation on a graph node that applies a quantizable layer (one per call)."""

    param: str  # weight parameter name, e.g. transformer_blocks.3.attn.to_q.weight
    role: str
    block_index: int | None
    call_index: int  # 0 for the first call of this parameter, 1 for the second ...


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    param: str  # weight parameter name: the key
    module: str  # module path
    kind: str  # "linear" | "conv"
    shape: tuple[int, ...]  # torch weight shape ([out, in] / [out, in/groups, *kernel])
    in_features: int
    out_features: int
    bias: bool
    params: int  # weight (+ bias) elements
    macs_per_token: int  # multiply-accumulates per output token/position
    tokens: int | None  # tokens per sample per step at the example resolution, all calls summed
    role: str
    block: str | None
    block_index: int | None  # execution order of the block (over all block groups)
    calls: int
    fx_nodes: tuple[str, ...] = ()
    onnx_nodes: tuple[str, ...] = ()

    @property
    def macs(self) -> int | None:
        """MACs per sample per denoising step at the example resolution."""
        return None if self.tokens is None else self.tokens * self.macs_per_token


def _make_info(param, kind, shape, bias, tokens, calls, fx_nodes=(), onnx_nodes=(), block_index=None) -> LayerInfo:
    module = param[: -len(".weight")] if param.endswith(".weight") else param
    out_f, in_f = int(shape[0]), int(_prod(shape[1:]))
    return LayerInfo(param=param, module=module, kind=kind, shape=tuple(int(s) for s in shape), in_features=in_f,
                     out_features=out_f, bias=bias, params=out_f * in_f + (out_f if bias else 0),
                     macs_per_token=out_f * in_f, tokens=tokens, role=classify_role(module).value,
                     block=block_of(module), block_index=block_index, calls=calls, fx_nodes=tuple(fx_nodes),
                     onnx_nodes=tuple(onnx_nodes))


def _prod(xs: Iterable[int]) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def _number_blocks(layers: list[LayerInfo]) -> list[LayerInfo]:
    """Assign block_index by order of first appearance (execution order) over all block groups."""
    order: dict[str, int] = {}
    for info in layers:
        if info.block is not None and info.block not in order:
            order[info.block] = len(order)
    return [dataclasses.replace(i, block_index=order.get(i.block)) for i in layers]


TABLE_VERSION = 1


@dataclasses.dataclass
class LayerTable:
    arch: str
    source: str  # "torch.export" | "onnx"
    layers: "OrderedDict[str, LayerInfo]"
    resolution: Mapping[str, int] | None = None

    # ------------------------------------------------------------------ container protocol
    def __iter__(self) -> Iterator[LayerInfo]:
        return iter(self.layers.values())

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, param: str) -> LayerInfo:
        return self.layers[param]

    def __contains__(self, param: object) -> bool:
        return param in self.layers

    @property
    def names(self) -> list[str]:
        return list(self.layers)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_graph(cls, graph: Any, annotate_nodes: bool = True) -> "LayerTable":
        """Table of an exported DiTGraph; annotates each linear/conv call with :class:`LayerRef`."""
        import torch

        from ..passes.annotations import annotate

        aten = torch.ops.aten
        linear_ops = {aten.linear.default}
        conv_ops = {aten.conv2d.default, aten.conv3d.default, aten.convolution.default}
        batch = graph.resolution.batch
        per_param: "OrderedDict[str, dict]" = OrderedDict()
        for node in graph.graph.nodes:
            if node.op != "call_function" or node.target not in linear_ops | conv_ops:
                continue
            w = node.args[1]
            param = graph.parameter_of(w) if w.op == "placeholder" else None
            if param is None:
                continue  # a matmul with a computed weight is not a quantizable layer
            kind = "linear" if node.target in linear_ops else "conv"
            bias = len(node.args) > 2 and node.args[2] is not None
            out_shape = [_hint(d) for d in node.meta["val"].shape]
            if kind == "linear":
                tokens = _prod(out_shape[:-1]) // batch
            else:
                tokens = _prod(out_shape[2:]) * out_shape[0] // batch
            entry = per_param.setdefault(param, dict(kind=kind, shape=tuple(w.meta["val"].shape), bias=bias,
                                                     tokens=0, nodes=[]))
            entry["tokens"] += tokens
            entry["nodes"].append(node)
        infos = [_make_info(p, e["kind"], e["shape"], e["bias"], e["tokens"], len(e["nodes"]),
                            fx_nodes=[n.name for n in e["nodes"]]) for p, e in per_param.items()]
        infos = _number_blocks(infos)
        table = cls(graph.arch, "torch.export", OrderedDict((i.param, i) for i in infos),
                    dataclasses.asdict(graph.resolution))
        if annotate_nodes:
            for info in infos:
                for k, node in enumerate(per_param[info.param]["nodes"]):
                    annotate(node, LayerRef(info.param, info.role, info.block_index, k))
        return table

    @classmethod
    def from_onnx(cls, model: Any) -> "LayerTable":
        """Table of an ONNX model (a ModelProto or a path). See :mod:`adatsq.frontend.onnx_io`."""
        from .onnx_io import layer_table_from_onnx

        return layer_table_from_onnx(model)

    # ------------------------------------------------------------------ checks and summaries
    def check_covers(self, model: Any) -> None:
        """Raise AssertionError unless every Linear/patch-conv weight of ``model`` is a key exactly once."""
        import torch

        want = [f"{n}.weight" for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) or (isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))
                                                       and classify_role(n) is Role.PATCH_EMBED)]
        missing = sorted(set(want) - set(self.layers))
        extra = sorted(set(self.layers) - set(want))
        if missing or extra or len(want) != len(set(want)):
            raise AssertionError(f"layer table mismatch: missing {missing[:5]}, extra {extra[:5]}")

    def totals(self) -> list[dict[str, Any]]:
        """Per-role rows: layer count, parameters, MACs and their shares (sorted by MACs)."""
        total_p = sum(i.params for i in self) or 1
        known = [i for i in self if i.macs is not None]
        total_m = sum(i.macs for i in known) or 1
        rows: dict[str, dict[str, Any]] = {}
        for i in self:
            r = rows.setdefault(i.role, dict(role=i.role, layers=0, params=0, macs=0 if known else None))
            r["layers"] += 1
            r["params"] += i.params
            if i.macs is not None and r["macs"] is not None:
                r["macs"] += i.macs
        for r in rows.values():
            r["param_share"] = r["params"] / total_p
            r["mac_share"] = None if r["macs"] is None else r["macs"] / total_m
        return sorted(rows.values(), key=lambda r: -(r["macs"] or r["params"]))

    def same_layers(self, other: "LayerTable") -> list[str]:
        """Differences (keys, shapes, roles, blocks, MACs, tokens) between two tables; empty if equal.

        The number of calls is not compared: ONNX optimisation merges identical calls (DiT computes
        its timestep embedding twice with the same weights and inputs; ONNX keeps one).
        """
        diffs = []
        if list(self.layers) != list(other.layers):
            a, b = set(self.layers), set(other.layers)
            diffs.append(f"keys differ: only here {sorted(a - b)[:3]}, only there {sorted(b - a)[:3]}")
        for k in self.layers.keys() & other.layers.keys():
            x, y = self.layers[k], other.layers[k]
            for f in ("kind", "shape", "bias", "params", "macs_per_token", "role", "block", "block_index"):
                if getattr(x, f) != getattr(y, f):
                    diffs.append(f"{k}: {f} {getattr(x, f)!r} != {getattr(y, f)!r}")
            if x.tokens is not None and y.tokens is not None and x.tokens != y.tokens:
                diffs.append(f"{k}: tokens {x.tokens} != {y.tokens}")
        return diffs

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> dict[str, Any]:
        return dict(version=TABLE_VERSION, arch=self.arch, source=self.source, resolution=self.resolution,
                    totals=self.totals(), layers=[_info_json(i) for i in self])

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "layer table") -> "LayerTable":
        if not isinstance(data, Mapping) or data.get("version") != TABLE_VERSION:
            v = data.get("version") if isinstance(data, Mapping) else None
            raise InputError(f"{where}: unknown layer-table version {v!r} (this adatsq reads {TABLE_VERSION})")
        try:
            infos = [LayerInfo(**{**d, "shape": tuple(d["shape"]), "fx_nodes": tuple(d.get("fx_nodes", ())),
                                  "onnx_nodes": tuple(d.get("onnx_nodes", ()))}) for d in data["layers"]]
        except (KeyError, TypeError) as exc:
            raise InputError(f"{where}: malformed layer entry ({exc})") from None
        return cls(data["arch"], data["source"], OrderedDict((i.param, i) for i in infos), data.get("resolution"))

    def save(self, path: str | Path) -> None:
        from ..tools.io import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_json(), indent=1))


def _info_json(info: LayerInfo) -> dict[str, Any]:
    d = dataclasses.asdict(info)
    d["shape"] = list(info.shape)
    d["fx_nodes"] = list(info.fx_nodes)
    d["onnx_nodes"] = list(info.onnx_nodes)
    return d


def _hint(d: Any) -> int:
    if isinstance(d, int):
        return d
    hint = getattr(getattr(d, "node", None), "hint", None)
    if hint is None:
        raise ValueError(f"symbolic dimension {d} has no example value")
    return int(hint)
