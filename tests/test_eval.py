"""The sampling loop, the flux-fmnist reference model, RTN baselines and the `adatsq eval` harness."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from adatsq.errors import InputError
from adatsq.frontend.reference import load_reference, reference_folder
from adatsq.frontend.sampling import noise_for, sample
from adatsq.tools import fmnist
from adatsq.tools.baselines import parse_variant, quantize_activation, quantize_weight, rtn_quantized
from adatsq.tools.evaluate import EvalConfig, evaluate, grid_png, markdown

HAVE_DATA = (fmnist.data_dir() / "train-images-idx3-ubyte.gz").is_file()


@pytest.fixture(scope="module")
def ref():
    return load_reference("flux-fmnist")


def _short(ref, steps=3):
    from adatsq.tools.evaluate import _schedule

    return _schedule(ref, steps, None)


def test_reference_model_card(ref):
    assert ref.classes[3] == "dress" and len(ref.classes) == 10
    assert ref.schedule.scheduler == "FlowMatchEulerDiscreteScheduler" and ref.schedule.num_steps == 20
    assert ref.schedule.guidance == 2.0
    assert sum(p.numel() for p in ref.denoiser.transformer.parameters()) == ref.info["transformer_params"]
    assert ref.class_id("coat") == 4 and ref.class_id(7) == 7 and ref.class_id("9") == 9
    with pytest.raises(InputError, match="unknown class 'hat'"):
        ref.class_id("hat")
    with pytest.raises(InputError, match="out of range"):
        ref.class_id(10)


def test_sampling_is_batch_independent_and_recorded(ref):
    sched = _short(ref)
    seen = []
    tr = sample(ref.denoiser, torch.tensor([1, 2, 3]), [5, 6, 7], sched, on_step=lambda k, x, v: seen.append(k))
    assert seen == [0, 1, 2] and len(tr.latents) == 4 and len(tr.velocities) == 3
    assert tr.sigmas[0] == pytest.approx(1.0) and tr.sigmas[-1] == 0.0
    assert torch.equal(tr.latents[0], noise_for([5, 6, 7], (1, 32, 32)))
    # Euler steps: x_{k+1} = x_k + (sigma_{k+1} - sigma_k) v_k
    for k in range(3):
        expect = tr.latents[k] + (tr.sigmas[k + 1] - tr.sigmas[k]) * tr.velocities[k]
        torch.testing.assert_close(tr.latents[k + 1], expect, rtol=1e-5, atol=1e-5)
    alone = sample(ref.denoiser, torch.tensor([3]), [7], sched, record=False)
    torch.testing.assert_close(alone.sample, tr.sample[2:], rtol=1e-4, atol=1e-5)
    again = sample(ref.denoiser, torch.tensor([1, 2, 3]), [5, 6, 7], sched, record=False)
    assert torch.equal(again.sample, tr.sample)  # deterministic


def test_guidance_changes_the_sample(ref):
    sched = _short(ref, 2)
    a = sample(ref.denoiser, torch.tensor([0]), [0], sched, guidance=1.0, record=False).sample
    b = sample(ref.denoiser, torch.tensor([0]), [0], sched, guidance=4.0, record=False).sample
    assert (a - b).abs().max() > 1e-3


def test_rtn_quantizers():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    for bits in (4, 8):
        q = quantize_weight(w, bits)
        scale = w.abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1)
        assert (q - w).abs().le(scale / 2 + 1e-6).all()
        assert max(len(torch.unique(r)) for r in q) <= 2 ** bits
    x = torch.randn(3, 5, 64)
    assert (quantize_activation(x, 8) - x).abs().max() < x.abs().max() / 127
    assert torch.equal(quantize_weight(w, 16), w)
    assert parse_variant("w4a8-rtn") == (4, 8)
    for bad in ("w5a8-rtn", "w4a8", "gptq"):
        with pytest.raises(InputError, match="unknown variant"):
            parse_variant(bad)


def test_rtn_context_restores_weights(ref):
    tr = ref.denoiser.transformer
    before = {k: v.clone() for k, v in tr.state_dict().items()}
    name = "transformer_blocks.0.attn.to_q.weight"
    with rtn_quantized(tr, 4, 8, [name]):
        assert not torch.equal(tr.state_dict()[name], before[name])
    assert all(torch.equal(before[k], v) for k, v in tr.state_dict().items())


@pytest.mark.skipif(not HAVE_DATA, reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_eval_end_to_end_and_deterministic(tmp_path):
    cfg = EvalConfig(variants=("w8a8-rtn", "w4a8-rtn"), n=10, classes=("trouser", "bag"), steps=3, batch=4)
    judged = {}
    r1, images, seconds = evaluate(cfg, judged=judged)
    r2, _, _ = evaluate(cfg)
    assert json.dumps(r1, sort_keys=True) == json.dumps(r2, sort_keys=True)
    assert list(r1["variants"]) == ["fp", "w8a8-rtn", "w4a8-rtn"]
    fp, w8, w4 = (r1["variants"][k] for k in ("fp", "w8a8-rtn", "w4a8-rtn"))
    assert fp["psnr_vs_fp"] is None and (fp["w_bits"], fp["a_bits"]) == (16, 16)
    assert (w8["w_bits"], w8["a_bits"], w4["w_bits"]) == (8, 8, 4)
    assert set(fp["per_class_accuracy"]) == {"trouser", "bag"}
    assert w8["psnr_vs_fp"] > w4["psnr_vs_fp"] and w8["ssim_vs_fp"] > w4["ssim_vs_fp"]
    assert 0 <= fp["judge_accuracy"] <= 1 and fp["fid"] > 0
    assert images["fp"].shape == (10, 28, 28) and images["fp"].dtype == np.uint8
    md = markdown(r1, seconds)
    assert md.count("\n| ") == 4 and "w4a8-rtn" in md
    grid_png(images, fmnist.CLASSES, [1, 8] * 5, tmp_path / "g.png", columns=6)
    from PIL import Image

    im = Image.open(tmp_path / "g.png")
    assert im.size[1] > 3 * 56 and im.size[0] > 6 * 56
    # per-sample predictions and features, for paired comparisons (tools/paired.py)
    from adatsq.tools.judge import Judge
    from adatsq.tools.paired import load_per_sample, paired, save_per_sample

    labels = np.array([fmnist.CLASSES.index(c) for c in ("trouser", "bag")] * 5)
    save_per_sample(tmp_path / "s.safetensors", r1, judged, labels, list(range(10)))
    lab, per = load_per_sample([tmp_path / "s.safetensors"])
    assert np.array_equal(lab, labels) and list(per) == ["fp", "w8a8-rtn", "w4a8-rtn"]
    assert (per["w4a8-rtn"][0] == labels).mean() == pytest.approx(w4["judge_accuracy"])
    mu, sigma = Judge.load().reference_stats()
    same = paired(lab, per["w4a8-rtn"], per["w4a8-rtn"], mu, sigma, bootstrap=5)
    assert same["acc_diff"] == 0 and same["fid_diff"] == 0 and same["fid_a_lower"] == 0
    assert paired(lab, per["fp"], per["w4a8-rtn"], mu, sigma, bootstrap=0)["fid_diff"] == pytest.approx(
        fp["fid"] - w4["fid"], abs=1e-3)


@pytest.mark.parametrize("cfg, needle", [
    (EvalConfig(n=0), "positive integer"),
    (EvalConfig(n=-3), "positive integer"),
    (EvalConfig(variants=("w4a4-awq",)), "unknown variant"),
    (EvalConfig(n=4, classes=("hat",)), "unknown class 'hat'"),
    (EvalConfig(n=4, model="no-such-model"), "no-such-model"),
])
def test_eval_bad_input(cfg, needle):
    with pytest.raises(InputError, match=needle):
        evaluate(cfg)


def test_paired_comparison_counts_and_errors(tmp_path):
    from safetensors.numpy import save_file

    from adatsq.tools.paired import load_per_sample, main, paired

    rng = np.random.default_rng(0)
    n, d = 400, 6
    labels = np.arange(n) % 10
    right = labels.copy()
    a = right.copy()
    a[:20] = (labels[:20] + 1) % 10  # A misses samples 0..19
    b = right.copy()
    b[10:50] = (labels[10:50] + 1) % 10  # B misses 10..49: A alone right on 20..49, B alone on 0..9
    feats = rng.normal(size=(n, d))
    mu, sigma = np.zeros(d), np.eye(d)
    r = paired(labels, (a, feats + 1.0), (b, feats), mu, sigma, bootstrap=50)
    assert (r["a_only"], r["b_only"]) == (30, 10) and r["acc_diff"] == pytest.approx(20 / n)
    assert r["mcnemar_z"] == pytest.approx(20 / np.sqrt(40))
    d_ = np.r_[-np.ones(10), np.ones(30), np.zeros(n - 40)]
    assert r["acc_diff_se"] == pytest.approx(d_.std(ddof=1) / np.sqrt(n))
    # A's features are shifted away from the reference: its FID is higher in every resample
    assert r["fid_diff"] > 5 and r["fid_a_lower"] == 0 and r["fid_diff_se"] > 0
    meta = dict(format="adatsq.per-sample", version="1", model="m", variants='["x"]')
    save_file({"labels": labels, "seeds": np.arange(n), "pred/0": a, "features/0": feats.astype(np.float32)},
              str(tmp_path / "one.safetensors"), metadata=meta)
    save_file({"labels": labels, "seeds": np.arange(n) + 1, "pred/0": a, "features/0": feats.astype(np.float32)},
              str(tmp_path / "other.safetensors"), metadata=meta)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(InputError, match="overlap an earlier file"):
        load_per_sample([tmp_path / "one.safetensors", tmp_path / "other.safetensors"])
    # disjoint seeds pool their samples
    save_file({"labels": labels, "seeds": np.arange(n) + n, "pred/0": b, "features/0": feats.astype(np.float32)},
              str(tmp_path / "later.safetensors"), metadata=meta)
    lab, per = load_per_sample([tmp_path / "one.safetensors", tmp_path / "later.safetensors"])
    assert lab.shape == (2 * n,) and np.array_equal(per["x"][0], np.r_[a, b])
    with pytest.raises(InputError, match="not a safetensors file"):
        load_per_sample([tmp_path / "junk.safetensors"])
    with pytest.raises(InputError, match="no such file"):
        load_per_sample([tmp_path / "none.safetensors"])
    assert main([str(tmp_path / "one.safetensors"), "--pair", "x", "y"]) == 2  # unknown variant: clear error


def test_missing_or_corrupt_checkpoint(tmp_path):
    folder = tmp_path / "flux-fmnist"
    shutil.copytree(reference_folder("flux-fmnist"), folder)
    (folder / "conditioner.safetensors").write_bytes(b"\x00" * 12)
    with pytest.raises(InputError, match="conditioner.safetensors"):
        load_reference(folder)
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(InputError, match="no \\*.safetensors"):
        load_reference(folder)
    shutil.rmtree(folder)
    with pytest.raises(InputError, match="adatsq_model.json"):
        load_reference(tmp_path / "nothing-here")


def test_eval_cli_errors():
    env = {**os.environ, "COLUMNS": "200"}
    for args, needle in ((["-n", "0"], "positive integer"), (["--classes", "hat"], "unknown class 'hat'"),
                         (["--variant", "w7a7-rtn"], "unknown variant")):
        r = subprocess.run([sys.executable, "-m", "adatsq", "eval", *args], capture_output=True, text=True, env=env)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.skipif(not HAVE_DATA, reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_training_script_smoke(tmp_path):
    root = Path(__file__).resolve().parents[1]
    weights = []
    for name in ("m", "again"):
        out = tmp_path / name
        r = subprocess.run([sys.executable, str(root / "tools" / "train_flux_fmnist.py"), "--steps", "3",
                            "--batch", "8", "--out", str(out)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        weights.append((out / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes())
    m = load_reference(tmp_path / "m")
    assert m.info["training"]["steps"] == 3 and m.name == "flux-fmnist"
    assert not (tmp_path / "m-latest").exists() and not (tmp_path / "m.tmp").exists()
    assert weights[0] == weights[1]  # same seed on the CPU: bit-for-bit the same checkpoint


def test_fid_parts_split_the_fid_and_expose_the_spread():
    """FID = mean term + covariance term; a sample set narrower than the reference has spread < 1,
    and widening it (noise) can lower its FID while moving it away from the narrow set itself."""
    from adatsq.tools.metrics import fid, fid_parts
    from adatsq.tools.paired import decomposition, markdown_decomposition

    rng = np.random.default_rng(1)
    d = 8
    mu, sigma = np.zeros(d), np.eye(d)
    narrow = rng.normal(size=(4000, d)) * 0.6 + 0.3  # shifted and under-dispersed
    wide = narrow + rng.normal(size=narrow.shape) * 0.6  # the same samples plus noise
    p = fid_parts(narrow, mu, sigma)
    assert p["fid"] == pytest.approx(fid(narrow, mu, sigma)) and p["mean"] + p["cov"] == pytest.approx(p["fid"])
    assert p["mean"] == pytest.approx(d * 0.09, rel=0.1) and p["spread"] == pytest.approx(0.36, rel=0.05)
    q = fid_parts(wide, mu, sigma)
    assert q["spread"] == pytest.approx(0.72, rel=0.05) and q["cov"] < p["cov"] and q["fid"] < p["fid"]
    parts = decomposition({"fp": (None, narrow), "noisy": (None, wide)}, ["noisy"], mu, sigma)
    assert list(parts) == ["fp", "noisy"] and parts["fp"]["fd_vs_fp"] == pytest.approx(0, abs=1e-9)
    assert parts["noisy"]["fd_vs_fp"] > 0.5  # farther from FP's samples though closer to the data
    md = markdown_decomposition(parts)
    assert md.count("\n") == 4 and "| noisy |" in md
