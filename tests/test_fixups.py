"""Generic export fix-ups (IndexWithInt64, CanonicalizeEmptyPermuted) on tiny graphs built here."""

import types

import numpy as np
import onnxruntime as ort
import pytest
import torch

from adatsq.frontend.export import _decomposition_table
from adatsq.frontend.fixups import CanonicalizeEmptyPermuted, IndexWithInt64

aten = torch.ops.aten


def _export(module, *args):
    ep = torch.export.export(module, args, strict=False).run_decompositions(_decomposition_table())
    return types.SimpleNamespace(program=ep)


def _ops(graph, op):
    return sum(1 for n in graph.program.graph.nodes if n.target is op)


def _ort(graph, tmp_path, *args):
    path = tmp_path / "m.onnx"
    torch.onnx.export(graph.program, args, dynamo=True, opset_version=21).save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)})[0]


class Int32Index(torch.nn.Module):
    def forward(self, table, ids):
        return table[ids] * 2


def test_index_with_int64(tmp_path):
    table, ids = torch.randn(10, 4), torch.tensor([3, 1, 4, 1, 5], dtype=torch.int32)
    g = _export(Int32Index(), table, ids)
    res = IndexWithInt64()(g)
    assert res.modified
    casts = [n for n in g.program.graph.nodes if n.target is aten._to_copy.default]
    assert len(casts) == 1 and casts[0].kwargs["dtype"] is torch.int64
    assert torch.equal(g.program.module()(table, ids), table[ids.long()] * 2)
    assert not IndexWithInt64()(g).modified  # idempotent
    np.testing.assert_array_equal(_ort(g, tmp_path, table, ids), (table[ids.long()] * 2).numpy())


class EmptyLikeFill(torch.nn.Module):
    def forward(self, x):
        out = torch.empty_like(x)
        out[..., 0::2] = x[..., 1::2]
        out[..., 1::2] = -x[..., 0::2]
        return out


def test_canonicalize_empty_permuted(tmp_path):
    x = torch.randn(2, 3, 8)
    g = _export(EmptyLikeFill(), x)
    assert _ops(g, aten.empty_permuted.default) == 1
    with pytest.raises(Exception, match="empty_permuted"):
        _ort(g, tmp_path, x)  # the ONNX exporter has no lowering for it
    res = CanonicalizeEmptyPermuted()(g)
    assert res.modified and _ops(g, aten.empty_permuted.default) == 0 and _ops(g, aten.empty.memory_format) == 1
    ref = EmptyLikeFill()(x)
    assert torch.equal(g.program.module()(x), ref)
    np.testing.assert_array_equal(_ort(g, tmp_path, x), ref.numpy())
