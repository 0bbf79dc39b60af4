"""The built-in demo model: a small CNN for Fashion-MNIST, with weights shipped in the package.

Retrain with ``python -m tvm_rmsmp.models.fmnist_cnn --epochs 4`` (writes the checkpoint
next to this file); the shipped checkpoint was made by exactly that command.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .training import (
    evaluate,
    load_checkpoint,
    save_checkpoint,
    train_classifier,
    train_main,
)

__all__ = ["FashionCNN", "load_pretrained", "CHECKPOINT", "evaluate"]

CHECKPOINT = os.path.join(os.path.dirname(__file__), "fmnist_cnn.safetensors")


class FashionCNN(nn.Module):
    """3 conv blocks (Conv-BN-ReLU) and 2 dense layers; 28x28x1 in, 10 logits out."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


def load_pretrained(path: str = CHECKPOINT) -> FashionCNN:
    return load_checkpoint(FashionCNN(), path, "python -m tvm_rmsmp.models.fmnist_cnn")


def train(epochs: int, out: str, seed: int = 0) -> float:
    torch.manual_seed(seed)
    model = FashionCNN()
    acc = train_classifier(model, epochs, seed)
    save_checkpoint(model, out)
    return acc


def main(argv=None):
    train_main(FashionCNN, CHECKPOINT, 4, __doc__, argv)


if __name__ == "__main__":
    main()
