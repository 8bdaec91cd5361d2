"""Calibration sets: conditions x seeds walked along the model's own sampling schedule.

A calibration set is the data every analysis pass sees: a list of conditions (class ids for
``flux-fmnist``; prompt-embedding dicts for text models), a list of seeds, the schedule and the
guidance. Sample ``(c, s)`` for every condition ``c`` and seed ``s`` is sampled from the noise of
seed ``s`` under condition ``c``; with classifier-free guidance both the conditional and the
unconditional model calls are part of what is captured.

The library does not own a data loader (modelopt's ``forward_loop`` convention): a set holds a
:class:`~adatsq.frontend.sampling.Denoiser` and per-sample conditions, and :meth:`model_calls`
yields exactly the ``(x, sigma, condition)`` batches the sampler evaluates at a step.

The cache key (:meth:`CalibrationSet.key`) covers everything that changes what the model sees:
conditions (their bytes), seeds, schedule timesteps, guidance, and the batch size (sums over
batches differ from one batch size to another at float rounding level, and token subsampling
draws per batch).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Iterator, Sequence

import torch

from ..errors import InputError
from ..frontend.sampling import Denoiser, Trajectory, _cat_conditions, sample
from ..frontend.schedule import Schedule

#: calibration seeds start here, away from the evaluation seeds (0, 1, 2, ...) so that a plan is
#: never judged on the noise it was calibrated on
CALIBRATION_SEED0 = 10_000


def _stack(conds: Sequence[Any]) -> Any:
    first = conds[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(list(conds))
    if isinstance(first, dict):
        return {k: _stack([c[k] for c in conds]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_stack([c[i] for c in conds]) for i in range(len(first)))
    if isinstance(first, (int, float)):
        return torch.tensor(list(conds))
    raise InputError(f"calibration: cannot batch conditions of type {type(first).__name__}")


def _digest(cond: Any, h) -> None:
    if isinstance(cond, torch.Tensor):
        t = cond.detach().contiguous().cpu()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(cond, dict):
        for k in sorted(cond):
            h.update(str(k).encode())
            _digest(cond[k], h)
    elif isinstance(cond, (tuple, list)):
        for c in cond:
            _digest(c, h)
    else:
        h.update(repr(cond).encode())


@dataclasses.dataclass
class CalibrationSet:
    """``conditions`` x ``seeds`` sampled with ``denoiser`` along ``schedule``.

    ``conditions`` are per-sample (unbatched) conditions; ``labels`` name them in reports.
    Samples are ordered condition-major: sample ``i`` is ``(conditions[i // S], seeds[i % S])``.
    """

    denoiser: Denoiser
    conditions: Sequence[Any]
    seeds: Sequence[int]
    schedule: Schedule
    guidance: float | None = None
    labels: Sequence[str] | None = None
    batch: int = 64  # samples per model call (doubled by CFG)

    def __post_init__(self):
        if not self.conditions:
            raise InputError("calibration: no conditions given")
        if not self.seeds:
            raise InputError("calibration: no seeds given")
        if len(set(int(s) for s in self.seeds)) != len(self.seeds):
            raise InputError("calibration: seeds repeat")
        if self.batch < 1:
            raise InputError(f"calibration: batch must be positive, got {self.batch}")
        self.seeds = tuple(int(s) for s in self.seeds)
        if self.labels is None:
            self.labels = tuple(str(i) for i in range(len(self.conditions)))

    # ------------------------------------------------------------------ shape
    @property
    def num_samples(self) -> int:
        return len(self.conditions) * len(self.seeds)

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    @property
    def effective_guidance(self) -> float:
        g = self.schedule.guidance if self.guidance is None else self.guidance
        return 1.0 if g is None else float(g)

    @property
    def cfg(self) -> bool:
        return self.effective_guidance != 1.0

    def sample_seeds(self) -> tuple[int, ...]:
        return tuple(s for _ in self.conditions for s in self.seeds)

    def sample_conditions(self, idx: Sequence[int]) -> Any:
        return _stack([self.conditions[i // len(self.seeds)] for i in idx])

    def batches(self, batch: int | None = None) -> Iterator[list[int]]:
        """Sample indices in fixed order, ``batch`` at a time."""
        b = batch or self.batch
        n = self.num_samples
        for i in range(0, n, b):
            yield list(range(i, min(n, i + b)))

    # ------------------------------------------------------------------ cache identity
    def key(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps(dict(seeds=list(self.seeds), schedule=self.schedule.to_json(),
                                 guidance=self.effective_guidance, batch=self.batch), sort_keys=True).encode())
        for c in self.conditions:
            _digest(c, h)
        return h.hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        return dict(conditions=list(self.labels), seeds=list(self.seeds), samples=self.num_samples,
                    steps=self.num_steps, guidance=self.effective_guidance, cfg=self.cfg,
                    scheduler=self.schedule.scheduler, key=self.key())

    # ------------------------------------------------------------------ sampling
    def sample_batch(self, idx: Sequence[int]) -> Trajectory:
        """The FP trajectory of samples ``idx`` (noise from their own seeds)."""
        seeds = [self.sample_seeds()[i] for i in idx]
        return sample(self.denoiser, self.sample_conditions(idx), seeds, self.schedule, self.guidance)

    def model_inputs(self, x: torch.Tensor, step: int, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """What the sampler feeds the denoiser at ``step`` for latents ``x`` of samples ``idx``:
        ``(x2, sigma2, condition2)``, doubled as ``[cond; uncond]`` under CFG."""
        b = x.shape[0]
        sigma = torch.full((b,), float(self.schedule.timesteps[step]) / 1000.0)
        cond = self.sample_conditions(idx)
        if not self.cfg:
            return x, sigma, cond
        return torch.cat([x, x]), torch.cat([sigma, sigma]), _cat_conditions(cond, self.denoiser.null_condition(b))

    def guided(self, v_both: torch.Tensor) -> torch.Tensor:
        """Combine a ``[cond; uncond]`` velocity batch as the sampler does."""
        if not self.cfg:
            return v_both
        b = v_both.shape[0] // 2
        v_c, v_u = v_both[:b], v_both[b:]
        return v_u + self.effective_guidance * (v_c - v_u)


def reference_calibration(ref: Any, seeds_per_class: int = 2, classes: Sequence[int] | None = None,
                          steps: int | None = None, guidance: float | None = None, seed0: int = CALIBRATION_SEED0,
                          batch: int = 64) -> CalibrationSet:
    """The default calibration set of a reference model (``flux-fmnist``): every class x
    ``seeds_per_class`` seeds from ``seed0``, on the model's own schedule."""
    from ..frontend.schedule import default_schedule

    if seeds_per_class < 1:
        raise InputError(f"calibration: seeds per class must be >= 1, got {seeds_per_class}")
    classes = tuple(range(len(ref.classes))) if classes is None else tuple(int(c) for c in classes)
    for c in classes:
        ref.class_id(c)  # validates
    schedule = ref.schedule
    if steps is not None and steps != schedule.num_steps:
        schedule = default_schedule(type(ref.denoiser.transformer).__name__, steps, schedule.guidance)
    return CalibrationSet(ref.denoiser, [torch.tensor(c) for c in classes],
                          tuple(range(seed0, seed0 + seeds_per_class)), schedule, guidance,
                          labels=[ref.classes[c] for c in classes], batch=batch)
