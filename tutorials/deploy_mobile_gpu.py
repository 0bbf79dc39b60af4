"""Deploy an RMSMP model to a mobile GPU (Mali / Adreno) through OpenCL.

1. quantize the built-in Fashion-MNIST CNN with RMSMP;
2. compile it for ``target="mali"``: row-group kernels with the GPU schedules, the rest with
   TVM's dlight GPU rules (``target="mali-dot"`` for a Mali G76 or later: fixed rows that
   meet int8 activations use its ``arm_dot_acc``; this CNN's activations are unsigned, so
   the two builds are the same here);
3. run the OpenCL kernels here, on PoCL (a real OpenCL implementation on the CPU), and check
   them against the torch reference and the CPU build, bit for bit;
4. export the library for the device. For an AArch64 Linux board with a Mali GPU, give
   ``--cross aarch64`` (needs Debian's ``g++-aarch64-linux-gnu``): the host part is then
   cross-compiled. On the device, TVM's runtime with OpenCL support loads it::

       import tvm
       from tvm import relax
       lib = tvm.runtime.load_module("fmnist_mali.so")
       vm = relax.VirtualMachine(lib, tvm.opencl(0))
       y = vm["main"](tvm.runtime.tensor(x, tvm.opencl(0)))

   or from this machine over TVM's RPC (an Android phone runs TVM's RPC app, a board runs
   ``python -m tvm.exec.rpc_server``)::

       from tvm import rpc
       remote = rpc.connect("phone-or-tracker-host", 9090)
       remote.upload("fmnist_mali.so")
       lib = remote.load_module("fmnist_mali.so")
       vm = relax.VirtualMachine(lib, remote.cl(0))

Run: python tutorials/deploy_mobile_gpu.py [output_dir] [--cross aarch64]
PoCL timings printed here are a functional proxy, not a phone's speed.
"""

import argparse
import os
import shutil
import tempfile

import numpy as np
import torch

import tvm_rmsmp as rmsmp
from tvm_rmsmp.models.data import load_fashion_mnist
from tvm_rmsmp.models.fmnist_cnn import load_pretrained
from tvm_rmsmp.compiler.targets import TARGET_NAMES, host_cpu_target

ap = argparse.ArgumentParser()
ap.add_argument("out_dir", nargs="?", default=None)
ap.add_argument("--cross", choices=["aarch64"], default=None, help="cross-compile the host part for AArch64 Linux")
args = ap.parse_args()
out_dir = args.out_dir or tempfile.mkdtemp()

# 1. Quantize (post-training, 512 calibration images).
model = load_pretrained()
x_train, _ = load_fashion_mnist("train")
calib = [torch.from_numpy(x_train[i:i + 128]) for i in range(0, 512, 128)]
q = rmsmp.quantize(model, rmsmp.RMSMPConfig(), calib_data=calib)

# 2. Compile for a Mali GPU (OpenCL); the host part for this machine so PoCL can run it.
x_test, y_test = load_fashion_mnist("test")
x = torch.from_numpy(x_test[:16])
mali = rmsmp.compile(q, (x,), target="mali")
print("work-group sizes of the row-group kernels:",
      sorted({int(np.prod(l.block)) for f in mali.graph.funcs.values() if f.name.startswith("rmsmp_") for l in f.launches}))

# 3. Run on PoCL and compare with the torch reference and the CPU build.
y_gpu = mali(x)
y_ref = q(x).detach().numpy()
y_cpu = rmsmp.compile(q, (x,), target="llvm")(x)
print("OpenCL (PoCL) equals the torch reference:", np.array_equal(y_gpu, y_ref))
print("OpenCL (PoCL) equals the CPU build:", np.array_equal(y_gpu, y_cpu))
print("accuracy on these 16 images:", float((y_gpu.argmax(1) == y_test[:16]).mean()))
print(f"PoCL wall time per batch of 16 (proxy, not a phone): {mali.benchmark(x, repeat=5) * 1e3:.1f} ms")

# 4. Export for the device.
if args.cross == "aarch64":
    cc = shutil.which("aarch64-linux-gnu-g++")
    if cc is None:
        raise SystemExit("--cross aarch64 needs aarch64-linux-gnu-g++ (apt-get install g++-aarch64-linux-gnu)")
    board = dict(TARGET_NAMES["aarch64"]())
    device = rmsmp.compile(q, (x,), target={"kind": "opencl", "device": "mali", "host": board})
    path = device.export_library(os.path.join(out_dir, "fmnist_mali_aarch64.so"), cc=cc)
else:
    path = mali.export_library(os.path.join(out_dir, "fmnist_mali.so"))
print("exported", path, "(host:", args.cross or host_cpu_target()["mcpu"], ")")
