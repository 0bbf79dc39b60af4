"""AMX-INT8 dense kernels (schedules.x86_amx): built for an explicit AMX CPU on every host, their
assembly checked; run integer-exact against numpy where the host has AMX and the OS grants it."""

import ctypes
import os

import numpy as np
import pytest
import tvm

from conftest import np_dense_acc, np_epilogue, stable_seed
from relay_passes.contract import DenseLayer
from relay_passes.rewrite_row_groups import packed_weight
from tvm_rmsmp.quant.schemes import get_scheme

#: an explicit AMX target: the kernels are built and their assembly checked on every host
AMX_TARGET = {"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": 2}


def _host_amx() -> str:
    """Why this host does not run AMX kernels ('' where it does)."""
    pretend = os.environ.get("RMSMP_TEST_HOST_ISA", "").lower()
    if pretend in ("avx2", "none"):
        return f"RMSMP_TEST_HOST_ISA={pretend}: acting as a host without AMX"
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return "no /proc/cpuinfo (not Linux)"
    if not {"amx_int8", "amx_tile"} <= flags:
        return "this CPU has no AMX-INT8"
    # ARCH_REQ_XCOMP_PERM (0x1023) for XFEATURE_XTILEDATA (18), as the kernels ask themselves
    if ctypes.CDLL(None, use_errno=True).syscall(158, 0x1023, 18) != 0:
        return "the OS refuses the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)"
    return ""


NO_AMX = _host_amx()


def _amx_target():
    return tvm.target.Target(AMX_TARGET)


def _layer(rng, m, k, n, act, shares):
    """A dense layer of ``n`` rows of the three schemes in a scattered order: ``(layer, order,
    w_int)``, ``w_int`` the rows' integer levels in output order (the reference's weights)."""
    names = ["sp2_4", "fixed_4", "fixed_8"]
    kind = rng.choice(3, size=n, p=shares)
    w_int = np.zeros((n, k), np.int64)
    groups, source = [], {}
    for gi, name in enumerate(names):
        rows = np.nonzero(kind == gi)[0]
        if not rows.size:
            groups.append((name, None, None, None))
            continue
        w_int[rows] = rng.choice(get_scheme(name).levels, size=(rows.size, k))
        stored = w_int[rows].astype(np.int8) if name == "fixed_8" else packed_weight(w_int[rows], name)
        bias = rng.integers(-1000, 1000, rows.size).astype(np.int32)
        scale = rng.uniform(0.5, 2, rows.size).astype(np.float32)
        groups.append((name, stored, bias, scale))
        source.update({c: (gi, r) for r, c in enumerate(rows)})
    keep = [gi for gi in range(3) if groups[gi][1] is not None]
    renumber = {gi: i for i, gi in enumerate(keep)}
    layer = DenseLayer((m, k), act, tuple(groups[gi] for gi in keep), tuple(groups[gi][0] != "fixed_8" for gi in keep))
    order = [(renumber[source[c][0]], source[c][1]) for c in range(n)]
    return layer, order, w_int


def _build(layer, order, target):
    from schedules.x86_layers import x86_layer_kernels

    key, name, make, consts = x86_layer_kernels(target).build(layer, order)
    func = make()
    exe = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    return func, exe, consts


@pytest.mark.parametrize("act,dot", [("uint8", "tdpbusd"), ("int8", "tdpbssd")])
def test_amx_layer_kernel_is_built_with_tile_instructions(act, dot):
    """On every host: the layer kernel for an AMX CPU configures the tile unit, multiplies
    with the tile product matching the activations' sign, and releases the tiles."""
    rng = np.random.default_rng(stable_seed(act))
    layer, order, _ = _layer(rng, 33, 77, 45, act, (0.6, 0.35, 0.05))
    func, exe, _ = _build(layer, order, _amx_target())
    assert str(func.attrs["rmsmp.cpu_kernel"]) == "x86-amx-layer"
    asm = exe.mod.inspect_source("asm")
    for insn in ("ldtilecfg", dot, "tileloadd", "tilestored", "tilerelease"):
        assert insn in asm, insn
    other = "tdpbssd" if dot == "tdpbusd" else "tdpbusd"
    assert other not in asm


LAYER_CASES = [
    # (m, k, n, activations, share of sp2_4 / fixed_4 / fixed_8 rows)
    (16, 64, 32, "uint8", (0.6, 0.35, 0.05)),
    (33, 77, 45, "int8", (0.6, 0.35, 0.05)),     # odd K and N: padded tiles, rows and columns
    (128, 200, 70, "uint8", (0.5, 0.3, 0.2)),
    (128, 130, 33, "int8", (0.0, 0.0, 1.0)),     # 8-bit rows only
    (33, 96, 40, "uint8", (1.0, 0.0, 0.0)),      # SP2 rows only
    (16, 300, 17, "int8", (0.0, 1.0, 0.0)),      # Fixed-4 rows only
]


