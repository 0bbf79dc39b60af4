"""The built-in demo model: a small CNN for Fashion-MNIST, with weights shipped in the package.

Retrain with ``python -m tvm_rmsmp.models.fmnist_cnn --epochs 4`` (writes the checkpoint
next to this file); the shipped checkpoint was made by exactly that command.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from torch import nn

__all__ = ["FashionCNN", "load_pretrained", "CHECKPOINT"]

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
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} missing; train it with python -m tvm_rmsmp.models.fmnist_cnn")
    model = FashionCNN()
    try:
        state = load_file(path)
    except Exception as err:
        raise ValueError(f"checkpoint {path} is corrupt: {err}") from err
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match FashionCNN: missing {missing}, unexpected {unexpected}")
    return model.eval()


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += int((model(torch.from_numpy(x[i:i + batch])).argmax(1).numpy() == y[i:i + batch]).sum())
    return correct / len(x)


def train(epochs: int, out: str, seed: int = 0, batch: int = 128, lr: float = 2e-3) -> float:
    from safetensors.torch import save_file

    from tvm_rmsmp.data import load_fashion_mnist

    torch.manual_seed(seed)
    np.random.seed(seed)
    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    model = FashionCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * (len(xtr) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    rng = np.random.default_rng(seed)
    for ep in range(epochs):
        model.train()
        t0 = time.time()
        perm = rng.permutation(len(xtr))
        for i in range(len(xtr) // batch):
            idx = perm[i * batch:(i + 1) * batch]
            xb = torch.from_numpy(xtr[idx])
            if rng.random() < 0.5:  # horizontal flip: clothes are left-right symmetric
                xb = xb.flip(-1)
            loss = nn.functional.cross_entropy(model(xb), torch.from_numpy(ytr[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        acc = evaluate(model, xte, yte)
        print(f"epoch {ep + 1}/{epochs}: loss {loss.item():.3f}, test acc {acc:.4f}, {time.time() - t0:.0f}s", flush=True)
    tmp = out + ".tmp"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, out)
    return acc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=CHECKPOINT)
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    train(args.epochs, args.out, args.seed)


if __name__ == "__main__":
    main()
