"""Image-quality and fidelity metrics used by ``adatsq eval`` (numpy only).

Distribution metrics (judge feature space, see :mod:`adatsq.tools.judge`):

* :func:`feature_stats` -- mean and unbiased covariance of a feature matrix.
* :func:`frechet_distance` -- Fréchet distance between two Gaussians,
  ``||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``.
* :func:`fid` -- Fréchet distance of a feature set to reference statistics.

Paired fidelity metrics (image ``i`` of ``a`` against image ``i`` of ``b``, e.g. a quantized model's
sample against the full-precision sample from identical noise):

* :func:`psnr` / :func:`mean_psnr` -- peak signal-to-noise ratio, peak 255.
* :func:`ssim` -- structural similarity (Wang et al. 2004) on the valid region.
* :func:`feature_distance` -- L2 distance of judge features, relative to the mean feature norm.

Images are uint8 arrays ``[N, H, W]`` (grayscale, 0..255); features are real arrays ``[N, D]``.
Invalid inputs (wrong rank, shape mismatch, wrong dtype, NaN/inf) raise ``ValueError`` naming the problem.
"""

from __future__ import annotations

import numpy as np

#: PSNR assigned to identical images by :func:`mean_psnr` (the finite maximum for 8-bit images of
#: 28x28 pixels, one pixel off by one, is 10 log10(255^2 * 784) = 77.1 dB).
PSNR_CAP_DB = 100.0

# SSIM constants (Wang, Bovik, Sheikh, Simoncelli 2004)
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
SSIM_L = 255.0


# ---------------------------------------------------------------------------------------- validation
def _finite_array(name: str, x, ndim: int) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"{name} must be a numeric array, got dtype {arr.dtype}")
    if np.iscomplexobj(arr):
        raise ValueError(f"{name} must be real, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(arr.shape)}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        bad = "NaN" if np.isnan(arr).any() else "infinite"
        raise ValueError(f"{name} contains {bad} values")
    return arr


def _image_pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    """Two uint8 batches ``[N, H, W]`` of the same shape, as float64."""
    out = []
    for name, x in (("a", a), ("b", b)):
        arr = np.asarray(x)
        if arr.dtype != np.uint8:
            raise ValueError(f"images {name} must be uint8 (0..255), got dtype {arr.dtype}")
        if arr.ndim != 3:
            raise ValueError(f"images {name} must be a batch [N, H, W], got shape {tuple(arr.shape)}")
        out.append(arr)
    if out[0].shape != out[1].shape:
        raise ValueError(f"shape mismatch: images a {tuple(out[0].shape)} vs b {tuple(out[1].shape)}")
    return out[0].astype(np.float64), out[1].astype(np.float64)


def _feature_pair(fa, fb) -> tuple[np.ndarray, np.ndarray]:
    fa = _finite_array("features fa", fa, 2)
    fb = _finite_array("features fb", fb, 2)
    if fa.shape != fb.shape:
        raise ValueError(f"shape mismatch: features fa {fa.shape} vs fb {fb.shape}")
    return fa, fb


def _gaussian(name: str, mu, sigma) -> tuple[np.ndarray, np.ndarray]:
    mu = _finite_array(f"{name} mean", mu, 1)
    sigma = _finite_array(f"{name} covariance", sigma, 2)
    d = mu.shape[0]
    if sigma.shape != (d, d):
        raise ValueError(f"shape mismatch: {name} mean {mu.shape} vs covariance {sigma.shape} "
                         f"(expected ({d}, {d}))")
    return mu, sigma


# ---------------------------------------------------------------------------------------- FID
def sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix.

    ``a`` is symmetrised as ``(a + a.T) / 2``; with ``a = V diag(w) V^T`` (``numpy.linalg.eigh``), the
    result is ``V diag(sqrt(max(w, 0))) V^T``: negative eigenvalues from rounding are clipped to 0.
    """
    a = np.asarray(a, dtype=np.float64)
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet (2-Wasserstein squared) distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    ``||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))``, where the last trace is
    computed in the symmetric form: with ``s = sqrtm_psd(sigma1)``, ``(sigma1 sigma2)^(1/2)`` is similar
    to ``(s sigma2 s)^(1/2)``, so the trace is the sum of the square roots of the eigenvalues of the
    symmetric PSD matrix ``s @ sigma2 @ s`` (negative rounding eigenvalues clipped to 0). This needs no
    non-symmetric matrix square root and is stable for singular covariances. All in float64; the result
    is clipped at 0 (rounding can make the distance of equal Gaussians ~ -1e-12).
    """
    mu1, sigma1 = _gaussian("first", mu1, sigma1)
    mu2, sigma2 = _gaussian("second", mu2, sigma2)
    if mu1.shape != mu2.shape:
        raise ValueError(f"shape mismatch: means {mu1.shape} vs {mu2.shape}")
    s = sqrtm_psd(sigma1)
    m = s @ sigma2 @ s
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff) + float(np.trace(sigma1)) + float(np.trace(sigma2)) - 2.0 * tr_covmean
    return max(value, 0.0)


