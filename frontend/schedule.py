"""The sampling schedule a plan is made for: scheduler, number of steps, timestep values, guidance."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from ..errors import InputError

# The scheduler each architecture is sampled with in its diffusers pipeline.
_DEFAULT_SCHEDULER = {
    "FluxTransformer2DModel": ("FlowMatchEulerDiscreteScheduler", 3.5),
    "SD3Transformer2DModel": ("FlowMatchEulerDiscreteScheduler", 7.0),
    "WanTransformer3DModel": ("FlowMatchEulerDiscreteScheduler", 5.0),
    "ZImageTransformer2DModel": ("FlowMatchEulerDiscreteScheduler", 0.0),
    "PixArtTransformer2DModel": ("DPMSolverMultistepScheduler", 4.5),
    "DiTTransformer2DModel": ("DDIMScheduler", 4.0),
}


@dataclasses.dataclass(frozen=True)
class Schedule:
    scheduler: str
    num_steps: int
    timesteps: tuple[float, ...]
    guidance: float | None = None

    def __post_init__(self):
        if self.num_steps < 1 or len(self.timesteps) != self.num_steps:
            raise InputError(f"schedule: {self.num_steps} steps but {len(self.timesteps)} timestep values")

    def to_json(self) -> dict[str, Any]:
        return dict(scheduler=self.scheduler, num_steps=self.num_steps, timesteps=list(self.timesteps),
                    guidance=self.guidance)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Schedule":
        return cls(d["scheduler"], int(d["num_steps"]), tuple(float(t) for t in d["timesteps"]), d.get("guidance"))


def default_schedule(arch: str, num_steps: int = 20, guidance: float | None = None) -> Schedule:
    """The timesteps diffusers' default scheduler for ``arch`` visits in ``num_steps`` steps."""
    import diffusers

    if num_steps < 1:
        raise InputError(f"schedule: number of steps must be >= 1, got {num_steps}")
    name, default_guidance = _DEFAULT_SCHEDULER.get(arch, ("FlowMatchEulerDiscreteScheduler", None))
    scheduler = getattr(diffusers, name)()
    scheduler.set_timesteps(num_steps)
    steps = tuple(float(t) for t in scheduler.timesteps[:num_steps])
    return Schedule(name, num_steps, steps, default_guidance if guidance is None else guidance)
