"""AArch64: int8 fixed rows compile to sdot, SP2 rows to shifts; libraries cross-export."""

import re
import shutil
import struct

import pytest
import torch
import tvm

import schedules
import tvm_rmsmp as rmsmp
from relay_passes.rewrite_row_groups import row_group_func

CROSS = shutil.which("aarch64-linux-gnu-g++")
needs_cross = pytest.mark.skipif(CROSS is None, reason="apt-get install g++-aarch64-linux-gnu")


def _asm(scheme, act):
    target = rmsmp.resolve_target("aarch64")
    func = row_group_func("dense", "t", scheme, (1, 256), act, (64, 256))
    mod = schedules.apply_rules(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
    return tvm.compile(mod, target=target).mod.inspect_source("asm")


def test_fixed_rows_use_sdot_and_sp2_rows_shift():
    fixed = _asm("fixed_8", "int8")
    sp2 = _asm("sp2_4", "int8")
    assert re.search(r"\bsdot\b", fixed), "int8 fixed rows should use the dot-product instruction"
    assert not re.search(r"\b[su]dot\b", sp2)
    assert re.search(r"\b[us]shl\b|\bshl\b", sp2)


def _elf_machine(path) -> int:
    with open(path, "rb") as fh:
        head = fh.read(20)
    assert head[:4] == b"\x7fELF"
    return struct.unpack("<H", head[18:20])[0]


@needs_cross
def test_cpu_and_mali_libraries_cross_export_for_aarch64(tmp_path, small_resnet):
    model, calib = small_resnet
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(), calib)
    x = torch.randn(1, 1, 16, 16)
    cpu = rmsmp.compile(q, (x,), target="aarch64")
    path = cpu.export_library(str(tmp_path / "cpu_aarch64.so"), cc=CROSS)
    assert _elf_machine(path) == 183  # EM_AARCH64
    board = rmsmp.targets.TARGET_NAMES["aarch64"]()
    mali = rmsmp.lower(q, (x,), {"kind": "opencl", "device": "mali", "host": board})[0]
    exe = tvm.compile(mali, target=tvm.target.Target({"kind": "opencl", "device": "mali", "host": board}))
    out = tmp_path / "mali_aarch64.so"
    from tvm.support import cc as _cc

    exe.export_library(str(out), fcompile=lambda o, files, **kw: _cc.create_shared(o, files, cc=CROSS, **kw))
    assert _elf_machine(out) == 183
