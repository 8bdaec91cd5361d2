"""Third-party quantizers (adatsq.tools.peers) on the shipped flux-fmnist model (4M parameters).

The peer tests skip when their package (the ``peers`` extra: nvidia-modelopt, torchao,
compressed-tensors) is not
installed; the error-path tests run without them. Calibration and sampling use one class, one
seed and a 2-step schedule, so each test takes seconds (torchao's CPU INT4 kernel is slow in fp32:
a few seconds for this one sample).
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

from adatsq.errors import InputError
from adatsq.frontend.reference import load_reference
from adatsq.frontend.sampling import sample
from adatsq.passes.calibration import reference_calibration
from adatsq.tools.baselines import PEERS, parse_variant, variant_method
from adatsq.tools.evaluate import EvalConfig
from adatsq.tools.peers import PeerUnavailable, check_device, cpu_peers, describe, peer_info, peer_quantized

MODULES = {"modelopt-int8-sq": "modelopt.torch.quantization", "modelopt-int4-awq": "modelopt.torch.quantization",
           "modelopt-w4a8-awq": "modelopt.torch.quantization", "ct-w4a4": "compressed_tensors.quantization",
           "ct-w3a3": "compressed_tensors.quantization", "ct-nvfp4": "compressed_tensors.quantization",
           "torchao-int8-dyn": "torchao.quantization", "torchao-int4-wo": "torchao.quantization"}
CT_PEERS = ("ct-w4a4", "ct-w3a3", "ct-nvfp4")
#: the bound on a 2-step sample's relative error where 0.25 is too tight: round-to-nearest with 4- and
#: 3-bit activations (measured: 0.27 and 0.66; NVFP4 0.13)
MAX_REL = {"ct-w4a4": 0.4, "ct-w3a3": 0.9}
#: the peers that need a CUDA GPU (modelopt's NVFP4 fake quantization has no CPU path)
GPU_PEERS = ("modelopt-nvfp4", "modelopt-nvfp4-svdquant")
#: linears quantized out of 48 (torchao's CPU INT4 cannot take x_embedder (in 4) nor proj_out (out 4))
QUANTIZED = {"modelopt-int8-sq": 48, "modelopt-int4-awq": 48, "modelopt-w4a8-awq": 48, "torchao-int8-dyn": 48,
             "torchao-int4-wo": 46, "ct-w4a4": 47, "ct-w3a3": 47, "ct-nvfp4": 47}


@pytest.fixture(scope="module")
def ref():
    return load_reference("flux-fmnist")


@pytest.fixture(scope="module")
def calib(ref):
    return reference_calibration(ref, seeds_per_class=1, classes=[3], steps=2)


def _run(ref, calib):
    """The calibration sample itself (in distribution for the static-calibrated peers)."""
    return sample(ref.denoiser, calib.sample_conditions([0]), list(calib.seeds), calib.schedule, record=False).sample


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_peer_names_are_variants():
    assert set(PEERS) == set(MODULES) | set(GPU_PEERS)
    for name in PEERS:
        assert variant_method(name) == "peer" and parse_variant(name) == PEERS[name]
        d = describe(name)  # works without the package installed
        assert d["peer"] == name and d["nominal_bits"] == dict(w=PEERS[name][0], a=PEERS[name][1])
        assert d["package"].split()[0] in ("nvidia-modelopt", "torchao", "compressed-tensors")
        assert d["devices"] == (["cuda"] if name in GPU_PEERS else ["cpu", "cuda"] if name in CT_PEERS else ["cpu"])
    assert set(cpu_peers()) == set(MODULES)
    assert [describe(n)["effective_bits"] for n in GPU_PEERS] == [4.5, 4.5]
    assert [describe(n)["effective_bits"] for n in CT_PEERS] == [4.25, 3.25, 4.5]


def test_nvfp4_peers_are_cuda_only_and_say_so_before_any_work(ref):
    for name in GPU_PEERS:
        check_device(name, "cuda:0")  # no error: the device is checked by name, not probed here
        with pytest.raises(InputError, match=f"{name}: runs on cuda only .*no CPU path.*--device cuda"):
            check_device(name, "cpu")
        with pytest.raises(InputError, match="runs on cuda only"):
            EvalConfig(variants=("fp", name)).validate()  # eval refuses before loading anything
        # x_embedder (in-features 4) has no block of 16 to scale: skipped, with the reason
        assert peer_info(ref, name)["skipped"] == [
            dict(layer="x_embedder", reason="in-features 4 not divisible by the NVFP4 block of 16")]
    with pytest.raises(InputError, match="modelopt-int8-sq: runs on cpu only"):
        check_device("modelopt-int8-sq", "cuda")


def test_modelopt_skip_turns_off_both_quantizers_of_the_layer(ref, calib, monkeypatch):
    """The NVFP4 peers' skip list goes through modelopt's own pattern matching: checked on the CPU
    with the INT8 config given the same block rule (x_embedder, in-features 4, is not quantized)."""
    pytest.importorskip("modelopt.torch.quantization")
    from adatsq.tools import peers

    monkeypatch.setitem(peers._SPECS, "modelopt-int8-sq", dict(peers._SPECS["modelopt-int8-sq"], block=16))
    with peer_quantized(ref, "modelopt-int8-sq", calib) as info:
        mods = dict(ref.denoiser.transformer.named_modules())
        assert not mods["x_embedder"].weight_quantizer.is_enabled
        assert not mods["x_embedder"].input_quantizer.is_enabled
        assert mods["proj_out"].weight_quantizer.is_enabled
    assert info["quantized_layers"] == 47 and info["activation_quantized_layers"] == 47
    assert [d["layer"] for d in info["skipped"]] == ["x_embedder"]


@pytest.mark.gpu
@pytest.mark.parametrize("name", GPU_PEERS)
def test_nvfp4_peer_on_the_gpu(ref, calib, name, record_property):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("modelopt.torch.quantization")
    original = ref.denoiser.transformer
    before = _state(original)
    ref.denoiser.to("cuda")
    try:
        fp = _run(ref, calib)
        with peer_quantized(ref, name, calib) as info:
            q = _run(ref, calib)
    finally:
        ref.denoiser.to("cpu")
    assert ref.denoiser.transformer is original
    assert all(torch.equal(before[k], v.cpu()) for k, v in _state(original).items())
    rel = float((q - fp).norm() / fp.norm())
    record_property(f"adatsq:peer {name} sample rel. error vs FP (cuda)", rel)
    assert 1e-4 < rel < 0.25, f"{name}: relative error {rel:.4g}"
    assert info["quantized_layers"] == 47 and info["activation_quantized_layers"] == 47


def test_unknown_peer(ref, calib):
    original = ref.denoiser.transformer
    with pytest.raises(InputError, match="unknown peer 'modelopt-int2'"):
        with peer_quantized(ref, "modelopt-int2", calib):
            pass
    with pytest.raises(InputError, match="unknown peer"):
        describe("nope")
    assert ref.denoiser.transformer is original


@pytest.mark.parametrize("name,module", [("modelopt-int4-awq", "modelopt"), ("torchao-int8-dyn", "torchao")])
def test_missing_package_is_a_clear_input_error(ref, calib, monkeypatch, name, module):
    for mod in list(sys.modules):
        if mod == module or mod.startswith(module + "."):
            monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    original = ref.denoiser.transformer
    with pytest.raises(PeerUnavailable) as err:
        with peer_quantized(ref, name, calib):
            pass
    msg = str(err.value)
    assert isinstance(err.value, InputError)
    assert name in msg and describe(name)["package"].split()[0] in msg and "pip install 'adatsq[peers]'" in msg
    assert "ImportError" in msg or "ModuleNotFoundError" in msg
    assert ref.denoiser.transformer is original


def test_peer_failure_is_wrapped_and_restores(ref, calib, monkeypatch):
    tq = pytest.importorskip("torchao.quantization")

    def boom(*a, **k):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(tq, "quantize_", boom)
    original = ref.denoiser.transformer
    with pytest.raises(PeerUnavailable, match=r"torchao-int8-dyn \(torchao [0-9.]+\) failed: RuntimeError: "
                                               r"kernel exploded"):
        with peer_quantized(ref, "torchao-int8-dyn", calib):
            pass
    assert ref.denoiser.transformer is original


@pytest.mark.parametrize("name", list(MODULES))
def test_peer_swaps_quantizes_and_restores(ref, calib, name, record_property):
    pytest.importorskip(MODULES[name])
    original = ref.denoiser.transformer
    before = _state(original)
    fp = _run(ref, calib)
    with peer_quantized(ref, name, calib) as info:
        assert ref.denoiser.transformer is not original
        q = _run(ref, calib)
    assert ref.denoiser.transformer is original
    after = _state(original)
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "the original weights changed"
    assert torch.equal(_run(ref, calib), fp), "the FP model's output changed after the context"
    rel = float((q - fp).norm() / fp.norm())
    record_property(f"adatsq:peer {name} sample rel. error vs FP", rel)
    assert 1e-4 < rel < MAX_REL.get(name, 0.25), f"{name}: relative error {rel:.4g}"
    assert info["quantized_layers"] == QUANTIZED[name] and info["linear_layers"] == 48
    static = peer_info(ref, name)
    assert static["quantized_layers"] == info["quantized_layers"] and static["skipped"] == info["skipped"]
    assert info["package"].endswith(describe(name)["package"].split()[-1]) and info["installed"]
    if name.startswith("modelopt-"):
        assert info["dropped_default_exclusions"] == ["*proj_out.*"]
        assert info["calibration"]["samples"] == 1 and info["calibration"]["steps"] == 2
        assert info["activation_quantized_layers"] == (0 if name == "modelopt-int4-awq" else 48)
    if name == "torchao-int4-wo":
        assert [s["layer"] for s in info["skipped"]] == ["x_embedder", "proj_out"]
    if name in CT_PEERS:  # x_embedder (in-features 4) has no group of 64 (16 for NVFP4)
        assert [s["layer"] for s in info["skipped"]] == ["x_embedder"]
        assert info["activation_quantized_layers"] == 47
        assert info.get("forward_loop_passes") == (1 if name == "ct-nvfp4" else None)


def _int_fq(x, bits, dim_groups=None):
    """Symmetric min-max quantize-dequantize as compressed-tensors defines it: scale = max|x| over
    the group / ((2^b - 1) / 2), codes clamped to [-2^(b-1), 2^(b-1) - 1]. ``dim_groups``: group
    size along the last dim (None: one scale per row of the last dim)."""
    shape = x.shape
    if dim_groups:
        x = x.unflatten(-1, (-1, dim_groups))
    scale = x.abs().amax(-1, keepdim=True) / ((2 ** bits - 1) / 2)
    q = torch.clamp(torch.round(x / scale), -2 ** (bits - 1), 2 ** (bits - 1) - 1) * scale
    return q.reshape(shape)


@pytest.mark.parametrize("name,bits", [("ct-w4a4", 4), ("ct-w3a3", 3)])
def test_compressed_tensors_int_scheme_is_the_documented_numerics(ref, calib, name, bits):
    """Our scale calibration plus compressed-tensors' forward equal the documented numerics:
    weights per group of 64, activations per token for (batch, tokens, features) inputs, and (what
    compressed-tensors' TOKEN strategy does with a 2-D input: it keeps dims 0 and 1 and reduces
    nothing, so it falls back to one scale) per tensor for (batch, features) inputs such as the
    timestep embedder's."""
    pytest.importorskip(MODULES[name])
    g = torch.Generator().manual_seed(0)
    with peer_quantized(ref, name, calib):
        mods = dict(ref.denoiser.transformer.named_modules())
        for layer, shape in [("transformer_blocks.0.attn.to_q", (2, 7, 192)),
                             ("time_text_embed.timestep_embedder.linear_2", (3, 192))]:
            m = mods[layer]
            x = torch.randn(*shape, generator=g)
            with torch.no_grad():
                y = m(x)
                xq = _int_fq(x, bits) if x.ndim == 3 else _int_fq(x.reshape(1, -1), bits).reshape(shape)
                want = torch.nn.functional.linear(xq, _int_fq(m.weight, bits, 64), m.bias)
            assert torch.allclose(y, want, rtol=1e-5, atol=1e-5), (layer, float((y - want).abs().max()))
            assert not torch.allclose(y, torch.nn.functional.linear(x, m.weight, m.bias), atol=1e-3)


