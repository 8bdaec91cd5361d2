"""Reference quantization ops: bounds, round trips, shapes."""

import pytest
import torch

from adatsq.passes.quant import (FP8_MAX, fake_quant_static, fake_quant_tokens, fake_quant_tokens_fp8,
                                 fake_quant_weight, fake_quant_weight_fp8, fp8_e4m3, qmax, quantize_weight,
                                 weight_scales)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("group", [None, 16, 32])
def test_weight_rtn_bounds_and_round_trip(bits, group):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(24, 64, generator=g) * torch.rand(24, 1, generator=g) * 3
    qw = quantize_weight(w, bits, group)
    k_groups = 1 if group is None else 64 // group
    assert qw.scales.shape == (24, k_groups) and qw.codes.shape == (24, 64) and qw.codes.dtype == torch.int8
    assert int(qw.codes.max()) <= qmax(bits) and int(qw.codes.min()) >= -qmax(bits) - 1
    deq = qw.dequantize()
    # error within half a step of the grid, per group
    step = qw.scales.repeat_interleave(64 // k_groups, dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    # the largest magnitude of each group is on the grid's edge: exactly representable
    assert torch.allclose(deq.abs().amax(1), w.abs().amax(1), rtol=1e-6)
    # quantizing the dequantized weight with the same scales gives the same codes
    assert torch.equal(quantize_weight(deq, bits, group, scales=qw.scales).codes, qw.codes)
    assert torch.allclose(fake_quant_weight(w, bits, group), deq)


def test_weight_scales_per_group_match_absmax():
    w = torch.arange(32.0).reshape(2, 16) - 10
    s = weight_scales(w, 4, group_size=8)
    assert s.shape == (2, 2)
    assert torch.allclose(s * 7, w.reshape(2, 2, 8).abs().amax(2))


def test_activation_per_token_and_static():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, 32, generator=g) * torch.linspace(0.1, 10, 10)[None, :, None]
    for bits in (4, 8):
        y = fake_quant_tokens(x, bits)
        step = x.abs().amax(-1, keepdim=True) / qmax(bits)
        assert ((y - x).abs() <= step / 2 + 1e-6).all()  # per-token scale: small tokens stay precise
    scale = 0.05
    y = fake_quant_static(x, 8, scale)
    inside = x.abs() <= 127 * scale
    assert ((y - x).abs()[inside] <= scale / 2 + 1e-6).all()
    assert (~inside).any()  # the example has values beyond the static range ...
    assert y.abs().max() <= 128 * scale + 1e-6  # ... and they are clipped


def test_activation_fast_path_matches_autograd_path():
    # without grad, fake_quant_tokens takes an in-place path with max(amax, -amin) as max|x|:
    # the same numbers, bit for bit, as the differentiable path
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 7, 48, generator=g) * 3
    x[0, 0] = 0.0  # an all-zero token: the clamped scale, no NaN
    x[1, 2, 5] = -50.0  # a token whose max |x| is a negative value
    for bits in (3, 4, 8):
        fast = fake_quant_tokens(x, bits)
        slow = fake_quant_tokens(x.clone().requires_grad_(True), bits).detach()
        assert torch.equal(fast, slow)
        assert torch.equal(fake_quant_tokens(x, bits, dims=(1, 2)),
                           fake_quant_tokens(x.clone().requires_grad_(True), bits, dims=(1, 2)).detach())
    assert torch.equal(fake_quant_tokens(x, 4)[0, 0], torch.zeros(48))


def test_fp8_e4m3():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 48, generator=g)
    wq = fake_quant_weight_fp8(w)
    rel = ((wq - w).abs() / w.abs().clamp_min(1e-3))
    big = w.abs() > w.abs().amax(1, keepdim=True) / 64  # normal range of E4M3 after scaling
    assert (rel[big] <= 2 ** -4 + 1e-6).all()  # 3 mantissa bits: half an ulp is 2^-4 relative
    assert torch.allclose(wq.abs().amax(1), w.abs().amax(1))  # the channel max maps to 448 exactly
    x = torch.randn(4, 32, generator=g)
    assert ((fake_quant_tokens_fp8(x) - x).abs() <= x.abs() * 2 ** -4 + x.abs().amax(-1, keepdim=True) / 2 ** 9).all()
    assert float(fp8_e4m3(torch.tensor([1e6]), 1.0)) == FP8_MAX  # saturates


def test_identity_and_errors():
    w = torch.randn(4, 8)
    assert torch.equal(fake_quant_weight(w, 16), w) and torch.equal(fake_quant_tokens(w, 16), w)
    with pytest.raises(ValueError, match="2..8 bits"):
        quantize_weight(w, 9)
    with pytest.raises(ValueError, match="multiple of the group size"):
        quantize_weight(w, 4, group_size=3)


def test_keep_freed_memory_is_idempotent():
    import platform

    from adatsq.tools.sysinfo import keep_freed_memory

    first = keep_freed_memory()
    assert keep_freed_memory() is first  # once per process
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert first is True
    assert torch.equal(torch.ones(3000, 3000).sum(0), torch.full((3000,), 3000.0))  # allocation still works


def test_fp8_sdpa_simulates_fp8_attention():
    """FP8 attention (issue 9's option): close to exact attention, not equal; a key mask that leaves
    one key gives that key's FP8 value row exactly (its probability is exactly 1 in FP8); the
    context manager swaps torch's SDPA and puts it back."""
    import torch.nn.functional as F

    from adatsq.passes.quant import fake_quant_tokens_fp8, fp8_attention, fp8_sdpa

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 16, generator=g) for _ in range(3))
    exact = F.scaled_dot_product_attention(q, k, v)
    out = fp8_sdpa(q, k, v)
    rel = float((out - exact).norm() / exact.norm())
    assert 1e-3 < rel < 6e-2, rel  # E4M3 keeps 3 mantissa bits: ~3.7% here (head dim 16)
    mask = torch.zeros(40, 40, dtype=torch.bool)
    mask[:, 7] = True
    one = fp8_sdpa(q, k, v, attn_mask=mask)
    assert torch.equal(one, fake_quant_tokens_fp8(v)[:, :, 7:8, :].expand_as(one))
    additive = torch.zeros(40, 40).masked_fill(~mask, float("-inf"))
    assert torch.equal(fp8_sdpa(q, k, v, attn_mask=additive), one)
    original = F.scaled_dot_product_attention
    with fp8_attention():
        assert torch.equal(F.scaled_dot_product_attention(q, k, v), out)
    assert F.scaled_dot_product_attention is original
    with pytest.raises(NotImplementedError, match="causal"):
        fp8_sdpa(q, k, v, is_causal=True)
