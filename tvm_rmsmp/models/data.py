"""Datasets that install offline.

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package (``scripts/_setup.sh``
installs it); the idx files are read directly.
"""

from __future__ import annotations

import gzip
import os
from typing import Tuple

import numpy as np

__all__ = ["FASHION_MNIST_DIR", "load_fashion_mnist", "fashion_mnist_split", "FASHION_MNIST_CLASSES", "VAL_IMAGES"]

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


#: Training images held out as the validation split (never trained on by the shipped ResNet-20,
#: never used for calibration or QAT by the accuracy benchmark): where rules, rounding and QAT
#: settings are chosen. The test set is only ever used for the reported numbers.
VAL_IMAGES = 5000
_VAL_SEED = 20261205  # fixes which training images are held out


def fashion_mnist_split(split: str, normalize: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of ``"fit"`` (55,000 training images), ``"val"`` (the other 5,000,
    a fixed random draw) or ``"test"`` (the 10,000 test images)."""
    if split == "test":
        return load_fashion_mnist("test", normalize)
    if split not in ("fit", "val"):
        raise ValueError(f"split must be 'fit', 'val' or 'test', got {split!r}")
    x, y = load_fashion_mnist("train", normalize)
    perm = np.random.default_rng(_VAL_SEED).permutation(len(x))
    idx = np.sort(perm[:VAL_IMAGES] if split == "val" else perm[VAL_IMAGES:])
    return x[idx], y[idx]


# ------------------------------------------------------------------------------------------
# Text data carried by registry packages (fetched once, see tvm_rmsmp.models.offline)
# ------------------------------------------------------------------------------------------
UCI_SOURCES = ("amazon", "imdb", "yelp")


def load_uci_sentiment(source: str):
    """``(sentences, labels)`` of one UCI sentiment set (1000 labelled sentences each; the
    fixtures of npm ``sentiment@5.0.2``; entries without text are dropped)."""
    import json

    from .offline import npm_files

    if source not in UCI_SOURCES:
        raise ValueError(f"source must be one of {UCI_SOURCES}, got {source!r}")
    path = os.path.join(npm_files("sentiment", "5.0.2", "test/fixtures/"), f"{source}.json")
    try:
        with open(path) as f:
            rows = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable UCI sentiment fixture: {err}") from err
    rows = [r for r in rows if isinstance(r, dict) and isinstance(r.get("text"), str) and r.get("class") in (0, 1)]
    return [r["text"] for r in rows], np.array([r["class"] for r in rows], dtype=np.int64)


def load_word_similarity(name: str):
    """``(word pairs, human scores)`` of ``wordsim353`` or ``simlex999`` (from gensim's test data)."""
    from .offline import pypi_files

    files = {"wordsim353": "wordsim353.tsv", "simlex999": "simlex999.txt"}
    if name not in files:
        raise ValueError(f"name must be one of {sorted(files)}, got {name!r}")
    path = os.path.join(pypi_files("gensim", "4.4.0", "gensim/test/test_data/"), files[name])
    pairs, scores = [], []
    with open(path, encoding="utf8") as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            try:
                score = float(parts[2])
            except (IndexError, ValueError):
                continue  # header line
            pairs.append((parts[0], parts[1]))
            scores.append(score)
    if not pairs:
        raise ValueError(f"{path}: no word pairs read")
    return pairs, np.array(scores)
