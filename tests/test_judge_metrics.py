"""Tests of the evaluation metrics (tools/metrics.py) and the shipped Fashion-MNIST judge (tools/judge.py).

Metric tests compare against closed forms and against direct, slow reference implementations written
here independently of the vectorised code. Judge tests need the Fashion-MNIST idx files
(``apt-get install dataset-fashion-mnist`` or ``ADATSQ_FMNIST_DIR``); without them they are skipped,
except those that only need the shipped files.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from adatsq.errors import InputError
from adatsq.tools import fmnist
from adatsq.tools import metrics as M
from adatsq.tools.judge import FEATURE_DIM, Judge, default_folder

HAVE_DATA = all((fmnist.data_dir() / name).is_file()
                for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"))
needs_data = pytest.mark.skipif(not HAVE_DATA, reason=f"Fashion-MNIST not found in {fmnist.data_dir()} "
                                f"(apt-get install dataset-fashion-mnist, or set ADATSQ_FMNIST_DIR)")


def random_spd(rng: np.random.Generator, d: int, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal((d, rank or 2 * d))
    return a @ a.T / a.shape[1]


def images(rng: np.random.Generator, n: int = 4, h: int = 28, w: int = 28, lo: int = 0, hi: int = 256):
    return rng.integers(lo, hi, size=(n, h, w), dtype=np.uint8)


# ============================================================================== Fréchet distance / FID
def test_frechet_identical_stats_is_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(32), random_spd(rng, 32)
    assert M.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_frechet_identity_covariance_mean_offset():
    rng = np.random.default_rng(1)
    d = rng.standard_normal(16) * 3
    mu1 = rng.standard_normal(16)
    eye = np.eye(16)
    assert M.frechet_distance(mu1, eye, mu1 + d, eye) == pytest.approx(float(d @ d), rel=1e-10)


def test_frechet_diagonal_closed_form():
    # commuting (diagonal) covariances: tr term = sum (sqrt(a_i) - sqrt(b_i))^2
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0.1, 4, 10), rng.uniform(0.1, 4, 10)
    mu1, mu2 = rng.standard_normal(10), rng.standard_normal(10)
    expected = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("d", [8, 128])
def test_frechet_matches_eigendecomposition_reference(d):
    """Reference: tr((S1 S2)^(1/2)) from the eigendecomposition of the non-symmetric product S1 S2
    (similar to an SPD matrix: real, positive eigenvalues), sqrtm = V diag(sqrt(w)) V^-1."""
    rng = np.random.default_rng(d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    w, v = np.linalg.eig(s1 @ s2)
    covmean = (v * np.sqrt(w.astype(complex))) @ np.linalg.inv(v)
    assert abs(np.trace(covmean).imag) < 1e-8
    ref = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)
    # symmetric in its two Gaussians
    assert M.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ref, rel=1e-6)


def test_frechet_singular_covariances():
    rng = np.random.default_rng(3)
    s1, s2 = random_spd(rng, 20, rank=5), random_spd(rng, 20, rank=3)
    mu = np.zeros(20)
    value = M.frechet_distance(mu, s1, mu, s2)
    assert np.isfinite(value) and value > 0
    assert M.frechet_distance(mu, s1, mu, s1) == pytest.approx(0.0, abs=1e-9)


def test_sqrtm_psd():
    rng = np.random.default_rng(4)
    a = random_spd(rng, 12)
    s = M.sqrtm_psd(a)
    np.testing.assert_allclose(s @ s, a, atol=1e-12)
    np.testing.assert_allclose(s, s.T, atol=1e-14)


def test_feature_stats_and_fid():
    rng = np.random.default_rng(5)
    f = rng.standard_normal((200, 6)) @ rng.standard_normal((6, 6)) + 2
    mu, sigma = M.feature_stats(f)
    np.testing.assert_allclose(mu, f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), rtol=1e-10)
    assert M.fid(f, mu, sigma) == pytest.approx(0.0, abs=1e-9)
    # shifting every feature by a vector c moves FID by exactly ||c||^2
    c = np.arange(6.0)
    assert M.fid(f + c, mu, sigma) == pytest.approx(float(c @ c), rel=1e-8)


# ============================================================================== PSNR
@pytest.mark.parametrize("c", [1, 5, 37])
def test_psnr_constant_difference(c):
    rng = np.random.default_rng(c)
    a = images(rng, hi=200)
    b = (a.astype(np.int64) + c).astype(np.uint8)
    np.testing.assert_allclose(M.psnr(a, b), 20 * np.log10(255 / c), rtol=1e-12)
    np.testing.assert_allclose(M.psnr(b, a), 20 * np.log10(255 / c), rtol=1e-12)


def test_psnr_identical_and_mean_cap():
    rng = np.random.default_rng(6)
    a = images(rng, n=2, hi=200)
    b = a.copy()
    b[1] += 5
    values = M.psnr(a, b)
    assert values[0] == np.inf
    assert values[1] == pytest.approx(20 * np.log10(51))
    assert M.mean_psnr(a, b) == pytest.approx((100 + 20 * np.log10(51)) / 2)
    assert M.mean_psnr(a, a) == 100.0
    # one pixel off by one: the largest finite PSNR of a 28x28 image, below the cap
    c = a.copy()
    c[0, 0, 0] += 1
    assert M.psnr(a, c)[0] == pytest.approx(10 * np.log10(255 ** 2 * 784)) and M.psnr(a, c)[0] < 100


# ============================================================================== SSIM
def slow_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Direct definition: explicit 11x11 windows over the valid region, weighted sums, loops."""
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5 ** 2))
    w = np.outer(g, g)
    w /= w.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    x, y = x.astype(np.float64), y.astype(np.float64)
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            values.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_identical_is_one():
    rng = np.random.default_rng(7)
    a = images(rng)
    np.testing.assert_allclose(M.ssim(a, a), 1.0, rtol=0, atol=1e-12)
    flat = np.full((1, 28, 28), 17, np.uint8)
    assert M.ssim(flat, flat)[0] == pytest.approx(1.0)


