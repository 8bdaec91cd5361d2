"""PrecisionPlan: JSON round trip, averages, and the errors for unknown versions, other models,
missing layers."""

import dataclasses
import json

import pytest

from adatsq.errors import PlanError
from adatsq.frontend.architectures import BUILTINS
from adatsq.frontend.layers import LayerTable
from adatsq.frontend.schedule import Schedule, default_schedule
from adatsq.passes.plan import DEFAULT_LATTICE, Budget, PrecisionPlan, fingerprint_model


@pytest.fixture(scope="module")
def dit():
    from adatsq.frontend.export import export_model

    adapter = BUILTINS["tiny-dit"]
    model = adapter.tiny(seed=0)
    graph = export_model(model)
    return model, LayerTable.from_graph(graph)


def _mixed_plan(model, table, steps=3):
    sched = default_schedule("DiTTransformer2DModel", steps)
    names = [p.name for p in DEFAULT_LATTICE]
    assignment = tuple(tuple(names[(t + i) % len(names)] for i in range(len(table))) for t in range(steps))
    return PrecisionPlan(fingerprint_model(model), sched, DEFAULT_LATTICE, tuple(table.names), assignment,
                         Budget(6.0, 8.0), PrecisionPlan.averages(assignment, DEFAULT_LATTICE, table.names, table))


def test_round_trip(tmp_path, dit):
    model, table = dit
    plan = _mixed_plan(model, table)
    path = tmp_path / "plan.json"
    plan.save(path)
    back = PrecisionPlan.load(path)
    assert back == plan
    assert back.precision(1, table.names[0]).name == plan.assignment[1][0]
    back.check_model(fingerprint_model(model), table)


def test_averages_weighted_by_params_and_macs(dit):
    model, table = dit
    sched = default_schedule("DiTTransformer2DModel", 2)
    fp = fingerprint_model(model)
    assert PrecisionPlan.uniform(table, fp, sched, "W4A8").achieved == Budget(4.0, 8.0)
    # one step W8A8, one step W4A4 -> 6/6 averaged over steps
    names = table.names
    assignment = (tuple("W8A8" for _ in names), tuple("W4A4" for _ in names))
    assert PrecisionPlan.averages(assignment, DEFAULT_LATTICE, names, table) == Budget(6.0, 6.0)
    # the biggest layer at 16 bit moves the weight average by its parameter share
    big = max(table, key=lambda i: i.params)
    row = tuple("FP16" if n == big.param else "W4A4" for n in names)
    avg = PrecisionPlan.averages((row,), DEFAULT_LATTICE, names, table)
    share = big.params / sum(i.params for i in table)
    assert avg.w_bits == pytest.approx(4 + 12 * share)
    mshare = big.macs / sum(i.macs for i in table)
    assert avg.a_bits == pytest.approx(4 + 12 * mshare)


def test_unknown_version(tmp_path, dit):
    model, table = dit
    data = _mixed_plan(model, table).to_json()
    data["version"] = 99
    p = tmp_path / "v99.json"
    p.write_text(json.dumps(data))
    with pytest.raises(PlanError, match=r"v99.json: unknown plan version 99"):
        PrecisionPlan.load(p)


def test_other_model_is_refused(dit):
    model, table = dit
    plan = _mixed_plan(model, table)
    other = BUILTINS["tiny-dit"].tiny(seed=1)  # same config, other weights
    with pytest.raises(PlanError, match="made for another model.*weights differ"):
        plan.check_model(fingerprint_model(other), table)
    flux = BUILTINS["tiny-flux"].tiny(seed=0)
    with pytest.raises(PlanError, match="architecture differ"):
        plan.check_model(fingerprint_model(flux), table)


def test_missing_layers(dit):
    model, table = dit
    plan = _mixed_plan(model, table)
    short = dataclasses.replace(plan, layers=plan.layers[1:], assignment=tuple(r[1:] for r in plan.assignment))
    with pytest.raises(PlanError, match=r"1 layers of the model have no precision \(e.g. " + table.names[0]):
        short.check_model(fingerprint_model(model), table)


def test_malformed_plans(tmp_path, dit):
    model, table = dit
    good = _mixed_plan(model, table).to_json()
    cases = {
        "notjson.json": "{not json",
        "notplan.json": json.dumps({"hello": 1}),
        "badprec.json": json.dumps({**good, "assignment": [["W9A9"] * len(table)] * 3}),
        "badsteps.json": json.dumps({**good, "assignment": good["assignment"][:2]}),
        "nomodel.json": json.dumps({k: v for k, v in good.items() if k != "model"}),
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(PlanError, match=name):
            PrecisionPlan.load(tmp_path / name)
    with pytest.raises(PlanError, match="no such file"):
        PrecisionPlan.load(tmp_path / "absent.json")


def test_fingerprint_is_deterministic_and_sensitive():
    a = BUILTINS["tiny-sd3"].tiny(seed=0)
    b = BUILTINS["tiny-sd3"].tiny(seed=0)
    assert fingerprint_model(a) == fingerprint_model(b)
    import torch

    with torch.no_grad():
        next(b.parameters()).view(-1)[0] += 1e-3
    fb = fingerprint_model(b)
    assert fb.config_sha256 == fingerprint_model(a).config_sha256
    assert fb.weights_sha256 != fingerprint_model(a).weights_sha256


def test_schedule_matches_diffusers():
    s = default_schedule("FluxTransformer2DModel", 4)
    assert s.scheduler == "FlowMatchEulerDiscreteScheduler" and s.num_steps == 4
    assert s.timesteps[0] == pytest.approx(1000.0) and list(s.timesteps) == sorted(s.timesteps, reverse=True)
    assert Schedule.from_json(s.to_json()) == s
    with pytest.raises(Exception, match="timestep values"):
        Schedule("x", 3, (1.0, 2.0))
