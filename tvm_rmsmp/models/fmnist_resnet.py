"""ResNet-20 for Fashion-MNIST: the accuracy benchmark's model, weights shipped in the package.

The CIFAR ResNet-20 layout (3 stages of 3 basic blocks, widths 16/32/64, 1x1-conv shortcuts
where the shape changes) on 28x28 grey images: 19 conv layers and one dense layer, 0.27M
weights. Retrain with ``python -m tvm_rmsmp.models.fmnist_resnet --epochs 3``; the shipped
checkpoint was made by exactly that command. It trains on the 55,000 "fit" images only: the
5,000 validation images (:func:`tvm_rmsmp.models.data.fashion_mnist_split`) stay unseen, so the
accuracy benchmark can choose its settings on them.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .training import load_checkpoint, train_main

__all__ = ["ResNet20", "load_pretrained", "CHECKPOINT"]

CHECKPOINT = os.path.join(os.path.dirname(__file__), "fmnist_resnet20.safetensors")


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet-20 (widths 16/32/64) for 1x28x28 inputs and 10 classes."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, blocks: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        layers, cin = [], 16
        for stage, cout in enumerate((16, 32, 64)):
            for b in range(blocks):
                layers.append(BasicBlock(cin, cout, 2 if stage > 0 and b == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def load_pretrained(path: str = CHECKPOINT) -> ResNet20:
    return load_checkpoint(ResNet20(), path, "python -m tvm_rmsmp.models.fmnist_resnet")


def main(argv=None):
    train_main(ResNet20, CHECKPOINT, 3, __doc__, argv, holdout=True)


if __name__ == "__main__":
    main()