def test_ssim_decreases_with_noise_and_is_symmetric():
    rng = np.random.default_rng(8)
    base = np.zeros((1, 28, 28), np.uint8)
    base[0, 6:22, 8:20] = 180  # a bright rectangle on black
    scores = []
    for level in (0, 5, 20, 60):
        noisy = np.clip(base + rng.normal(0, level, base.shape), 0, 255).round().astype(np.uint8)
        scores.append(M.ssim(base, noisy)[0])
        assert M.ssim(noisy, base)[0] == pytest.approx(scores[-1], rel=1e-12)
    assert scores[0] == pytest.approx(1.0)
    assert all(s1 > s2 for s1, s2 in zip(scores, scores[1:])), scores


@pytest.mark.parametrize("shape", [(28, 28), (13, 16), (11, 11)])
def test_ssim_matches_slow_reference(shape):
    rng = np.random.default_rng(sum(shape))
    a = images(rng, n=3, h=shape[0], w=shape[1])
    b = np.clip(a + rng.normal(0, 30, a.shape), 0, 255).astype(np.uint8)
    b[2] = images(rng, n=1, h=shape[0], w=shape[1])[0]  # unrelated image
    expected = [slow_ssim(x, y) for x, y in zip(a, b)]
    np.testing.assert_allclose(M.ssim(a, b), expected, rtol=1e-9, atol=1e-12)


# ============================================================================== feature distance
def test_feature_distance():
    fa = np.array([[3.0, 4.0], [0.0, 0.0], [6.0, 8.0]])  # norms 5, 0, 10: mean 5
    np.testing.assert_array_equal(M.feature_distance(fa, fa), 0.0)
    fb = fa + np.array([1.0, 0.0])
    np.testing.assert_allclose(M.feature_distance(fa, fb), [0.2, 0.2, 0.2])
    fb2 = fa.copy()
    fb2[2] = 0
    np.testing.assert_allclose(M.feature_distance(fa, fb2), [0, 0, 2.0])


# ============================================================================== validation
def test_validation_errors():
    rng = np.random.default_rng(9)
    a = images(rng, n=2)
    with pytest.raises(ValueError, match="shape mismatch"):
        M.psnr(a, a[:1])
    with pytest.raises(ValueError, match="shape mismatch"):
        M.ssim(a, a[:, :27])
    with pytest.raises(ValueError, match="uint8"):
        M.psnr(a.astype(np.float32), a)
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        M.ssim(a[0], a[0])
    with pytest.raises(ValueError, match="at least 11x11"):
        M.ssim(a[:, :10, :10], a[:, :10, :10])

    f = rng.standard_normal((5, 4))
    with pytest.raises(ValueError, match="shape mismatch"):
        M.feature_distance(f, f[:, :3])
    nan = f.copy()
    nan[1, 2] = np.nan
    with pytest.raises(ValueError, match="fb contains NaN"):
        M.feature_distance(f, nan)
    with pytest.raises(ValueError, match="all zero"):
        M.feature_distance(np.zeros((2, 3)), np.ones((2, 3)))
    with pytest.raises(ValueError, match="features contains NaN"):
        M.feature_stats(nan)
    with pytest.raises(ValueError, match="at least 2 samples"):
        M.feature_stats(f[:1])

    mu, sigma = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError, match="shape mismatch"):
        M.frechet_distance(mu, sigma, np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="shape mismatch"):
        M.frechet_distance(mu, np.eye(3), mu, sigma)
    with pytest.raises(ValueError, match="NaN"):
        M.frechet_distance(mu, sigma, mu + np.nan, sigma)
    bad = sigma.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="infinite"):
        M.frechet_distance(mu, bad, mu, sigma)
    with pytest.raises(ValueError, match="dimension 4, reference statistics 3"):
        M.fid(f, np.zeros(3), np.eye(3))


