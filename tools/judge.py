"""The independent Fashion-MNIST judge used by ``adatsq eval``: a small CNN classifier.

``JudgeCNN`` maps a batch of 28x28 grayscale images to 10 class logits. Its *features* are the
penultimate-layer activations (the 128 values fed to the final linear head, after BatchNorm and ReLU);
``adatsq eval`` computes FID and feature distances in that space.

Input convention (fixed, also recorded in ``judge.json`` under ``"input"``): a uint8 image ``u`` becomes
``(u / 255 - MEAN) / STD`` with the Fashion-MNIST training-split pixel statistics below.

The shipped judge lives in ``adatsq/models/judge-fmnist/`` (written by ``tools/train_judge.py``):

    judge.safetensors          the state dict (float32 weights, BatchNorm running statistics)
    judge.json                 architecture, accuracies, seed, command line, CPU, training time
    fid_reference.safetensors  mean ``mu`` [128] and covariance ``sigma`` [128, 128] (float64) of the
                               judge features of the 10k Fashion-MNIST test images, and their ``count``

Only safetensors and JSON are read: never pickles.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InputError

FEATURE_DIM = 128
NUM_CLASSES = 10
IMAGE_SIZE = 28
#: Fashion-MNIST training-split pixel mean and standard deviation (of u / 255).
MEAN = 0.2860
STD = 0.3530
WEIGHTS_FILE = "judge.safetensors"
INFO_FILE = "judge.json"
REFERENCE_FILE = "fid_reference.safetensors"
#: images per forward pass when scoring; batching does not change any result beyond float rounding
#: of the underlying kernels, and a fixed batch size keeps repeated calls bit-identical.
BATCH_SIZE = 500


def default_folder() -> Path:
    """``adatsq/models/judge-fmnist``: where the shipped judge lives."""
    from ..models import MODELS_DIR

    return MODELS_DIR / "judge-fmnist"


class JudgeCNN(nn.Module):
    """Three conv stages and a 128-wide penultimate layer.

    ``[N, 1, 28, 28]`` ->
    conv3x3(1->32) BN ReLU maxpool2 -> ``[N, 32, 14, 14]`` ->
    conv3x3(32->64) BN ReLU maxpool2 -> ``[N, 64, 7, 7]`` ->
    conv3x3(64->128) BN ReLU maxpool2 -> ``[N, 128, 3, 3]`` -> flatten (1152) ->
    linear(1152->128) BN ReLU = **features** -> dropout(0.2) -> linear(128->10) = logits.

    All convolutions use padding 1 and no bias (BatchNorm follows).
    """

    def __init__(self, feature_dim: int = FEATURE_DIM, num_classes: int = NUM_CLASSES):
        super().__init__()

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True), nn.MaxPool2d(2))

        self.conv = nn.Sequential(stage(1, 32), stage(32, 64), stage(64, 128))
        self.fc = nn.Sequential(nn.Linear(128 * 3 * 3, feature_dim, bias=False), nn.BatchNorm1d(feature_dim),
                                nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations ``[N, feature_dim]`` (after BatchNorm and ReLU, before dropout)."""
        return self.fc(self.conv(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def to_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, 28, 28]`` -> float32 ``[N, 1, 28, 28]`` normalised as ``(u / 255 - MEAN) / STD``."""
    if isinstance(images, torch.Tensor):
        x = images.to(torch.float32) / 255.0
    else:
        x = torch.from_numpy(np.asarray(images, dtype=np.float32)) / 255.0
    return ((x - MEAN) / STD).unsqueeze(1)


def _check_images(images: Any) -> np.ndarray:
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise ValueError(f"judge input must be uint8 images [N, 28, 28], got dtype {arr.dtype}")
    if arr.ndim != 3 or arr.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"judge input must be uint8 images [N, 28, 28], got shape {tuple(arr.shape)}")
    return np.ascontiguousarray(arr)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises SafetensorError / OSError / ValueError on bad files
        raise InputError(f"{path}: corrupt safetensors file ({type(exc).__name__}: {exc})") from None


class Judge:
    """A loaded judge: a :class:`JudgeCNN` in eval mode plus its metadata.

    Every scoring method takes uint8 images ``[N, 28, 28]`` (numpy), runs in batches of
    :data:`BATCH_SIZE` under ``torch.inference_mode`` and is deterministic: the same images give
    bit-identical outputs on repeated calls (same process, same thread count).
    """

    def __init__(self, model: JudgeCNN, info: dict[str, Any], folder: Path | None = None):
        self.model = model.eval()
        self.info = info
        self.folder = folder
        self._reference: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def load(cls, folder: str | Path | None = None) -> "Judge":
        """Load ``judge.json`` and ``judge.safetensors`` from ``folder`` (default: the shipped judge).

        A missing, corrupt or mismatching file raises :class:`~adatsq.errors.InputError` naming it.
        """
        folder = Path(folder) if folder is not None else default_folder()
        info_path = folder / INFO_FILE
        if not info_path.is_file():
            raise InputError(f"{info_path}: file not found")
        try:
            info = json.loads(info_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{info_path}: corrupt JSON ({exc})") from None
        if not isinstance(info, dict) or info.get("arch") != "JudgeCNN":
            raise InputError(f"{info_path}: not a JudgeCNN description (\"arch\" is "
                             f"{info.get('arch') if isinstance(info, dict) else None!r})")
        feature_dim = info.get("feature_dim", FEATURE_DIM)
        if not isinstance(feature_dim, int) or feature_dim <= 0:
            raise InputError(f"{info_path}: \"feature_dim\" must be a positive integer, got {feature_dim!r}")
        inp = info.get("input", {})
        if inp and (inp.get("mean") != MEAN or inp.get("std") != STD):
            raise InputError(f"{info_path}: input normalisation {inp} differs from this judge's "
                             f"(mean {MEAN}, std {STD})")

        weights_path = folder / WEIGHTS_FILE
        state = _read_safetensors(weights_path)
        model = JudgeCNN(feature_dim=feature_dim)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise InputError(f"{weights_path}: not a JudgeCNN state dict (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        for key, ref in expected.items():
            if state[key].shape != ref.shape or state[key].dtype != ref.dtype:
                raise InputError(f"{weights_path}: {key} is {state[key].dtype} {tuple(state[key].shape)}, "
                                 f"expected {ref.dtype} {tuple(ref.shape)}")
            if state[key].is_floating_point() and not bool(torch.isfinite(state[key]).all()):
                raise InputError(f"{weights_path}: {key} holds non-finite values")
        model.load_state_dict(state)
        return cls(model, info, folder)

    # ------------------------------------------------------------------ scoring
    def _run(self, arr: np.ndarray, fn) -> torch.Tensor:
        """``fn`` over non-empty, checked images in batches of :data:`BATCH_SIZE`, concatenated."""
        with torch.inference_mode():
            return torch.cat([fn(to_input(arr[start:start + BATCH_SIZE]))
                              for start in range(0, len(arr), BATCH_SIZE)])

    def features(self, images: np.ndarray) -> np.ndarray:
        """Penultimate-layer activations, float64 ``[N, 128]`` (computed in float32)."""
        arr = _check_images(images)
        if len(arr) == 0:
            return np.zeros((0, self.model.head.in_features), np.float64)
        return self._run(arr, self.model.features).numpy().astype(np.float64)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Class logits, float32 ``[N, 10]`` (order of :data:`adatsq.tools.fmnist.CLASSES`)."""
        arr = _check_images(images)
        if len(arr) == 0:
            return np.zeros((0, self.model.head.out_features), np.float32)
        return self._run(arr, self.model).numpy()

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Predicted class labels, int64 ``[N]`` (argmax of the logits; ties go to the lower index)."""
        return np.argmax(self.logits(images), axis=1).astype(np.int64)

    # ------------------------------------------------------------------ FID reference
    def reference_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mu [128], sigma [128, 128])``, float64: mean and covariance (ddof=1) of the judge features
        of the Fashion-MNIST test split, read from ``fid_reference.safetensors`` beside the weights."""
        if self._reference is None:
            if self.folder is None:
                raise InputError("this judge was not loaded from a folder: no FID reference statistics")
            path = self.folder / REFERENCE_FILE
            ref = _read_safetensors(path)
            dim = self.model.head.in_features
            mu, sigma = ref.get("mu"), ref.get("sigma")
            if mu is None or sigma is None:
                raise InputError(f"{path}: needs tensors 'mu' and 'sigma', has {sorted(ref)}")
            if tuple(mu.shape) != (dim,) or tuple(sigma.shape) != (dim, dim):
                raise InputError(f"{path}: mu {tuple(mu.shape)} / sigma {tuple(sigma.shape)} do not match "
                                 f"feature_dim {dim}")
            mu_np, sigma_np = mu.numpy().astype(np.float64), sigma.numpy().astype(np.float64)
            if not (np.isfinite(mu_np).all() and np.isfinite(sigma_np).all()):
                raise InputError(f"{path}: non-finite values in mu or sigma")
            self._reference = (mu_np, sigma_np)
        return self._reference[0].copy(), self._reference[1].copy()

    def reference_count(self) -> int:
        """Number of images the FID reference statistics were computed from."""
        path = (self.folder or default_folder()) / REFERENCE_FILE
        count = _read_safetensors(path).get("count")
        if count is None:
            raise InputError(f"{path}: no 'count' tensor")
        return int(count.reshape(-1)[0])
