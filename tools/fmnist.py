"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (idx files), without any download.

``apt-get install dataset-fashion-mnist`` puts the four idx.gz files in
``/usr/share/datasets/fashion-mnist``; ``ADATSQ_FMNIST_DIR`` points elsewhere.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from ..errors import InputError

CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
           "ankle boot")
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def data_dir() -> Path:
    return Path(os.environ.get("ADATSQ_FMNIST_DIR", DEFAULT_DIR))


def _read_idx(path: Path, magic: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise InputError(f"{path}: Fashion-MNIST not found (apt-get install dataset-fashion-mnist, "
                         f"or set ADATSQ_FMNIST_DIR)") from None
    except (OSError, EOFError) as exc:
        raise InputError(f"{path}: corrupt idx.gz file ({exc})") from None
    if len(raw) < 8 or int.from_bytes(raw[:4], "big") != magic:
        raise InputError(f"{path}: not an idx file (bad magic number)")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise InputError(f"{path}: truncated idx file ({data.size} of {int(np.prod(dims))} values)")
    return data.reshape(dims)


def load(split: str = "train", root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of the ``train`` (60k) or ``test`` (10k) split."""
    if split not in _FILES:
        raise InputError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    root = Path(root) if root is not None else data_dir()
    img_name, lbl_name = _FILES[split]
    images = _read_idx(root / img_name, 0x00000803)
    labels = _read_idx(root / lbl_name, 0x00000801).astype(np.int64)
    if len(images) != len(labels):
        raise InputError(f"{root}: {len(images)} images but {len(labels)} labels in the {split} split")
    return images, labels


def to_model_space(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] -> float32 [N, 1, 32, 32] in [-1, 1] (zero-padded to 32x32 as black background)."""
    x = images.astype(np.float32) / 127.5 - 1.0
    return np.pad(x, ((0, 0), (2, 2), (2, 2)), constant_values=-1.0)[:, None]


def from_model_space(x: np.ndarray) -> np.ndarray:
    """float [N, 1, 32, 32] in [-1, 1] -> uint8 [N, 28, 28] (crop the padding)."""
    x = np.clip((np.asarray(x)[:, 0, 2:30, 2:30] + 1.0) * 127.5, 0, 255)
    return np.round(x).astype(np.uint8)
