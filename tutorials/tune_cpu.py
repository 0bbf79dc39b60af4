"""Tune on a CPU: MetaSchedule tuning of the row-group kernels, locally and over TVM RPC,
then compile with the records.

Run: python tutorials/tune_cpu.py [output_dir] [--trials N]

1. tune locally (candidates measured on this machine);
2. tune through an RPC tracker with a server, both started here on 127.0.0.1 (on real
   hardware the server runs on the board: ``python -m tvm.exec.rpc_server --tracker
   HOST:9190 --key my-board``, and the runner points at the workstation's tracker);
3. compile with the records; the tuned build equals the torch reference bit for bit.

On x86 with AVX2 or AVX-512 every row group runs a hand-written intrinsic kernel, and those
are not tuned: that leaves nothing to tune in this model, so on such a CPU the tutorial tunes
for the same CPU without AVX2 (``mcpu=x86-64``), where the row groups run the tunable portable
schedule, as they do on CPUs without a kernel of their own (or for an ARM board over RPC).
"""

import argparse
import os
import tempfile
import warnings

import numpy as np
import torch
from torch import nn

import tvm_rmsmp as rmsmp
from schedules.x86_intrin import TargetFeatureWarning, x86_isa
from tvm_rmsmp.runtime.rpc import LoopbackRPC

ap = argparse.ArgumentParser()
ap.add_argument("out_dir", nargs="?", default=None)
ap.add_argument("--trials", type=int, default=8, help="measurements per tuning run (a real run: hundreds)")
args = ap.parse_args()
out_dir = args.out_dir or tempfile.mkdtemp()

# A small CNN with random weights, quantized with RMSMP (60:35:5, 8-bit activations).
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                      nn.Flatten(), nn.Linear(16 * 8 * 8, 10)).eval()
q = rmsmp.quantize(model, rmsmp.RMSMPConfig(), calib_data=[torch.randn(4, 3, 8, 8) for _ in range(2)])
x = torch.randn(1, 3, 8, 8)

target = "llvm"
if x86_isa(rmsmp.resolve_target("llvm")) is not None:
    target = {"kind": "llvm", "mcpu": "x86-64", "num-cores": os.cpu_count() or 1}
    warnings.simplefilter("ignore", TargetFeatureWarning)  # no AVX2 here is the point
print("tuning target:", target)

# 1. Local tuning: records go to a JSON database in the work directory; a second call resumes.
local_dir = os.path.join(out_dir, "tuning_local")
report = rmsmp.tune(q, (x,), target, local_dir, trials=args.trials, trials_per_iter=4, progress=False)
print(f"local tuning: {report.trials} trials over {len(report.tasks)} kernels")

# 2. The same over RPC: a tracker and one server on loopback, measured through RPCRunner.
rpc_dir = os.path.join(out_dir, "tuning_rpc")
with LoopbackRPC(servers=1, key="tutorial-cpu") as rpc:
    print(f"RPC tracker on {rpc.host}:{rpc.port}, free servers: {rpc.free_servers()}")
    report = rmsmp.tune(q, (x,), target, rpc_dir, trials=args.trials, trials_per_iter=4, runner=rpc.runner(),
                        progress=False)
print(f"RPC tuning: {report.trials} trials; best seconds per kernel: "
      + ", ".join(f"{k}: {v:.2e}" for k, v in report.tasks.items() if v is not None))

# 3. Compile with the records (they outlive the servers) and check the result.
untuned = rmsmp.compile(q, (x,), target=target)
tuned = rmsmp.compile(q, (x,), target=target, tuning=rpc_dir)
print("kernels with a tuned schedule:", tuned.stats["tuned"])
print("tuned build equals the torch reference:", np.array_equal(tuned(x), q(x).detach().numpy()))
print(f"latency untuned {untuned.benchmark(x, repeat=20) * 1e6:.1f} us, tuned {tuned.benchmark(x, repeat=20) * 1e6:.1f} us")