# ============================================================================== judge
@pytest.fixture(scope="module")
def judge() -> Judge:
    return Judge.load()


@pytest.fixture(scope="module")
def test_split():
    if not HAVE_DATA:
        pytest.skip("Fashion-MNIST not available")
    return fmnist.load("test")


def test_shipped_judge_loads(judge):
    assert judge.folder == default_folder()
    assert judge.info["arch"] == "JudgeCNN" and judge.info["feature_dim"] == FEATURE_DIM
    assert judge.info["test_accuracy"] >= 0.92
    mu, sigma = judge.reference_stats()
    assert mu.shape == (FEATURE_DIM,) and sigma.shape == (FEATURE_DIM, FEATURE_DIM)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(sigma, sigma.T, atol=1e-12)
    assert np.linalg.eigvalsh(sigma).min() > -1e-9
    assert judge.reference_count() == 10000
    total = sum(p.stat().st_size for p in default_folder().iterdir() if p.is_file())
    assert total < 2_000_000


@needs_data
def test_judge_accuracy_features_determinism(judge, test_split):
    x, y = test_split[0][:500], test_split[1][:500]
    pred = judge.predict(x)
    assert pred.dtype == np.int64 and pred.shape == (500,)
    assert (pred == y).mean() >= 0.9
    f1, f2 = judge.features(x), judge.features(x)
    assert f1.shape == (500, FEATURE_DIM) and f1.dtype == np.float64
    np.testing.assert_array_equal(f1, f2)
    logits = judge.logits(x)
    assert logits.shape == (500, 10)
    np.testing.assert_array_equal(np.argmax(logits, 1), pred)
    assert judge.features(x[:0]).shape == (0, FEATURE_DIM)


@needs_data
def test_judge_reference_stats_match_test_split(judge, test_split):
    """The shipped FID reference is the test split's features under the shipped weights: FID ~ 0.
    Half the test split is close to it; uniform noise images are far from it."""
    feats = judge.features(test_split[0])
    mu, sigma = judge.reference_stats()
    assert M.fid(feats, mu, sigma) < 1e-3
    half = M.fid(feats[:5000], mu, sigma)
    noise = M.fid(judge.features(images(np.random.default_rng(0), n=500)), mu, sigma)
    assert half < 0.05 * noise, (half, noise)


def test_judge_rejects_bad_input(judge):
    with pytest.raises(ValueError, match="uint8"):
        judge.predict(np.zeros((2, 28, 28), np.float32))
    with pytest.raises(ValueError, match="shape"):
        judge.features(np.zeros((2, 32, 32), np.uint8))


def _copy_judge(tmp_path):
    for p in default_folder().iterdir():
        if p.suffix in (".json", ".safetensors"):
            shutil.copy(p, tmp_path / p.name)
    return tmp_path


def test_corrupt_or_missing_files_raise_input_error(tmp_path):
    folder = _copy_judge(tmp_path)
    Judge.load(folder)  # the copy is fine

    weights = folder / "judge.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(InputError, match="judge.safetensors"):
        Judge.load(folder)
    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(InputError, match="judge.safetensors"):
        Judge.load(folder)
    weights.unlink()
    with pytest.raises(InputError, match="judge.safetensors: file not found"):
        Judge.load(folder)
    (folder / "judge.json").write_text("{not json")
    with pytest.raises(InputError, match="judge.json"):
        Judge.load(folder)


def test_corrupt_reference_raises_input_error(tmp_path):
    folder = _copy_judge(tmp_path)
    (folder / "fid_reference.safetensors").write_bytes(b"nope")
    judge = Judge.load(folder)
    with pytest.raises(InputError, match="fid_reference.safetensors"):
        judge.reference_stats()


def test_wrong_arch_in_json_raises_input_error(tmp_path):
    folder = _copy_judge(tmp_path)
    info = json.loads((folder / "judge.json").read_text())
    (folder / "judge.json").write_text(json.dumps({**info, "arch": "ResNet"}))
    with pytest.raises(InputError, match="judge.json.*JudgeCNN"):
        Judge.load(folder)


@needs_data
def test_train_script_smoke(tmp_path):
    """One short epoch on 1000 images: the script writes three loadable files."""
    import torch

    from adatsq.tools import train_judge

    # the script sets process-wide torch state: restore it for the other tests
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        train_judge.main(["--epochs", "1", "--train-limit", "1000", "--out", str(tmp_path), "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fid_reference.safetensors", "judge.json",
                                                          "judge.safetensors"]
    j = Judge.load(tmp_path)
    assert j.info["epochs"] == 1 and j.info["train_images"] == 1000
    assert j.reference_stats()[0].shape == (FEATURE_DIM,)
