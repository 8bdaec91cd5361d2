"""The sampling loop, as one reusable piece: (condition, seed, schedule) -> trajectory.

Calibration, the precision search and evaluation all walk the same denoising trajectory; this is
the one place it is walked. A :class:`Denoiser` predicts the flow-matching velocity
``v = dx/dsigma`` for a batch of latents at noise level ``sigma`` (in [0, 1]) under a condition;
:func:`sample` runs diffusers' ``FlowMatchEulerDiscreteScheduler`` with classifier-free guidance
and records what the analysis passes need (the latent before every step, the guided velocity).

Noise is drawn per sample from its own seed, so a sample's trajectory does not depend on the
batch it is computed in.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, Sequence

import torch

from ..errors import InputError
from .schedule import Schedule


class Denoiser(Protocol):
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one sample's latent (no batch dimension)."""

    def null_condition(self, batch: int) -> Any:
        """The unconditional ("empty prompt") condition for classifier-free guidance."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, condition: Any) -> torch.Tensor:
        """Velocity for latents ``x`` [B, ...] at noise levels ``sigma`` [B] under ``condition``."""


@dataclasses.dataclass
class Trajectory:
    """What one sampling run visited. ``latents[k]`` is the input to step ``k`` (``latents[-1]`` is
    the final sample); ``velocities[k]`` the guided velocity used at step ``k``."""

    timesteps: tuple[float, ...]  # scheduler timesteps (0..1000)
    sigmas: tuple[float, ...]  # noise level of each step's input, then the final 0
    guidance: float
    seeds: tuple[int, ...]
    latents: list[torch.Tensor]
    velocities: list[torch.Tensor]

    @property
    def sample(self) -> torch.Tensor:
        return self.latents[-1]


def noise_for(seeds: Sequence[int], shape: Sequence[int], dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise [len(seeds), *shape]; sample ``i`` depends only on ``seeds[i]``."""
    return torch.stack([torch.randn(*shape, generator=torch.Generator().manual_seed(int(s)), dtype=dtype)
                        for s in seeds])


def flow_match_scheduler(schedule: Schedule):
    import diffusers

    if schedule.scheduler != "FlowMatchEulerDiscreteScheduler":
        raise InputError(f"sampling: scheduler {schedule.scheduler!r} is not supported "
                         f"(FlowMatchEulerDiscreteScheduler is)")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched.set_timesteps(schedule.num_steps)
    got = tuple(float(t) for t in sched.timesteps)
    if any(abs(a - b) > 1e-3 for a, b in zip(got, schedule.timesteps)):
        raise InputError(f"sampling: schedule timesteps {schedule.timesteps[:3]}... do not match the "
                         f"scheduler's {got[:3]}...")
    return sched


@torch.inference_mode()
def sample(denoiser: Denoiser, condition: Any, seeds: Sequence[int], schedule: Schedule,
           guidance: float | None = None, *, record: bool = True,
           on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> Trajectory:
    """Sample ``len(seeds)`` latents under ``condition`` (batched like the seeds).

    ``guidance`` defaults to the schedule's; values > 1 (or != 1) use classifier-free guidance
    ``v = v_uncond + g * (v_cond - v_uncond)`` with the denoiser's null condition, evaluated as one
    batch of 2B. ``record=False`` keeps only the final sample. ``on_step(k, x, v)`` is called after
    each step's velocity is computed (for progress or analysis hooks).
    """
    seeds = tuple(int(s) for s in seeds)
    if not seeds:
        raise InputError("sampling: no seeds given")
    g = schedule.guidance if guidance is None else guidance
    g = 1.0 if g is None else float(g)
    sched = flow_match_scheduler(schedule)
    x = noise_for(seeds, denoiser.latent_shape())
    b = x.shape[0]
    use_cfg = g != 1.0
    uncond = denoiser.null_condition(b) if use_cfg else None
    latents, velocities = ([x.clone()] if record else []), []
    sigmas = [float(s) for s in sched.sigmas]
    for k, t in enumerate(sched.timesteps):
        sigma = torch.full((b,), float(t) / 1000.0)
        if use_cfg:
            v_both = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), _cat_conditions(condition, uncond))
            v_cond, v_uncond = v_both[:b], v_both[b:]
            v = v_uncond + g * (v_cond - v_uncond)
        else:
            v = denoiser(x, sigma, condition)
        if on_step is not None:
            on_step(k, x, v)
        x = sched.step(v, t, x).prev_sample
        if record:
            latents.append(x.clone())
            velocities.append(v.clone())
    if not record:
        latents = [x]
    return Trajectory(tuple(float(t) for t in sched.timesteps), tuple(sigmas), g, seeds, latents, velocities)


def _cat_conditions(a: Any, b: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if isinstance(a, dict):
        return {k: _cat_conditions(a[k], b[k]) for k in a}
    if isinstance(a, (tuple, list)):
        return type(a)(_cat_conditions(x, y) for x, y in zip(a, b))
    raise TypeError(f"cannot batch conditions of type {type(a).__name__}")
