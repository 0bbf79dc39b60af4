"""The RMSMP FPGA target: a VTA-style accelerator with a LUT shift-add core (SP2 rows) and a
DSP multiply-accumulate core (fixed-point rows), its instruction set, a functional and
cycle-level simulator, and the hardware-informed row ratio.

    import tvm_rmsmp as rmsmp
    ratio = rmsmp.fpga.derive_ratio("xc7z045")          # {"sp2_4": 0.65, "fixed_4": 0.30, "fixed_8": 0.05}
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(ratio=ratio), calib_data=[x])
    exe = rmsmp.compile(q, (x,), target="fpga:xc7z045")  # instruction streams + host code
    y = exe(x)                                           # runs on the simulator (and host ops on the CPU)
    report = exe.profile()                               # cycles per layer and unit, utilization

See docs/fpga.md.
"""

from .config import (
    AcceleratorConfig,
    ArrayShape,
    Board,
    FPGAConfig,
    known_boards,
    load_board,
)
from .ratio import core_balance, derive_ratio
from .target import fpga_target

__all__ = [
    "AcceleratorConfig", "ArrayShape", "Board", "FPGAConfig", "known_boards", "load_board",
    "derive_ratio", "core_balance", "fpga_target",
]
