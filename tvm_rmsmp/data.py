"""Datasets that install offline.

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package (``scripts/_setup.sh``
installs it); the idx files are read directly.
"""

from __future__ import annotations

import gzip
import os
from typing import Tuple

import numpy as np

__all__ = ["FASHION_MNIST_DIR", "load_fashion_mnist", "FASHION_MNIST_CLASSES"]

FASHION_MNIST_DIR = os.environ.get("RMSMP_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
#: Mean and standard deviation of the training pixels (scaled to [0, 1]).
FASHION_MNIST_NORM = (0.2860, 0.3530)


def _read_idx(path: str, magic: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} not found: install Debian's dataset-fashion-mnist package "
            "(apt-get install dataset-fashion-mnist) or set RMSMP_FASHION_MNIST_DIR"
        ) from None
    except (OSError, EOFError) as err:
        raise ValueError(f"{path} is not a readable gzip idx file: {err}") from err
    got = int.from_bytes(data[:4], "big")
    if got != magic:
        raise ValueError(f"{path}: bad idx magic {got:#x}, expected {magic:#x}")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: truncated ({arr.size} values for shape {dims})")
    return arr.reshape(dims)


def load_fashion_mnist(split: str = "test", normalize: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """``(images float32 [N, 1, 28, 28], labels int64 [N])`` for ``split`` in {"train", "test"}."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(os.path.join(FASHION_MNIST_DIR, f"{prefix}-images-idx3-ubyte.gz"), 0x803)
    labels = _read_idx(os.path.join(FASHION_MNIST_DIR, f"{prefix}-labels-idx1-ubyte.gz"), 0x801)
    x = images.astype(np.float32)[:, None] / 255.0
    if normalize:
        x = (x - FASHION_MNIST_NORM[0]) / FASHION_MNIST_NORM[1]
    return x.astype(np.float32), labels.astype(np.int64)
