"""Denoisers for diffusers transformers driven by prompt embeddings (the text-model calibration path).

:class:`FluxDenoiser` turns a ``FluxTransformer2DModel`` into a
:class:`~adatsq.frontend.sampling.Denoiser` over packed latents ``[tokens, channels]``: a condition
is a dict ``{"prompt_embeds": [L, D], "pooled_prompt_embeds": [P]}`` (what a Flux pipeline's
``encode_prompt`` returns for one prompt), so a calibration set for a text model is a list of
such dicts (computed once with the pipeline's text encoders, or random for benchmarks) times a
list of seeds. The model may live on any device and dtype; latents and velocities cross the
interface as float32 on the CPU, which keeps trajectories off the accelerator.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import InputError


def flux_image_ids(h_tokens: int, w_tokens: int) -> torch.Tensor:
    ids = torch.zeros(h_tokens, w_tokens, 3)
    ids[..., 1] = torch.arange(h_tokens)[:, None]
    ids[..., 2] = torch.arange(w_tokens)[None, :]
    return ids.reshape(-1, 3)


class FluxDenoiser(nn.Module):
    """Velocity of a Flux transformer over packed latents of ``h_tokens x w_tokens`` tokens.

    ``guidance`` is the distilled-guidance value fed to ``guidance_embeds`` models (Flux-dev);
    sample such models with schedule guidance 1 (no classifier-free guidance). The null condition
    (for classifier-free guidance) is ``text_len`` zero embeddings.
    """

    def __init__(self, transformer: nn.Module, h_tokens: int, w_tokens: int, guidance: float | None = 3.5,
                 text_len: int = 512):
        super().__init__()
        if type(transformer).__name__ != "FluxTransformer2DModel":
            raise InputError(f"FluxDenoiser: expected a FluxTransformer2DModel, got {type(transformer).__name__}")
        self.transformer = transformer
        self.h_tokens, self.w_tokens, self.text_len = int(h_tokens), int(w_tokens), int(text_len)
        self.guidance = guidance if transformer.config.get("guidance_embeds") else None
        p = next(transformer.parameters())
        self.register_buffer("img_ids", flux_image_ids(self.h_tokens, self.w_tokens).to(p.device), persistent=False)

    def latent_shape(self) -> tuple[int, ...]:
        return (self.h_tokens * self.w_tokens, int(self.transformer.config.in_channels))

    def null_condition(self, batch: int) -> dict[str, torch.Tensor]:
        c = self.transformer.config
        return {"prompt_embeds": torch.zeros(batch, self.text_len, int(c.joint_attention_dim)),
                "pooled_prompt_embeds": torch.zeros(batch, int(c.pooled_projection_dim))}

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, condition: Any) -> torch.Tensor:
        p = next(self.transformer.parameters())
        dev, dt = p.device, p.dtype
        emb = condition["prompt_embeds"].to(dev, dt)
        pooled = condition["pooled_prompt_embeds"].to(dev, dt)
        kw = dict(hidden_states=x.to(dev, dt), encoder_hidden_states=emb, pooled_projections=pooled,
                  timestep=sigma.to(dev, dt), img_ids=self.img_ids.to(dt),
                  txt_ids=torch.zeros(emb.shape[1], 3, device=dev, dtype=dt))
        if self.guidance is not None:
            kw["guidance"] = torch.full((x.shape[0],), float(self.guidance), device=dev, dtype=dt)
        out = self.transformer(**kw, return_dict=False)[0]
        return out.float().to(x.device)


def random_prompt_embeddings(transformer: nn.Module, count: int, text_len: int, seed: int = 0) -> list[dict]:
    """Random stand-ins for prompt embeddings (benchmarks of random-init models only)."""
    c = transformer.config
    gen = torch.Generator().manual_seed(seed)
    return [{"prompt_embeds": torch.randn(text_len, int(c.joint_attention_dim), generator=gen),
             "pooled_prompt_embeds": torch.randn(int(c.pooled_projection_dim), generator=gen)} for _ in range(count)]