def fid_parts(features, ref_mu, ref_sigma) -> dict[str, float]:
    """:func:`fid` split into its two terms, and the spread behind the second one:

    * ``mean``: ``||mu - mu_ref||^2``, how far the samples' average feature is from the reference's;
    * ``cov``: ``tr(sigma) + tr(sigma_ref) - 2 tr((sigma sigma_ref)^(1/2))``, the covariance mismatch
      (``fid = mean + cov``);
    * ``spread``: ``tr(sigma) / tr(sigma_ref)``, the samples' total feature variance relative to the
      reference's (< 1: less diverse than the data).
    """
    mu, sigma = feature_stats(features)
    ref_mu, ref_sigma = _gaussian("reference", ref_mu, ref_sigma)
    if ref_mu.shape != mu.shape:
        raise ValueError(f"shape mismatch: features have dimension {mu.shape[0]}, "
                         f"reference statistics {ref_mu.shape[0]}")
    total = frechet_distance(mu, sigma, ref_mu, ref_sigma)
    diff = mu - ref_mu
    mean = float(diff @ diff)
    return dict(fid=total, mean=mean, cov=total - mean, spread=float(np.trace(sigma) / np.trace(ref_sigma)))


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """``(mu [D], sigma [D, D])``, float64: mean and unbiased (ddof=1) covariance of ``features [N, D]``.

    Needs ``N >= 2``.
    """
    f = _finite_array("features", features, 2)
    if f.shape[0] < 2:
        raise ValueError(f"features: need at least 2 samples for a covariance, got {f.shape[0]}")
    mu = f.mean(axis=0)
    centered = f - mu
    sigma = centered.T @ centered / (f.shape[0] - 1)
    return mu, sigma


def fid(features, ref_mu, ref_sigma) -> float:
    """Fréchet distance between the Gaussian fit of ``features [N, D]`` (:func:`feature_stats`) and
    the reference ``N(ref_mu, ref_sigma)``; in judge feature space this is the harness's FID."""
    return fid_parts(features, ref_mu, ref_sigma)["fid"]


# ---------------------------------------------------------------------------------------- PSNR
def psnr(a, b) -> np.ndarray:
    """Per-image PSNR in dB, float64 ``[N]``: ``10 log10(255^2 / MSE_i)`` with
    ``MSE_i = mean over pixels of (a_i - b_i)^2``; ``inf`` where the images are identical.

    ``a``, ``b``: uint8 ``[N, H, W]`` of the same shape.
    """
    x, y = _image_pair(a, b)
    mse = ((x - y) ** 2).reshape(len(x), -1).mean(axis=1)
    out = np.full(len(x), np.inf)
    nz = mse > 0
    out[nz] = 10.0 * np.log10(SSIM_L ** 2 / mse[nz])
    return out


