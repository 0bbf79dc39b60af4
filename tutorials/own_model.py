"""Quantize your own model: the README's walkthrough, end to end.

Run: python tutorials/own_model.py [output_dir]

1. your float model, built by a function (a *factory*: a saved model records it);
2. calibration data as they come: a DataLoader of ``(image, label)`` pairs, ``input_fn``
   picks the model input;
3. what was quantized and what stays float;
4. save the quantized model (safetensors + JSON, no pickle) and load it back, bit-equal;
5. compile for this CPU (the example input fixes the shapes), export, and run the library
   with the TVM runtime only (``tvm_rmsmp.runtime.load``: no torch);
6. the same from the command line: ``tvm-rmsmp quantize`` / ``compile`` / ``report``.
"""

import os
import sys
import tempfile

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


# 1. Your model. Any nn.Module works; Linear and Conv2d layers are quantized (BatchNorm folded
# into the convolution before), everything else, LayerNorm here, stays float.
class SmallNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )
        self.norm = nn.LayerNorm(32 * 4)
        self.head = nn.Linear(32 * 4, classes)

    def forward(self, x):
        return self.head(self.norm(self.features(x)))


def build() -> nn.Module:
    """The factory: ``own_model:build`` on the command line, or ``save_quantized(..., factory=...)``.
    (Your trained weights would be loaded here; random ones keep the tutorial self-contained.)"""
    torch.manual_seed(0)
    return SmallNet().eval()


def labelled_data(n: int = 128):
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def main(out_dir: str) -> None:
    import tvm_rmsmp as rmsmp

    model = build()

    # 2. Calibration: a DataLoader of (image, label) batches; input_fn picks the model input.
    # 128-512 samples are plenty; the default row rule (the loss Hessian) needs at least 16.
    loader = DataLoader(labelled_data(), batch_size=64)
    cfg = rmsmp.RMSMPConfig(ratio={"sp2_4": 0.60, "fixed_4": 0.35, "fixed_8": 0.05}, act_bits=8)
    q = rmsmp.quantize(model, cfg, calib_data=loader, input_fn=lambda batch: batch[0])

    # 3. What was quantized (rows per scheme) and what stays float.
    for name, plan in rmsmp.row_plans(q).items():
        print(f"quantized {name:12s} {plan.num_rows:3d} rows {plan.counts()}")
    floats = [n for n, m in q.named_modules() if n and not list(m.children()) and any(True for _ in m.parameters())
              and not getattr(m, "rmsmp_quantized_layer", False)]
    print("float:", floats)

    # 4. Save and load. The directory holds safetensors and JSON only; the architecture comes from
    # the factory it records ("own_model:build" imports this file) or from model=... at load time.
    saved = os.path.join(out_dir, "smallnet-rmsmp")
    rmsmp.save_quantized(q, saved, hessians=True, factory="own_model:build")
    q2 = rmsmp.load_quantized(saved)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = q(x).numpy()
        print("reloaded model equals the quantized one:", np.array_equal(q2(x).numpy(), ref))

    # 5. Compile for this CPU: the example input fixes the input shape (batch 4 here).
    exe = rmsmp.compile(q2, (x,), target="llvm")
    print("TVM equals the torch reference:", np.array_equal(exe(x), ref))
    lib = exe.export_library(os.path.join(out_dir, "smallnet.so"))
    from tvm_rmsmp.runtime import load  # the deployment side: TVM runtime and numpy, no torch

    print("loaded library equals the torch reference:", np.array_equal(load(lib)(x.numpy()), ref))

    # 6. The command line does the same: `tvm-rmsmp quantize --model own_model:build --calib
    # calib.npy --out DIR` (--model names the factory; --calib takes .npy/.pt tensors or a dataset
    # callable). Given a saved directory as --model, quantize re-quantizes it with the row
    # Hessians it holds (another ratio in seconds); report writes report.json (and plots).
    from tvm_rmsmp.cli.main import main as cli

    calib = os.path.join(out_dir, "calib.npy")
    np.save(calib, labelled_data().tensors[0].numpy())
    saved_cli = os.path.join(out_dir, "smallnet-more-8bit")
    cli(["quantize", "--model", saved, "--calib", calib, "--ratio", '{"sp2_4": 0.5, "fixed_4": 0.3, "fixed_8": 0.2}',
         "--out", saved_cli, "--quiet"])
    cli(["report", saved_cli, "--out", os.path.join(out_dir, "report"), "--calib", calib, "--no-plots", "--quiet"])
    print("report:", sorted(os.listdir(os.path.join(out_dir, "report"))))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
