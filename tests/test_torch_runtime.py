"""backends/torch_runtime.py on the CPU: the lowered module computes the plan's reference numerics
(the kernels' torch path), switches precision per step through the clock, and reports its memory."""

import pytest
import torch

from adatsq.errors import InputError
from adatsq.passes.plan import PrecisionPlan
from adatsq.passes.search import TARGETS
from tests.test_search import analysed_tiny  # noqa: F401 - the module fixture


def _rows(k, i, name):
    return ("W8A8", "W4A8", "W4A16", "FP16")[(k + i) % 4]


@pytest.fixture(scope="module")
def lowered_inputs(analysed_tiny, tmp_path_factory):  # noqa: F811
    from adatsq.frontend.layers import LayerTable
    from adatsq.passes.plan import fingerprint_graph
    from adatsq.passes.weights import GPTQWeights, load_weight_copies, prepare_layers

    graph, calib, res = analysed_tiny
    tr = calib.denoiser.transformer
    table = LayerTable.from_graph(graph)
    lattice = TARGETS["torch-cuda"]
    params = dict(tr.named_parameters())
    layers = tuple(table.names)
    lin = [p for p in layers if params[p].ndim == 2]
    rows = tuple(tuple(_rows(k, i, p) if p in lin else "FP16" for i, p in enumerate(layers))
                 for k in range(calib.num_steps))
    plan = PrecisionPlan(fingerprint_graph(graph), calib.schedule, lattice, layers, rows, None,
                         PrecisionPlan.averages(rows, lattice, layers, table))
    prep = prepare_layers(calib, res.results["trajectory"], lin[::2], 4, 8, rank=4, samples=2)
    reqs = {p: [(4, None), (8, None)] for p in lin}
    path = tmp_path_factory.mktemp("rt") / "w.safetensors"
    GPTQWeights(tr, reqs, path, hessian="none", prep=prep)(graph)
    return tr, plan, load_weight_copies(path), calib


def test_runtime_matches_the_plan_reference_at_every_step(lowered_inputs):
    from adatsq.backends.torch_runtime import PlanLinear, lower_to_torch
    from adatsq.passes.transforms import StepClock, transformed_layers
    from adatsq.passes.weights import plan_transforms

    tr, plan, idx, calib = lowered_inputs
    den = calib.denoiser
    x = torch.randn(2, *den.latent_shape(), generator=torch.Generator().manual_seed(0))
    clock = StepClock(calib.num_steps)
    want = []
    with torch.no_grad(), transformed_layers(tr, plan_transforms(plan, idx, tr), clock):
        for k in range(calib.num_steps):
            clock.step = k
            want.append(den(*calib.model_inputs(x, k, [0, 1])))
    fp = den(*calib.model_inputs(x, 0, [0, 1])).detach()
    rt = lower_to_torch(tr, plan, idx, clock)
    try:
        assert rt.layers and all(isinstance(m, PlanLinear) for m in rt.layers.values())
        with torch.no_grad():
            for k in range(calib.num_steps):
                clock.step = k
                got = den(*calib.model_inputs(x, k, [0, 1]))
                assert torch.allclose(got, want[k], rtol=1e-4, atol=1e-4), k
        assert not torch.allclose(want[0], fp, atol=1e-4)  # the plan really quantizes
        mem = rt.memory()
        assert mem["copies"] > 0 and mem["base"] > 0 and mem["total"] == sum(v for k, v in mem.items() if k != "total")
    finally:
        rt.restore()
    assert not any(isinstance(m, PlanLinear) for m in tr.modules())
    with torch.no_grad():
        assert torch.equal(den(*calib.model_inputs(x, 0, [0, 1])), fp)  # restored exactly


def test_runtime_rejects_what_it_cannot_run(lowered_inputs):
    from adatsq.backends.torch_runtime import lower_to_torch, step_callback
    from adatsq.passes.plan import Precision
    from adatsq.passes.transforms import StepClock

    tr, plan, idx, calib = lowered_inputs
    lat = plan.lattice + (Precision("W3A3", 3, 3),)
    rows = tuple(tuple("W3A3" if n != "FP16" else n for n in row) for row in plan.assignment)
    bad = PrecisionPlan(plan.model, plan.schedule, lat, plan.layers, rows, None, plan.achieved)
    with pytest.raises(InputError, match="no kernel for"):
        lower_to_torch(tr, bad, idx, StepClock(calib.num_steps))
    with pytest.raises(InputError, match="steps"):
        lower_to_torch(tr, plan, idx, StepClock(calib.num_steps + 1))
    with pytest.raises(InputError, match="no weights file"):
        lower_to_torch(tr, plan, None, StepClock(calib.num_steps))
    clock = StepClock(3)
    cb = step_callback(clock)
    assert cb(None, 0, None, {"a": 1}) == {"a": 1} and clock.step == 1
    cb(None, 2, None, {})
    assert clock.step == 2  # clamped at the last step
