"""QAT on several processes: RMSMP quantization-aware training under torch.distributed (DDP).

Run: torchrun --nproc_per_node=2 tutorials/qat_ddp.py [--epochs 3] [--steps 100]

The Hessian estimate and the row assignment run on rank 0 only and are broadcast by
prepare_qat; every rank trains on its own shard of each epoch's shuffle; rank 0 decides the
best epoch on validation images and broadcasts it; all ranks end with identical plans and
weights, and rank 0 converts the model to the integer-exact RMSMP model and checks it on the
test images. On GPUs: init_process_group("nccl") and move the model and batches to the rank's
device (``torch.cuda.set_device(rank)``); the torch side makes every tensor on the weights'
device.
"""

import argparse

import numpy as np
import torch
import torch.distributed as dist

import tvm_rmsmp as rmsmp
from tvm_rmsmp.models.data import fashion_mnist_split
from tvm_rmsmp.models.fmnist_resnet import load_pretrained
from tvm_rmsmp.models.training import evaluate

ap = argparse.ArgumentParser()
ap.add_argument("--epochs", type=int, default=3)
ap.add_argument("--steps", type=int, default=100, help="steps per epoch on each rank (batches of 64)")
args = ap.parse_args()

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)
x, y = fashion_mnist_split("fit")
xv, yv = fashion_mnist_split("val")
model = load_pretrained()
calib = [torch.from_numpy(x[i:i + 128]) for i in range(0, 512, 128)]
qat = rmsmp.prepare_qat(model, rmsmp.RMSMPConfig(act_bits=4), calib)  # Hessian on rank 0, broadcast


def batches(epoch):
    """This rank's shard of the epoch's shuffle (the same permutation on every rank)."""
    idx = np.random.default_rng(epoch).permutation(len(x))[rank::world][: 64 * args.steps]
    return [((torch.from_numpy(x[idx[i:i + 64]]),), torch.from_numpy(y[idx[i:i + 64]])) for i in range(0, len(idx), 64)]


cfg = rmsmp.QATConfig(epochs=args.epochs, lr=1e-5, distill="kl")
rmsmp.train_qat(qat, batches, None, cfg, teacher=model, val_fn=lambda m: evaluate(m, xv[:2000], yv[:2000]),
                log=print if rank == 0 else None)
if rank == 0:
    q = rmsmp.convert_qat(qat)
    xt, yt = fashion_mnist_split("test")
    print(f"fp32 {evaluate(model, xt, yt):.4f}  RMSMP A4 after QAT {evaluate(q, xt, yt):.4f} "
          f"(best epoch {qat.rmsmp_report['qat_best_epoch']}, validation {qat.rmsmp_report['qat_val']})")
dist.destroy_process_group()