def test_compressed_tensors_nvfp4_values_are_fp4_with_calibrated_global_scales(ref, calib):
    pytest.importorskip(MODULES["ct-nvfp4"])
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    with peer_quantized(ref, "ct-nvfp4", calib) as info:
        mods = dict(ref.denoiser.transformer.named_modules())
        m = mods["single_transformer_blocks.0.proj_out"]
        assert info["calibration"]["samples"] == 1
        gs = float(m.input_global_scale)
        assert math.isfinite(gs) and gs > 0 and float(m.weight_global_scale) > 0
        with torch.no_grad():
            wq = forward_quantize(m, m.weight.data, "weight", m.quantization_scheme.weights)
        # every group of 16 is an FP4 E2M1 grid scaled by its effective scale (scale / global scale)
        step = (m.weight_scale.float() / m.weight_global_scale).unsqueeze(-1)
        codes = (wq.unflatten(-1, (-1, 16)) / step).abs()
        assert torch.allclose(codes, grid[(codes.unsqueeze(-1) - grid).abs().argmin(-1)], atol=1e-4)
        assert float((wq - m.weight).norm() / m.weight.norm()) < 0.2


def test_restored_on_exception(ref, calib):
    pytest.importorskip("torchao.quantization")
    original = ref.denoiser.transformer
    with pytest.raises(KeyError):
        with peer_quantized(ref, "torchao-int8-dyn", calib):
            assert ref.denoiser.transformer is not original
            raise KeyError("inside")
    assert ref.denoiser.transformer is original


