"""Training and evaluation shared by the built-in Fashion-MNIST models (plain PyTorch)."""

from __future__ import annotations

import os
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

__all__ = ["evaluate", "train_classifier", "save_checkpoint", "load_checkpoint", "train_main"]


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 1000) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on images ``x`` with labels ``y``."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += int((model(torch.from_numpy(x[i:i + batch])).argmax(1).numpy() == y[i:i + batch]).sum())
    return correct / len(x)


def train_classifier(model: nn.Module, epochs: int, seed: int = 0, batch: int = 128, lr: float = 2e-3,
                     log: Callable[[str], None] = print, holdout: bool = False) -> float:
    """AdamW + one-cycle on the Fashion-MNIST training set (random horizontal flips); returns test
    accuracy. holdout: train on the 55,000 "fit" images only, keeping the validation split unseen."""
    from tvm_rmsmp.models.data import fashion_mnist_split, load_fashion_mnist

    torch.manual_seed(seed)
    xtr, ytr = fashion_mnist_split("fit") if holdout else load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * (len(xtr) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    rng = np.random.default_rng(seed)
    acc = 0.0
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
        log(f"epoch {ep + 1}/{epochs}: loss {loss.item():.3f}, test acc {acc:.4f}, {time.time() - t0:.0f}s")
    return acc


def save_checkpoint(model: nn.Module, path: str) -> None:
    """safetensors, written atomically."""
    from safetensors.torch import save_file

    tmp = path + ".tmp"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)


def load_checkpoint(model: nn.Module, path: str, train_cmd: str) -> nn.Module:
    """Load ``path`` into ``model`` (eval mode); errors name the file and how to remake it."""
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} missing; train it with {train_cmd}")
    try:
        state = load_file(path)
    except Exception as err:
        raise ValueError(f"checkpoint {path} is corrupt: {err}") from err
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match {type(model).__name__}: "
                         f"missing {missing}, unexpected {unexpected}")
    return model.eval()


def train_main(factory: Callable[[], nn.Module], checkpoint: str, epochs: int, description: str, argv=None,
               holdout: bool = False) -> None:
    """Command line of a built-in model's training script: train from scratch, save atomically."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--epochs", type=int, default=epochs)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=checkpoint)
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(args.seed)
    model = factory()
    train_classifier(model, args.epochs, args.seed, log=lambda s: print(s, flush=True), holdout=holdout)
    save_checkpoint(model, args.out)