def mean_psnr(a, b, cap: float = PSNR_CAP_DB) -> float:
    """Mean over images of :func:`psnr`, each capped at ``cap`` dB (default 100): identical images count
    as 100 dB instead of ``inf``, so the mean stays finite. (Distinct 8-bit images never reach the cap:
    their PSNR is at most 10 log10(255^2 H W) dB, 77.1 dB at 28x28.) ``nan`` for an empty batch."""
    values = psnr(a, b)
    if values.size == 0:
        return float("nan")
    return float(np.minimum(values, cap).mean())


# ---------------------------------------------------------------------------------------- SSIM
def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """1-D Gaussian weights of length ``size`` centred on the middle tap, summing to 1 (the 2-D SSIM
    window is its outer product)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of ``x [N, H, W]`` with ``outer(g, g)`` -> ``[N, H-k+1, W-k+1]``."""
    from numpy.lib.stride_tricks import sliding_window_view

    k = len(g)
    x = sliding_window_view(x, k, axis=2) @ g  # windows along W: [N, H, W-k+1, k] -> [N, H, W-k+1]
    return sliding_window_view(x, k, axis=1) @ g  # along H: [N, H-k+1, W-k+1, k] -> [N, H-k+1, W-k+1]


def ssim(a, b) -> np.ndarray:
    """Per-image SSIM, float64 ``[N]`` (Wang et al. 2004), on the **valid region** (no padding).

    Local statistics use an 11x11 Gaussian window (sigma 1.5, normalised to sum 1), evaluated only where
    the window lies fully inside the image (an (H-10)x(W-10) map, 18x18 for 28x28 images)::

        mu_x = w * x,  sigma_x^2 = w * x^2 - mu_x^2,  sigma_xy = w * (x y) - mu_x mu_y
        SSIM map = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2))

    with ``C1 = (0.01 * 255)^2`` and ``C2 = (0.03 * 255)^2``, on pixel values 0..255 (no downsampling);
    the result for image ``i`` is the mean of its map. ``ssim(x, x) == 1`` and ``ssim(a, b) == ssim(b, a)``.
    Images must be at least 11x11.
    """
    x, y = _image_pair(a, b)
    if x.shape[1] < SSIM_WINDOW or x.shape[2] < SSIM_WINDOW:
        raise ValueError(f"ssim needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {x.shape[1:]}")
    if len(x) == 0:
        return np.zeros(0)
    g = gaussian_window()
    c1 = (SSIM_K1 * SSIM_L) ** 2
    c2 = (SSIM_K2 * SSIM_L) ** 2
    mu_x, mu_y = _filter_valid(x, g), _filter_valid(y, g)
    xx, yy, xy = _filter_valid(x * x, g), _filter_valid(y * y, g), _filter_valid(x * y, g)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    var_x, var_y, cov = xx - mu_xx, yy - mu_yy, xy - mu_xy
    smap = ((2 * mu_xy + c1) * (2 * cov + c2)) / ((mu_xx + mu_yy + c1) * (var_x + var_y + c2))
    return smap.reshape(len(x), -1).mean(axis=1)


# ---------------------------------------------------------------------------------------- features
def feature_distance(fa, fb) -> np.ndarray:
    """Per-sample relative feature distance, float64 ``[N]``:
    ``||fa_i - fb_i||_2 / mean_j ||fa_j||_2``.

    ``fa`` is the reference (e.g. judge features of the full-precision images), ``fb`` the candidate
    (the quantized model's images from the same noise). Normalising by the *mean* norm of ``fa`` over the
    batch (not per sample) keeps one scale for the whole batch, so 0.05 means "5% of a typical feature
    vector's length". Raises ``ValueError`` if every ``fa`` feature vector is zero.
    """
    fa, fb = _feature_pair(fa, fb)
    if len(fa) == 0:
        return np.zeros(0)
    scale = float(np.linalg.norm(fa, axis=1).mean())
    if scale == 0.0:
        raise ValueError("features fa are all zero: the mean feature norm used for normalisation is 0")
    return np.linalg.norm(fa - fb, axis=1) / scale
