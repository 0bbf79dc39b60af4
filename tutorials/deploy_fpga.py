"""Deploy an RMSMP model on the FPGA accelerator (simulated): hardware-informed ratio, compile,
run bit-exact on the simulator, read the cycle profile.

The board model picks the row ratio (SP2 rows for the LUT shift-add core, fixed rows for
the DSP core), TVM schedules tile every layer to the on-chip buffers, and the instruction
stream generated from the scheduled TIR runs on the functional + cycle-level simulator.

Run: python tutorials/deploy_fpga.py [board]     (board: xc7z020 (default) or xc7z045)
"""

import sys

import numpy as np
import torch

import tvm_rmsmp as rmsmp
from tvm_rmsmp.models.data import load_fashion_mnist
from tvm_rmsmp.fpga import derive_ratio, load_board
from tvm_rmsmp.models.fmnist_cnn import load_pretrained

board = sys.argv[1] if len(sys.argv) > 1 else "xc7z020"
torch.set_num_threads(1)

# 1. The board's resources decide the ratio: both cores should finish their rows together.
print(load_board(board).summary())
ratio = derive_ratio(board)
print("derived ratio:", ratio)

# 2. Quantize the built-in Fashion-MNIST CNN at that ratio.
model = load_pretrained()
x_train, _ = load_fashion_mnist("train")
calib = [torch.from_numpy(x_train[i:i + 128]) for i in range(0, 512, 128)]
q = rmsmp.quantize(model, rmsmp.RMSMPConfig(ratio=ratio), calib_data=calib)

# 3. Compile for the FPGA: instruction streams for the quantized layers, host code for the rest.
x_test, y_test = load_fashion_mnist("test")
x = torch.from_numpy(x_test[:1])
exe = rmsmp.compile(q, (x,), target=f"fpga:{board}")
for layer in exe.layers:
    print(f"{layer.layer:14s} rows {layer.schemes}: {layer.summary()}")

# 4. Run on the simulator: integer-exact, so equal to the torch reference bit for bit.
y = exe(x)
print("simulator equals the torch reference:", np.array_equal(y, q(x).detach().numpy()))
print("prediction:", int(y.argmax()), "label:", int(y_test[0]))

# 5. The cycle model: per layer and per unit.
prof = exe.profile()
print(f"accelerator: {prof['cycles']} cycles = {prof['latency_ms']:.3f} ms at {prof['clock_mhz']:.0f} MHz "
      f"(host ops not counted)")
for layer in prof["layers"]:
    busy = layer["busy"]
    print(f"  {layer['layer']:14s} {layer['cycles']:8d} cycles; busy: LUT {busy['lut']}, DSP {busy['dsp']}, "
          f"DMA read {busy['dma_read']}, DMA write {busy['dma_write']}")
print("MAC utilization:", {k: round(v, 3) for k, v in prof["mac_utilization"].items()})
