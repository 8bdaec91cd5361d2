"""GPTQ (Frantar et al., 2022): weight quantization with second-order error feedback.

For a Linear ``y = W x`` whose inputs have second moment ``H = E[x x^T]`` (from the analysis
passes' Hessians), GPTQ quantizes ``W`` one input column at a time and spreads each column's
rounding error over the columns not yet quantized, so as to minimise
``tr((W - Q) H (W - Q)^T) = E ||(W - Q) x||^2``. AdaTSQ's temporal calibration passes the
Fisher-weighted ``H' = sum_t alpha[t] X_t^T X_t`` instead of the uniform sum: the weights are then
fitted best where the trajectory is most sensitive.

Implementation notes (our reading of the algorithm; no code was copied):

* ``H`` is damped by ``damp * mean(diag H)`` on the diagonal; dead inputs (``H_jj = 0``) get
  weight 0 and a unit diagonal;
* the upper Cholesky factor of ``H^-1`` drives the column updates, in blocks of ``block_size``
  columns with a lazy batch update of the rest (float64 on CPU, float32 on CUDA);
* ``act_order`` processes columns by decreasing ``H_jj``;
* scales are *static*: computed from the original weight (max-abs per output channel, or per
  group of ``group_size`` consecutive input channels) before the error feedback, so the result
  is exactly a :class:`~adatsq.passes.quant.QuantizedWeight` in the reference format, whatever the
  column order.
"""

from __future__ import annotations

import dataclasses

import torch

from .quant import (QuantizedWeight, check_format, fp4_at, nvfp4_block, nvfp4_weight_scales, qmax, quantize_weight,
                    weight_scales)


@dataclasses.dataclass(frozen=True)
class GPTQOptions:
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True

    def validate(self) -> None:
        if not self.damp > 0:
            raise ValueError(f"GPTQ damping must be positive, got {self.damp}")
        if self.block_size < 1:
            raise ValueError(f"GPTQ block size must be >= 1, got {self.block_size}")


def weighted_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T)``: the output error ``E ||(W - Q) x||^2`` under second moment H."""
    d = (w - q).double().reshape(w.shape[0], -1)
    return float(((d @ h.double()) * d).sum())


def gptq(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int | None = None,
         options: GPTQOptions = GPTQOptions(), fmt: str = "int") -> QuantizedWeight:
    """Quantize ``w`` [O, K] (conv weights are flattened to [O, K]) with Hessian ``h`` [K, K].
    ``fmt="nvfp4"``: each column rounds to the FP4 grid of its block's (static) NVFP4 scale."""
    options.validate()
    check_format(fmt, bits)
    nvfp4 = fmt == "nvfp4"
    if nvfp4:
        block = nvfp4_block(w.reshape(w.shape[0], -1).shape[1])
        if group_size not in (None, block):
            raise ValueError(f"NVFP4 weights come in blocks of {block}, not groups of {group_size}")
        group_size = block
    shape = tuple(w.shape)
    dt = torch.float64 if w.device.type == "cpu" else torch.float32
    W = w.detach().reshape(shape[0], -1).to(dt).clone()
    K = W.shape[1]
    if h.shape != (K, K):
        raise ValueError(f"GPTQ: Hessian {tuple(h.shape)} does not match weight input size {K}")
    if not torch.isfinite(h).all():
        raise ValueError("GPTQ: the Hessian has NaN/Inf entries")
    H = h.detach().to(W.device, dt).clone()
    # static, from the original weight
    scales = (nvfp4_weight_scales(W) if nvfp4 else weight_scales(W, bits, group_size)).to(dt)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diag(H), descending=True) if options.act_order else torch.arange(K, device=W.device)
    W = W[:, perm]
    H = H[perm][:, perm]
    H += options.damp * torch.mean(torch.diag(H)) * torch.eye(K, dtype=dt, device=W.device)
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except torch.linalg.LinAlgError as exc:
        raise ValueError(f"GPTQ: the damped Hessian is not positive definite ({exc}); raise the damping") from None
    # scale of every (permuted) column: [O, K]
    col_group = perm if group_size is None else perm // group_size
    col_scale = scales[:, 0:1].expand(-1, K) if group_size is None else scales[:, col_group]
    qm = 0 if nvfp4 else qmax(bits)
    Q = torch.zeros_like(W)
    bs = options.block_size
    for i1 in range(0, K, bs):
        i2 = min(i1 + bs, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = W1[:, i]
            s = col_scale[:, i1 + i]
            if nvfp4:
                q = fp4_at(col, s) * s  # a block whose scale is 0 quantizes to 0
            else:
                q = torch.clamp(torch.round(col / s), -qm - 1, qm) * s
            Q[:, i1 + i] = q
            err = (col - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    Q = Q[:, inv]
    return quantize_weight(Q.float().reshape(shape), bits, group_size, scales=scales.float(), fmt=fmt)