def test_torchao_int4_effective_weights_equal_the_kernel(ref):
    """The table runs torchao-int4-wo with the weights its CPU kernel effectively multiplies by
    (the kernel applied to the identity): the model output must match the kernel's."""
    pytest.importorskip("torchao.quantization")
    import copy

    from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import quantize_

    from adatsq.tools import peers

    fast = peers._torchao_quantize("torchao-int4-wo", copy.deepcopy(ref.denoiser.transformer))["model"]
    kernel = copy.deepcopy(ref.denoiser.transformer)
    skip = set(peers._skip_reasons("torchao-int4-wo", kernel))
    names = {id(m): n for n, m in kernel.named_modules()}
    quantize_(kernel, PrototypeInt4WeightOnlyConfig(group_size=peers.TORCHAO_INT4_GROUP, set_inductor_config=False),
              filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and names[id(m)] not in skip)
    g = torch.Generator().manual_seed(0)
    x, s, c = torch.randn(2, 1, 32, 32, generator=g), torch.rand(2, generator=g), torch.tensor([1, 7])
    original = ref.denoiser.transformer
    try:
        with torch.no_grad():
            ref.denoiser.transformer = fast
            y_fast = ref.denoiser(x, s, c)
            ref.denoiser.transformer = kernel
            y_kernel = ref.denoiser(x, s, c)
    finally:
        ref.denoiser.transformer = original
    assert float((y_fast - y_kernel).norm() / y_kernel.norm()) < 1e-5
    with torch.no_grad():
        assert not torch.allclose(y_fast, ref.denoiser(x, s, c), rtol=0, atol=1e-4)  # and it is quantized