@pytest.mark.parametrize("m,k,n,act,shares", LAYER_CASES)
def test_amx_layer_kernel_is_integer_exact(m, k, n, act, shares):
    """Rows of SP2-4, Fixed-4 and Fixed-8 in a scattered order, decoded to int8 tiles: the
    outputs equal numpy's ``float32(x @ w.T + bias) * scale`` in the order given, for random
    and extreme activations."""
    rng = np.random.default_rng(stable_seed(m, k, n, act, shares))
    layer, order, w_int = _layer(rng, m, k, n, act, shares)
    _, exe, consts = _build(layer, order, _amx_target())
    if NO_AMX:
        pytest.skip(f"built for sapphirerapids, not run: {NO_AMX}")
    bias = np.array([layer.groups[g][2][r] for g, r in order], np.int64)
    scale = np.array([layer.groups[g][3][r] for g, r in order], np.float32)
    lo, hi = (0, 255) if act == "uint8" else (-128, 127)
    for x in (rng.integers(lo, hi + 1, size=(m, k)).astype(act), np.full((m, k), lo if act == "int8" else hi, act)):
        args = [tvm.runtime.tensor(a) for a in (x, *(c for c, _ in consts), np.zeros((m, n), np.float32))]
        exe.mod["main"](*args)
        np.testing.assert_array_equal(args[-1].numpy(), np_epilogue(np_dense_acc(x, w_int), bias, scale, 1))


def test_amx_is_chosen_from_the_targets_features_and_rows(monkeypatch):
    """AMX from AMX_MIN_ROWS activation rows on, only where the target has AMX-INT8 (and
    ``RMSMP_AMX=0`` does not switch it off); fewer rows keep the VNNI kernels."""
    from schedules.x86_amx import AMX_MIN_ROWS

    rng = np.random.default_rng(0)
    kinds = {}
    for label, target, m, env in [("amx", AMX_TARGET, AMX_MIN_ROWS, "1"), ("few rows", AMX_TARGET, AMX_MIN_ROWS - 1, "1"),
                                  ("no amx", dict(AMX_TARGET, mcpu="icelake-server"), 64, "1"),
                                  ("switched off", AMX_TARGET, 64, "0")]:
        monkeypatch.setenv("RMSMP_AMX", env)
        layer, order, _ = _layer(rng, m, 64, 16, "int8", (0.5, 0.5, 0.0))
        from schedules.x86_layers import x86_layer_kernels

        key, name, make, consts = x86_layer_kernels(tvm.target.Target(target)).build(layer, order)
        kinds[label] = str(make().attrs["rmsmp.cpu_kernel"])
    assert kinds == {"amx": "x86-amx-layer", "few rows": "x86-avx512vnni-gemv",
                     "no amx": "x86-avx512vnni-layer", "switched off": "x86-avx512vnni-layer"}


def test_compiled_model_runs_its_dense_layers_on_amx(host_target):
    """A small model through ``rmsmp.compile``: its dense layers become AMX kernels (counted in
    ``exe.stats['cpu_kernels']``) for an AMX target, and on an AMX host the result equals the
    torch quantized model's, bit for bit."""
    import torch

    import tvm_rmsmp as rmsmp

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(77, 61), torch.nn.ReLU(), torch.nn.Linear(61, 45)).eval()
    calib = [torch.randn(40, 77) for _ in range(2)]
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(act_bits=8), calib)
    x = torch.randn(33, 77)
    target = host_target if not NO_AMX else _amx_target()
    exe = rmsmp.compile(q, (x,), target)
    assert exe.stats["cpu_kernels"].get("x86-amx-layer") == 2, exe.stats["cpu_kernels"]
    if NO_AMX:
        pytest.skip(f"built for sapphirerapids, not run: {NO_AMX}")
    np.testing.assert_array_equal(exe(x), q(x).detach().numpy())


def test_exported_amx_kernel_runs_in_a_process_without_this_package(tmp_path):
    """The kernel asks the OS for the tile state itself: an exported library, loaded by a fresh
    process that imports only TVM's runtime and numpy, computes the same result."""
    import subprocess
    import sys

    rng = np.random.default_rng(7)
    layer, order, w_int = _layer(rng, 16, 64, 32, "uint8", (0.6, 0.35, 0.05))
    _, exe, consts = _build(layer, order, _amx_target())
    lib = tmp_path / "amx.so"
    exe.mod.export_library(str(lib))
    if NO_AMX:
        pytest.skip(f"exported for sapphirerapids, not run: {NO_AMX}")
    x = rng.integers(0, 256, size=(16, 64)).astype(np.uint8)
    np.savez(tmp_path / "args.npz", x, *(c for c, _ in consts))
    script = ("import sys, numpy as np, tvm\n"
              "assert 'tvm_rmsmp' not in sys.modules and 'schedules' not in sys.modules\n"
              f"a = np.load({str(tmp_path / 'args.npz')!r}); arrays = [a[f'arr_{{i}}'] for i in range(len(a.files))]\n"
              f"f = tvm.runtime.load_module({str(lib)!r})['main']\n"
              "args = [tvm.runtime.tensor(v) for v in arrays + [np.zeros((16, 32), np.float32)]]\n"
              f"f(*args); np.save({str(tmp_path / 'out.npy')!r}, args[-1].numpy())\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    bias = np.array([layer.groups[g][2][r] for g, r in order], np.int64)
    scale = np.array([layer.groups[g][3][r] for g, r in order], np.float32)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), np_epilogue(np_dense_acc(x, w_int), bias, scale, 1))
