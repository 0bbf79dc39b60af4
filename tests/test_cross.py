"""AArch64: int8 fixed rows compile to sdot, SP2 rows to shifts; libraries cross-export and
run under qemu-user (the AArch64 TVM runtime from the pinned wheels, tests/aarch64_qemu.py)."""

import re
import shutil
import struct

import numpy as np
import pytest
import torch
import tvm

import schedules
import tvm_rmsmp as rmsmp
from relay_passes.rewrite_row_groups import row_group_func
from tvm_rmsmp.compiler.targets import TARGET_NAMES

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
    x = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(11))
    cpu = rmsmp.compile(q, (x,), target="aarch64")
    path = cpu.export_library(str(tmp_path / "cpu_aarch64.so"), cc=CROSS)
    assert _elf_machine(path) == 183  # EM_AARCH64
    board = TARGET_NAMES["aarch64"]()
    mali = rmsmp.lower(q, (x,), {"kind": "opencl", "device": "mali", "host": board})[0]
    exe = tvm.compile(mali, target=tvm.target.Target({"kind": "opencl", "device": "mali", "host": board}))
    out = tmp_path / "mali_aarch64.so"
    from tvm.support import cc as _cc

    exe.export_library(str(out), fcompile=lambda o, files, **kw: _cc.create_shared(o, files, cc=CROSS, **kw))
    assert _elf_machine(out) == 183


@pytest.fixture(scope="module")
def aarch64_runner():
    """The cached AArch64 VM runner (built on first use); skips with the reason it cannot be."""
    import aarch64_qemu

    try:
        return aarch64_qemu.prepare()
    except aarch64_qemu.Unavailable as err:
        pytest.skip(f"AArch64 runner unavailable: {err}")


def _mlp():
    torch.manual_seed(21)
    return torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 10)).eval()


@pytest.mark.parametrize("case", ["resnet", "mlp_act8"])
def test_aarch64_library_runs_under_qemu_and_equals_torch(case, aarch64_runner, small_resnet, tmp_path):
    """The exported AArch64 library, loaded by TVM's AArch64 runtime (Relax VM) and run under
    qemu-aarch64, gives the torch reference's outputs bit for bit (as the x86 builds do:
    test_pipeline.py): SP2 shifts, sdot int8 rows, 4-bit rows, convolutions and dense layers."""
    import aarch64_qemu

    gen = torch.Generator().manual_seed(12)
    if case == "resnet":
        model, calib = small_resnet
        q = rmsmp.quantize(model, rmsmp.RMSMPConfig(), calib)
        x = torch.randn(2, 1, 16, 16, generator=gen)
    else:
        model = _mlp()
        calib = [torch.randn(8, 5, 48, generator=gen) for _ in range(2)]
        q = rmsmp.quantize(model, rmsmp.RMSMPConfig(act_bits=8), calib)
        x = torch.randn(1, 5, 48, generator=gen)
    exe = rmsmp.compile(q, (x,), target="aarch64")
    assert {str(s) for plan in rmsmp.row_plans(q).values() for s in plan.schemes} == {"sp2_4", "fixed_4", "fixed_8"}
    lib = exe.export_library(str(tmp_path / "model_aarch64.so"), cc=aarch64_qemu.CROSS_CXX)
    assert _elf_machine(lib) == 183
    (out,), _ = aarch64_qemu.run_library(aarch64_runner, lib, [x.numpy()], str(tmp_path))
    ref = q(x).detach().numpy()
    assert out.shape == ref.shape and out.dtype == np.float32
    np.testing.assert_array_equal(out, ref)
