"""``target="fpga:<board>"``: the TVM target the FPGA schedules and the compiler key on."""

from __future__ import annotations

from typing import Dict

from ..runtime.host import host_cpu_target
from .config import load_board

__all__ = ["fpga_target", "FPGA_DEVICE"]

FPGA_DEVICE = "rmsmp_fpga"


def fpga_target(board: str) -> Dict[str, object]:
    """TVM's ``ext_dev`` kind (the one VTA used), the board as its ``model``, this CPU as host."""
    cfg = load_board(board)  # raises for an unknown board, listing the known ones
    return {"kind": "ext_dev", "device": FPGA_DEVICE, "model": board if board.endswith(".json") else cfg.name,
            "host": host_cpu_target()}
