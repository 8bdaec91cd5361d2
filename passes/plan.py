"""The precision plan: which precision every quantizable layer runs at, at every denoising step.

A versioned dataclass that round-trips through JSON. It names the model it was made for by a
fingerprint (a hash of the config and the weights), the sampling schedule, the precision lattice,
the precision of each layer (keyed by weight parameter name) at each step, the budget, and the
achieved averages. Loading a plan of an unknown version, for another model, or with layers
missing is a :class:`~adatsq.errors.PlanError` that says which.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import PlanError
from ..frontend.schedule import Schedule

PLAN_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Precision:
    """A lattice point. ``w_bits``/``a_bits`` of 16 mean "kept in 16-bit floating point".

    ``fmt``: the number format of the quantized side(s): ``"int"`` (symmetric integers, the default)
    or ``"nvfp4"`` (FP4 E2M1 in blocks of 16 with an FP8 scale each; 4-bit sides only). The budget
    counts what a value costs (:attr:`w_cost`, :attr:`a_cost`): the bits, plus an NVFP4 block's
    8-bit scale spread over its 16 values (4.5). Integer scales -- one per output channel or group
    of 64 weights, one per token of activations -- are not counted, as the paper counts them."""

    name: str
    w_bits: int
    a_bits: int
    fmt: str = "int"

    def __post_init__(self):
        for b in (self.w_bits, self.a_bits):
            if b not in (2, 3, 4, 6, 8, 16):
                raise PlanError(f"precision {self.name}: unsupported bit-width {b}")
        if self.fmt not in ("int", "nvfp4"):
            raise PlanError(f"precision {self.name}: unknown number format {self.fmt!r} (known: int, nvfp4)")
        if self.fmt == "nvfp4" and ({self.w_bits, self.a_bits} - {4, 16} or self.w_bits == 16):
            raise PlanError(f"precision {self.name}: NVFP4 has 4-bit weights and 4- or 16-bit activations, "
                            f"not W{self.w_bits}A{self.a_bits}")

    @staticmethod
    def _cost(bits: int, fmt: str) -> float:
        return bits + 0.5 if fmt == "nvfp4" and bits < 16 else float(bits)

    @property
    def w_cost(self) -> float:
        """Bits a weight costs under the budget."""
        return self._cost(self.w_bits, self.fmt)

    @property
    def a_cost(self) -> float:
        """Bits an activation costs under the budget."""
        return self._cost(self.a_bits, self.fmt)

    def to_json(self) -> dict[str, Any]:
        """As in a plan file (``fmt`` written only when not the integer default)."""
        d = dataclasses.asdict(self)
        if self.fmt == "int":
            del d["fmt"]
        return d


#: the default lattice: Low / Mid / High / keep (DESIGN.md: W4A4, W4A8, W8A8, 16-bit)
DEFAULT_LATTICE = (Precision("W4A4", 4, 4), Precision("W4A8", 4, 8), Precision("W8A8", 8, 8),
                   Precision("FP16", 16, 16))


@dataclasses.dataclass(frozen=True)
class Budget:
    """Average bit-widths: weights weighted by parameters, activations by MACs, over layers and steps."""

    w_bits: float
    a_bits: float

    def to_json(self):
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ModelFingerprint:
    arch: str
    config_sha256: str
    weights_sha256: str

    @property
    def short(self) -> str:
        return hashlib.sha256((self.config_sha256 + self.weights_sha256).encode()).hexdigest()[:16]


def fingerprint(arch: str, config: Mapping[str, Any], state_dict: Mapping[str, Any]) -> ModelFingerprint:
    """Hash of a config (canonical JSON, private ``_`` keys dropped) and of every weight tensor."""
    import torch

    cfg = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    cfg_hash = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()
    h = hashlib.sha256()
    for name, t in sorted(state_dict.items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return ModelFingerprint(arch, cfg_hash, h.hexdigest())


def fingerprint_model(model: Any) -> ModelFingerprint:
    """Fingerprint of a diffusers model instance."""
    return fingerprint(type(model).__name__, model.config, model.state_dict())


def fingerprint_graph(graph: Any) -> ModelFingerprint:
    """Fingerprint of the model a DiTGraph was exported from (equal to :func:`fingerprint_model`)."""
    from ..frontend.architectures import param_name

    state = {param_name(k): v for k, v in graph.program.state_dict.items()}
    return fingerprint(graph.arch, graph.config, state)


@dataclasses.dataclass(frozen=True)
class PrecisionPlan:
    model: ModelFingerprint
    schedule: Schedule
    lattice: tuple[Precision, ...]
    layers: tuple[str, ...]  # weight parameter names, in layer-table order
    assignment: tuple[tuple[str, ...], ...]  # [step][layer] -> precision name
    budget: Budget | None
    achieved: Budget
    version: int = PLAN_VERSION

    def __post_init__(self):
        names = {p.name for p in self.lattice}
        if len(names) != len(self.lattice):
            raise PlanError("plan: lattice has duplicate precision names")
        if len(self.assignment) != self.schedule.num_steps:
            raise PlanError(f"plan: {len(self.assignment)} steps assigned, schedule has {self.schedule.num_steps}")
        for t, row in enumerate(self.assignment):
            if len(row) != len(self.layers):
                raise PlanError(f"plan: step {t} assigns {len(row)} layers, plan lists {len(self.layers)}")
            unknown = set(row) - names
            if unknown:
                raise PlanError(f"plan: step {t} uses precision {sorted(unknown)[0]!r} not in the lattice")

    # ---------------------------------------------------------------- queries
    def precision(self, step: int, param: str) -> Precision:
        by_name = {p.name: p for p in self.lattice}
        return by_name[self.assignment[step][self.layers.index(param)]]

    @staticmethod
    def averages(assignment: Sequence[Sequence[str]], lattice: Sequence[Precision], layers: Sequence[str],
                 table: Any) -> Budget:
        """Budget achieved by ``assignment``: weights weighted by params, activations by MACs."""
        by_name = {p.name: p for p in lattice}
        wp = [table[p].params for p in layers]
        wm = [table[p].macs if table[p].macs is not None else table[p].macs_per_token for p in layers]
        steps = len(assignment) or 1
        w = sum(by_name[row[i]].w_cost * wp[i] for row in assignment for i in range(len(layers)))
        a = sum(by_name[row[i]].a_cost * wm[i] for row in assignment for i in range(len(layers)))
        return Budget(w / (steps * (sum(wp) or 1)), a / (steps * (sum(wm) or 1)))

    @classmethod
    def uniform(cls, table: Any, fingerprint: ModelFingerprint, schedule: Schedule, precision: str,
                lattice: Sequence[Precision] = DEFAULT_LATTICE, budget: Budget | None = None) -> "PrecisionPlan":
        layers = tuple(table.names)
        assignment = tuple(tuple(precision for _ in layers) for _ in range(schedule.num_steps))
        if precision not in {p.name for p in lattice}:
            raise PlanError(f"plan: precision {precision!r} not in the lattice")
        return cls(fingerprint, schedule, tuple(lattice), layers, assignment, budget,
                   cls.averages(assignment, lattice, layers, table))

    # ---------------------------------------------------------------- validation
    def check_model(self, fingerprint: ModelFingerprint, table: Any, where: str = "plan") -> None:
        """Raise PlanError unless this plan fits the model (fingerprint) and its layer table."""
        if fingerprint != self.model:
            what = "architecture" if fingerprint.arch != self.model.arch else (
                "config" if fingerprint.config_sha256 != self.model.config_sha256 else "weights")
            raise PlanError(f"{where}: made for another model ({self.model.arch} {self.model.short}); "
                            f"this model is {fingerprint.arch} {fingerprint.short} (its {what} differ)")
        missing = [p for p in table.names if p not in set(self.layers)]
        if missing:
            raise PlanError(f"{where}: {len(missing)} layers of the model have no precision (e.g. {missing[0]})")
        extra = [p for p in self.layers if p not in table]
        if extra:
            raise PlanError(f"{where}: {len(extra)} layers are not in the model (e.g. {extra[0]})")

    # ---------------------------------------------------------------- JSON
    def to_json(self) -> dict[str, Any]:
        return dict(
            format="adatsq.precision_plan", version=self.version, model=dataclasses.asdict(self.model),
            schedule=self.schedule.to_json(), lattice=[p.to_json() for p in self.lattice],
            layers=list(self.layers), assignment=[list(r) for r in self.assignment],
            budget=None if self.budget is None else self.budget.to_json(), achieved=self.achieved.to_json())

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "plan") -> "PrecisionPlan":
        if not isinstance(data, Mapping) or data.get("format") != "adatsq.precision_plan":
            raise PlanError(f"{where}: not an adatsq precision plan")
        if data.get("version") != PLAN_VERSION:
            raise PlanError(f"{where}: unknown plan version {data.get('version')!r} "
                            f"(this adatsq reads version {PLAN_VERSION})")
        try:
            return cls(
                model=ModelFingerprint(**data["model"]), schedule=Schedule.from_json(data["schedule"]),
                lattice=tuple(Precision(**p) for p in data["lattice"]), layers=tuple(data["layers"]),
                assignment=tuple(tuple(r) for r in data["assignment"]),
                budget=None if data.get("budget") is None else Budget(**data["budget"]),
                achieved=Budget(**data["achieved"]))
        except PlanError as exc:
            raise PlanError(f"{where}: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"{where}: malformed plan ({type(exc).__name__}: {exc})") from None

    def save(self, path: str | Path) -> None:
        from ..tools.io import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "PrecisionPlan":
        from ..tools.io import read_json

        return cls.from_json(read_json(path, PlanError), where=str(path))
