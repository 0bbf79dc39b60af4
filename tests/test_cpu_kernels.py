"""Row-group kernels on the CPU (LLVM): integer-exact against numpy, SP2 without multiplies."""

import os
import re
import warnings

import numpy as np
import pytest
import tvm

import schedules
from conftest import mixed_conv_layer, np_conv_acc, np_dense_acc, np_epilogue, stable_seed
from relay_passes.rewrite_row_groups import group_weight, packed_weight, row_group_func
from tvm_rmsmp.quant.schemes import get_scheme, pack_nibbles


def _build(func, target):
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    mod = schedules.apply_rules(mod, target)
    assert mod["main"].attrs["tirx.is_scheduled"], "the CPU rule did not apply"
    return tvm.compile(mod, target=target)


def _random_rows(rng, scheme, shape):
    return rng.choice(get_scheme(scheme).levels, size=shape).astype(np.int8)


def _random_act(rng, dtype, shape):
    lo, hi = (0, 255) if dtype == "uint8" else (-127, 127)
    return rng.integers(lo, hi + 1, size=shape).astype(dtype)


def _run(exe, *arrays):
    args = [tvm.runtime.tensor(a) for a in arrays]
    exe.mod["main"](*args)
    return args[-1].numpy()


DENSE_CASES = [
    # (lead shape, K, rows, act dtype, scheme)
    ((1,), 64, 8, "uint8", "sp2_4"),
    ((1,), 200, 13, "int8", "fixed_4"),
    ((3,), 77, 5, "uint8", "fixed_8"),
    ((4,), 128, 16, "int8", "sp2_4"),
    ((10,), 48, 7, "uint8", "sp2_4"),
    ((10,), 48, 7, "int8", "fixed_8"),
    ((8,), 1000, 33, "uint8", "fixed_8"),
    ((1,), 3, 1, "int8", "sp2_4"),
    ((1,), 256, 24, "int8", "fixed_4"),   # VNNI: 64-byte steps (vector_bytes)
    ((1,), 256, 9, "uint8", "fixed_8"),
]


@pytest.mark.parametrize("lead,k,rows,act,scheme", DENSE_CASES)
def test_dense_row_group_is_integer_exact(lead, k, rows, act, scheme, host_target):
    rng = np.random.default_rng(stable_seed(lead, k, rows, act, scheme))
    x = _random_act(rng, act, lead + (k,))
    w_int = _random_rows(rng, scheme, (rows, k))
    exe = _build(row_group_func("dense", "t", scheme, x.shape, act, (rows, k)), host_target)
    acc = np_dense_acc(x, w_int)
    # bias 0, scale 1: the output is float32(acc), exact while |acc| < 2^24
    assert np.abs(acc).max() < 2**24
    out = _run(exe, x, group_weight(w_int, scheme), np.zeros(rows, np.int32), np.ones(rows, np.float32),
               np.zeros(lead + (rows,), np.float32))
    np.testing.assert_array_equal(out.astype(np.int64), acc)
    # the epilogue: float32(acc + bias) * scale, bit for bit
    bias = rng.integers(-10**6, 10**6, rows).astype(np.int32)
    scale = rng.uniform(1e-4, 1e-2, rows).astype(np.float32)
    out = _run(exe, x, group_weight(w_int, scheme), bias, scale, np.zeros(lead + (rows,), np.float32))
    np.testing.assert_array_equal(out, np_epilogue(acc, bias.astype(np.int64), scale, acc.ndim - 1))


CONV_CASES = [
    # (N, C, H, W, F, kh, kw, stride, padding, dilation, act, scheme)
    (1, 3, 8, 8, 4, 3, 3, (1, 1), (1, 1), (1, 1), "int8", "sp2_4"),
    (1, 5, 9, 7, 6, 3, 3, (2, 2), (1, 1), (1, 1), "uint8", "fixed_4"),
    (2, 4, 10, 10, 3, 1, 1, (1, 1), (0, 0), (1, 1), "uint8", "fixed_8"),
    (1, 8, 12, 12, 8, 3, 3, (1, 1), (2, 2), (2, 2), "uint8", "sp2_4"),
    (1, 2, 7, 9, 5, 5, 3, (1, 2), (2, 1), (1, 1), "int8", "fixed_8"),
    (1, 16, 20, 20, 16, 3, 3, (1, 1), (1, 1), (1, 1), "uint8", "sp2_4"),
    (1, 3, 33, 33, 4, 7, 7, (2, 2), (3, 3), (1, 1), "int8", "fixed_4"),
]


@pytest.mark.parametrize("n,c,h,w,f,kh,kw,stride,padding,dilation,act,scheme", CONV_CASES)
def test_conv2d_row_group_is_integer_exact(n, c, h, w, f, kh, kw, stride, padding, dilation, act, scheme, host_target):
    rng = np.random.default_rng(stable_seed(n, c, h, w, f, kh, kw, stride, padding, dilation, act, scheme))
    x = _random_act(rng, act, (n, c, h, w))
    w_int = _random_rows(rng, scheme, (f, c, kh, kw))
    conv = {"strides": list(stride), "padding": list(padding), "dilation": list(dilation)}
    exe = _build(row_group_func("conv2d", "t", scheme, x.shape, act, w_int.shape, conv), host_target)
    acc = np_conv_acc(x, w_int, stride, padding, dilation)
    bias = rng.integers(-1000, 1000, f).astype(np.int32)
    scale = rng.uniform(0.5, 2, f).astype(np.float32)
    out = _run(exe, x, group_weight(w_int, scheme), bias, scale, np.zeros(acc.shape, np.float32))
    np.testing.assert_array_equal(out, np_epilogue(acc, bias.astype(np.int64), scale, 1))
    zero = _run(exe, x, group_weight(w_int, scheme), np.zeros(f, np.int32), np.ones(f, np.float32),
                np.zeros(acc.shape, np.float32))
    np.testing.assert_array_equal(zero.astype(np.int64), acc)


_DEF = re.compile(r"^\s*(%[\w.]+)\s*=\s*(.*)$")


def _data_multiplies(llvm_ir: str):
    """Multiplies whose operands derive from the kernel's int8/uint8 data (x and w loads).

    A value is data if it is an ``i8`` load or is computed from data; index and
    thread-partitioning arithmetic never touches the 8-bit buffers, so it is not flagged.
    """
    defs = {}
    for line in llvm_ir.splitlines():
        m = _DEF.match(line)
        if m:
            defs[m.group(1)] = m.group(2)
    data = set()
    changed = True
    while changed:
        changed = False
        for name, rhs in defs.items():
            if name in data:
                continue
            is_byte_load = re.match(r"load (<\d+ x )?i8\b", rhs) is not None
            uses_data = any(op in data for op in re.findall(r"%[\w.]+", rhs))
            if is_byte_load or (uses_data and not rhs.startswith(("load", "getelementptr", "store"))):
                data.add(name)
                changed = True
    found = []
    for name, rhs in defs.items():
        if re.match(r"mul\b", rhs) and any(op in data for op in re.findall(r"%[\w.]+", rhs)):
            found.append(f"{name} = {rhs}")
        elif re.search(r"@llvm\.[\w.]*(pmadd|pmul|sdot|udot|vpdp)", rhs) and any(op in data for op in re.findall(r"%[\w.]+", rhs)):
            found.append(f"{name} = {rhs}")
    return found


@pytest.mark.parametrize("op", ["dense", "conv2d"])
def test_sp2_kernel_has_no_multiply_on_the_data_path(op, host_target):
    conv = {"strides": [1, 1], "padding": [1, 1], "dilation": [1, 1]}
    x_shape, w_shape = ((4, 256), (16, 256)) if op == "dense" else ((1, 8, 16, 16), (8, 8, 3, 3))
    sp2 = _build(row_group_func(op, "t", "sp2_4", x_shape, "uint8", w_shape, conv), host_target)
    # the checker's control: the fixed-point group on the portable schedule (an x86 host with
    # AVX2 gives it an intrinsic kernel, whose products read int16 copies of the bytes)
    portable = _x86_target("x86-64") if _host_isas(host_target) else host_target
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fixed = _build(row_group_func(op, "t", "fixed_8", x_shape, "uint8", w_shape, conv), portable)
    ir_sp2 = sp2.mod.inspect_source("ll")
    ir_fixed = fixed.mod.inspect_source("ll")
    assert _data_multiplies(ir_fixed), "the checker must see the fixed kernel's multiplies"
    assert _data_multiplies(ir_sp2) == []
    assert re.search(r"\bshl\b", ir_sp2), "SP2 products are shifts"


@pytest.mark.parametrize("scheme", ["sp2_4", "fixed_4"])
@pytest.mark.parametrize("op,xs,ws,conv", [
    ("dense", (3, 77), (9, 77), None),
    ("dense", (1, 256), (16, 256), None),
    ("conv2d", (1, 5, 9, 9), (6, 5, 3, 3), {"strides": [1, 1], "padding": [0, 0], "dilation": [1, 1]}),
    ("conv2d", (2, 3, 11, 11), (4, 3, 3, 3), {"strides": [2, 2], "padding": [0, 0], "dilation": [1, 1]}),
])
@pytest.mark.parametrize("act", ["uint8", "int8"])
def test_packed_4bit_rows_are_integer_exact(scheme, op, xs, ws, conv, act, host_target):
    """Two codes per byte (odd reduction lengths included), decoded in the kernel."""
    rng = np.random.default_rng(stable_seed(scheme, op, xs, act))
    x = _random_act(rng, act, xs)
    w_int = _random_rows(rng, scheme, ws)
    exe = _build(row_group_func(op, "t", scheme, xs, act, ws, conv, packed=True), host_target)
    acc = np_dense_acc(x, w_int) if op == "dense" else np_conv_acc(x, w_int, conv["strides"], (0, 0), (1, 1))
    bias = rng.integers(-1000, 1000, ws[0]).astype(np.int32)
    scale = rng.uniform(0.5, 2, ws[0]).astype(np.float32)
    packed = packed_weight(w_int, scheme)
    assert packed.nbytes * 2 >= w_int.size and packed.nbytes < w_int.size
    out = _run(exe, x, packed, bias, scale, np.zeros(acc.shape, np.float32))
    np.testing.assert_array_equal(out, np_epilogue(acc, bias.astype(np.int64), scale, acc.ndim - 1 if op == "dense" else 1))


@pytest.mark.parametrize("op", ["dense", "conv2d"])
def test_packed_sp2_kernel_has_no_multiply_on_the_data_path(op, host_target):
    """The portable packed SP2 kernel (AArch64 here: LLVM IR only) shifts; the x86 one decodes
    to int8 and multiplies (vpdpbusd / vpmaddubsw), which the checker must see."""
    conv = {"strides": [1, 1], "padding": [0, 0], "dilation": [1, 1]}
    x_shape, w_shape = ((4, 256), (16, 256)) if op == "dense" else ((1, 8, 16, 16), (8, 8, 3, 3))
    func = row_group_func(op, "t", "sp2_4", x_shape, "uint8", w_shape, conv, packed=True)
    arm = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
    assert _data_multiplies(_build(func, arm).mod.inspect_source("ll")) == []
    if _host_isas(host_target):
        assert _data_multiplies(_build(func, host_target).mod.inspect_source("ll"))


# ----- x86 intrinsic kernel for packed 4-bit dense rows ----------------------------------------
def _x86_target(mcpu):
    return tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": 2})


def _host_isas(host_target):
    from schedules.x86_intrin import x86_isa

    best = x86_isa(host_target)
    return {None: [], "avx2": ["avx2"], "avx512vnni": ["avx2", "avx512vnni"]}[best]


# Every x86 kernel ISA is built on every host, from an explicit target (not the host's, which
# would only ever build the host's best ISA): AVX2 alone (``haswell``), AVX-512 VNNI without
# VBMI (``cascadelake``) and with it (``icelake-server``). Each build's assembly is checked for
# its ISA's MAC; it is run against numpy wherever the host can execute it (an AVX-512 host runs
# the AVX2 kernels too), and where it cannot the test skips after the checks, saying so.
def _detect_host():
    from tvm.target.codegen import target_has_features

    from schedules.x86_intrin import x86_isa
    from tvm_rmsmp.compiler.targets import resolve_target

    host = resolve_target("llvm")
    isa = x86_isa(host)
    vbmi = isa == "avx512vnni" and bool(target_has_features("avx512vbmi", host))
    # RMSMP_TEST_HOST_ISA=avx2|none: the ISA-parametrized tests act as on a host with less (to
    # check on a VNNI machine what an AVX2 or non-x86 host runs, compiles and skips); never more
    pretend = os.environ.get("RMSMP_TEST_HOST_ISA", "").lower()
    order = [None, "avx2", "avx512vnni"]
    if pretend in ("none", "avx2") and order.index(None if pretend == "none" else pretend) < order.index(isa):
        return (None if pretend == "none" else pretend), False
    return isa, vbmi


HOST_ISA, HOST_VBMI = _detect_host()
ISA_MCPU = {("avx2", False): "haswell", ("avx512vnni", False): "cascadelake", ("avx512vnni", True): "icelake-server"}
#: instructions each ISA's integer kernels must contain, and must not
ISA_ASM = {"avx2": (("vpmaddwd",), ("vpdpbusd", "zmm")), "avx512vnni": (("vpdpbusd",), ())}


def isa_runs_here(isa: str, vbmi: bool = False) -> bool:
    if isa == "avx2":
        return HOST_ISA in ("avx2", "avx512vnni")
    return HOST_ISA == "avx512vnni" and (HOST_VBMI or not vbmi)


def isa_target(isa: str, vbmi: bool = False):
    return _x86_target(ISA_MCPU[(isa, vbmi)])


def isa_cases(cases, representative, full="host"):
    """Parameters for a kernel test over ISAs (each case starts with its ISA): every case for
    the host's own ISA (``full="host"``: the one the compiler picks here) or for every ISA the
    host runs (``full="runnable"``); for the others only the cases in ``representative``."""
    keep = []
    for case in cases:
        vbmi = len(case) > 1 and case[1] is True  # (isa, vbmi, ...) cases
        whole = isa_runs_here(case[0], vbmi) and (case[0] == HOST_ISA or full != "host")
        if whole or case in representative:
            keep.append(case)
    return keep


def compile_checked(mod, isa: str, vbmi: bool = False, check=None):
    """``tvm.compile`` for ``isa``'s explicit target, its assembly checked (``ISA_ASM``, and
    ``check(asm)`` if given)."""
    target = isa_target(isa, vbmi)
    if isinstance(mod, tvm.tirx.PrimFunc):
        mod = tvm.IRModule({"main": mod.with_attr("global_symbol", "main")})
    exe = tvm.compile(mod, target=target)
    asm = exe.mod.inspect_source("asm")
    present, absent = ISA_ASM[isa]
    for insn in present:
        assert insn in asm, f"{isa} ({ISA_MCPU[(isa, vbmi)]}): expected {insn}"
    for insn in absent:
        assert insn not in asm, f"{isa} ({ISA_MCPU[(isa, vbmi)]}): {insn} must not appear"
    if check is not None:
        check(asm)
    return exe


def skip_unless_runs_here(isa: str, vbmi: bool = False, checked: str = ""):
    if not isa_runs_here(isa, vbmi):
        checked = checked or f"assembly checked ({', '.join(ISA_ASM[isa][0])})"
        pytest.skip(f"built for {ISA_MCPU[(isa, vbmi)]}, {checked}; not run: "
                    f"this host ({HOST_ISA or 'no AVX2'}{', no VBMI' if HOST_ISA == 'avx512vnni' and not HOST_VBMI else ''}) cannot "
                    f"execute {isa}{' + VBMI' if vbmi else ''}")


def compile_for_isa(mod, isa: str, vbmi: bool = False, check=None):
    """:func:`compile_checked`, then skip where this host cannot run ``isa``."""
    exe = compile_checked(mod, isa, vbmi, check)
    skip_unless_runs_here(isa, vbmi)
    return exe


def test_isa_targets_have_the_features_their_kernels_need():
    from schedules.x86_intrin import x86_isa
    from tvm.target.codegen import target_has_features

    for (isa, vbmi), mcpu in ISA_MCPU.items():
        target = isa_target(isa, vbmi)
        assert x86_isa(target) == isa, mcpu
        assert bool(target_has_features("avx512vbmi", target)) == vbmi, mcpu


PACKED_DENSE_CASES = [(isa, vec, scheme, act, m, k, n)
                      for isa, vec in [("avx2", 32), ("avx512vnni", 32), ("avx512vnni", 64)]
                      for scheme in ["sp2_4", "fixed_4"] for act in ["uint8", "int8"]
                      for m, k, n in [(1, 128, 4), (1, 256, 13), (3, 384, 9), (5, 128, 17)]]


@pytest.mark.parametrize("isa,vec,scheme,act,m,k,n", isa_cases(PACKED_DENSE_CASES, [
    ("avx2", 32, "sp2_4", "int8", 5, 128, 17), ("avx2", 32, "fixed_4", "uint8", 1, 256, 13),
    ("avx512vnni", 32, "fixed_4", "int8", 3, 384, 9), ("avx512vnni", 64, "sp2_4", "uint8", 1, 256, 13)],
    full="runnable"))
def test_x86_packed_dense_kernel_is_integer_exact(isa, vec, scheme, act, m, k, n):
    """vpshufb decode + vpdpbusd / vpmaddubsw+vpmaddwd, with partial row and batch tiles; built
    for each ISA's own target, run wherever the host can (every case), else a few compiled."""
    from schedules.x86_intrin import packed_dense_kernel
    from tvm_rmsmp.quant.schemes import nibble_decode

    rng = np.random.default_rng(stable_seed(isa, vec, scheme, act, m, k, n))
    lo, hi = (0, 255) if act == "uint8" else (-128, 127)  # -128 included: |x| = 128 still fits
    x = rng.integers(lo, hi + 1, size=(m, k)).astype(act)
    w_int = _random_rows(rng, scheme, (n, k))
    func = packed_dense_kernel(m, k, n, act, nibble_decode(np.arange(16), get_scheme(scheme)), isa, vec=vec)
    exe = compile_for_isa(func, isa)
    acc = np_dense_acc(x, w_int)
    bias = rng.integers(-1000, 1000, n).astype(np.int32)
    scale = rng.uniform(0.5, 2, n).astype(np.float32)
    out = _run(exe, x, packed_weight(w_int, scheme), bias, scale, np.zeros((m, n), np.float32))
    np.testing.assert_array_equal(out, np_epilogue(acc, bias.astype(np.int64), scale, 1))
    # extreme values: every activation at the bound, every weight at the largest level
    x_max = np.full((m, k), lo if act == "int8" else hi, dtype=act)
    w_max = np.full((n, k), get_scheme(scheme).levels.max(), dtype=np.int8)
    out = _run(exe, x_max, packed_weight(w_max, scheme), np.zeros(n, np.int32), np.ones(n, np.float32),
               np.zeros((m, n), np.float32))
    np.testing.assert_array_equal(out.astype(np.int64), np_dense_acc(x_max, w_max))


def test_cpu_rule_uses_the_x86_kernel_for_packed_rows(host_target):
    if not _host_isas(host_target):
        pytest.skip("not an x86 CPU with AVX2")
    func = row_group_func("dense", "t", "sp2_4", (1, 256), "uint8", (16, 256), packed=True)
    mod = schedules.apply_rules(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), host_target)
    assert str(mod["main"].attrs["rmsmp.cpu_kernel"]).startswith("x86-")
    assert str(mod["main"].attrs["rmsmp.scheme"]) == "sp2_4"


X86_GEMM_CASES = [
    # (op, x shape, logical w shape, conv attrs): the row groups the pipeline builds (the
    # activation quantizer pads, so the convolutions here have padding 0)
    ("conv2d", (1, 64, 10, 10), (9, 64, 3, 3), [1, 1]),       # channels fill vector steps: direct
    ("conv2d", (2, 128, 9, 9), (11, 128, 3, 3), [2, 2]),      # direct, stride 2, two images
    ("conv2d", (1, 32, 8, 8), (6, 32, 3, 3), [1, 1]),         # direct for int8 rows, im2col for 4-bit
    ("conv2d", (1, 64, 5, 5), (20, 64, 3, 3), [1, 1]),        # more rows than pixels: im2col for 4-bit
    ("conv2d", (2, 3, 15, 15), (5, 3, 7, 7), [2, 2]),         # K = 147: padded steps, stride 2
    ("conv2d", (1, 5, 9, 9), (17, 5, 1, 1), [2, 2]),          # 1x1 stride 2, K = 5
    ("dense", (5, 256), (13, 256), None),
    ("dense", (3, 77), (7, 77), None),                        # odd K: half-empty last byte
    ("dense", (9, 96), (33, 96), None),                       # several row and batch tiles
]


X86_RULE_CASES = [(isa, *case, scheme, act) for isa in ("avx2", "avx512vnni") for case in X86_GEMM_CASES
                  for scheme in ("sp2_4", "fixed_4", "fixed_8") for act in ("uint8", "int8")]
#: the other ISA than the host's: a direct conv, an im2col conv, K = 147 with stride 2, odd-K dense
X86_RULE_OTHER_ISA = [(isa, *X86_GEMM_CASES[i], scheme, act) for isa in ("avx2", "avx512vnni")
                      for i, scheme, act in [(0, "sp2_4", "uint8"), (3, "fixed_4", "int8"), (4, "fixed_8", "int8"),
                                             (7, "fixed_8", "uint8"), (8, "sp2_4", "int8")]]


@pytest.mark.parametrize("isa,op,xs,ws,strides,scheme,act", isa_cases(X86_RULE_CASES, X86_RULE_OTHER_ISA))
def test_x86_rule_kernels_are_integer_exact(isa, op, xs, ws, strides, scheme, act):
    """Packed 4-bit groups (table decode) and int8 groups (VNNI; int16 pairs on AVX2), dense
    and im2col conv, as the CPU rule builds them for each ISA's target: every case for the
    host's own ISA, a few for the other (run where the host can, else compiled and checked)."""
    rng = np.random.default_rng(stable_seed(isa, op, xs, scheme, act))
    lo, hi = (0, 255) if act == "uint8" else (-128, 127)
    x = rng.integers(lo, hi + 1, size=xs).astype(act)
    w_int = _random_rows(rng, scheme, ws)
    packed = scheme != "fixed_8"
    conv = None if strides is None else {"strides": strides, "padding": [0, 0], "dilation": [1, 1]}
    mod = tvm.IRModule({"main": row_group_func(op, "t", scheme, xs, act, ws, conv, packed=packed)
                        .with_attr("global_symbol", "main")})
    mod = schedules.apply_rules(mod, isa_target(isa))
    assert str(mod["main"].attrs["rmsmp.cpu_kernel"]) == f"x86-{isa}-{'table-decode' if packed else 'int8'}"
    exe = compile_for_isa(mod, isa)
    acc = np_dense_acc(x, w_int) if op == "dense" else np_conv_acc(x, w_int, strides, (0, 0), (1, 1))
    bias = rng.integers(-1000, 1000, ws[0]).astype(np.int32)
    scale = rng.uniform(0.5, 2, ws[0]).astype(np.float32)
    w = packed_weight(w_int, scheme) if packed else w_int
    out = _run(exe, x, w, bias, scale, np.zeros(acc.shape, np.float32))
    np.testing.assert_array_equal(out, np_epilogue(acc, bias.astype(np.int64), scale, acc.ndim - 1 if op == "dense" else 1))


@pytest.mark.parametrize("op", ["dense", "conv2d"])
def test_int8_rows_on_avx2_multiply_int16_pairs(op):
    """AVX2 has no exact 8-bit x 8-bit byte MAC (vpmaddubsw saturates): int8 rows get the
    kernel's int16 form, vpmaddwd, and never VNNI's instruction (code generation only)."""
    target = _x86_target("znver3")
    conv = {"strides": [1, 1], "padding": [0, 0], "dilation": [1, 1]} if op == "conv2d" else None
    xs, ws = ((1, 32, 6, 6), (16, 32, 3, 3)) if conv else ((4, 256), (16, 256))
    func = row_group_func(op, "t", "fixed_8", xs, "int8", ws, conv)
    mod = schedules.apply_rules(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
    assert str(mod["main"].attrs["rmsmp.cpu_kernel"]) == "x86-avx2-int8"
    asm = tvm.compile(mod, target=target).mod.inspect_source("asm")
    assert "vpmaddwd" in asm and "vpdpbusd" not in asm and "vpmaddubsw" not in asm


@pytest.mark.parametrize("mcpu,present,absent", [
    ("znver3", ["vpshufb", "vpmaddubsw", "vpmaddwd"], ["vpdpbusd", "zmm"]),   # AVX2, no AVX-512
    ("znver4", ["vpshufb", "vpdpbusd"], ["vpmaddubsw"]),                     # AVX-512 VNNI
])
def test_x86_kernel_emits_only_the_targets_instructions(mcpu, present, absent):
    """Code generation only (no run): each target gets its own MAC, never one it lacks."""
    target = _x86_target(mcpu)
    func = row_group_func("dense", "t", "fixed_4", (1, 256), "uint8", (16, 256), packed=True)
    mod = schedules.apply_rules(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
    asm = tvm.compile(mod, target=target).mod.inspect_source("asm")
    for insn in present:
        assert insn in asm, f"{mcpu}: expected {insn}"
    for insn in absent:
        assert insn not in asm, f"{mcpu}: {insn} must not appear"


def test_x86_target_without_avx2_falls_back_with_a_warning():
    from schedules.x86_intrin import TargetFeatureWarning

    target = _x86_target("x86-64")  # SSE2 only
    func = row_group_func("dense", "t", "sp2_4", (1, 256), "uint8", (16, 256), packed=True)
    with pytest.warns(TargetFeatureWarning, match="no AVX2"):
        mod = schedules.apply_rules(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
    assert "rmsmp.cpu_kernel" not in mod["main"].attrs
    asm = tvm.compile(mod, target=target).mod.inspect_source("asm")
    assert "vpshufb" not in asm and "ymm" not in asm


@pytest.mark.parametrize("act", ["uint8", "int8"])
@pytest.mark.parametrize("k", [64, 77])
def test_packed_sp2_decode_lowering_is_integer_exact(act, k, host_target):
    """The generic packed SP2 kernel with the decode-then-multiply product."""
    rng = np.random.default_rng(k)
    x = _random_act(rng, act, (2, k))
    w_int = _random_rows(rng, "sp2_4", (6, k))
    func = row_group_func("dense", "t", "sp2_4", x.shape, act, w_int.shape, packed=True, sp2_lowering="decode")
    assert str(func.attrs["rmsmp.sp2_lowering"]) == "decode"
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mod = schedules.apply_rules(mod, _x86_target("x86-64"))  # generic schedule (no x86 kernel)
    exe = tvm.compile(mod, target=host_target)
    out = _run(exe, x, packed_weight(w_int, "sp2_4"), np.zeros(6, np.int32), np.ones(6, np.float32),
               np.zeros((2, 6), np.float32))
    np.testing.assert_array_equal(out.astype(np.int64), np_dense_acc(x, w_int))


# ----- float operators between RMSMP layers ----------------------------------------------------
def _legalized(build):
    """The legalized PrimFuncs of a one-op Relax function ``build(bb, *vars)``."""
    from tvm import relax

    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType([1, 4, 32, 24], "float32"))
    b = relax.Var("b", relax.TensorType([1, 4, 24, 48], "float32"))
    with bb.function("main", [a, b]):
        with bb.dataflow():
            out = bb.emit_output(build(a, b))
        bb.emit_func_output(out)
    mod = relax.transform.LegalizeOps()(bb.get())
    return {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}


def _run_prim(func, target, *arrays):
    exe = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    return _run(exe, *arrays)


def test_float_matmul_rule_is_parallel_vectorized_and_bit_identical(host_target):
    """Attention's batched matmul: same summation order per output, so the same bits."""
    from tvm import relax
    from schedules.cpu import FloatMatmul

    (func,) = _legalized(lambda a, b: relax.op.matmul(a, b)).values()
    sch = FloatMatmul().apply(func, host_target, False)
    assert sch is not None
    text = sch.mod["main"].script()
    assert "T.parallel" in text and "T.vectorized" in text
    rng = np.random.default_rng(0)
    a = rng.standard_normal((1, 4, 32, 24)).astype(np.float32)
    b = rng.standard_normal((1, 4, 24, 48)).astype(np.float32)
    out = np.zeros((1, 4, 32, 48), np.float32)
    scheduled = _run_prim(sch.mod["main"], host_target, a, b, out.copy())
    plain = _run_prim(func, host_target, a, b, out.copy())
    np.testing.assert_array_equal(scheduled, plain)
    np.testing.assert_allclose(scheduled, a @ b, rtol=1e-5, atol=1e-5)


def test_float_rules_leave_softmax_and_row_groups_alone(host_target):
    """Softmax is not the matmul or element-wise rules' business, matmul not the row
    reduction's, and the row-group ops none of theirs."""
    from tvm import relax
    from schedules.cpu import FloatElementwise, FloatMatmul, FloatRowReduction

    (softmax,) = _legalized(lambda a, b: relax.op.nn.softmax(a)).values()
    assert FloatMatmul().apply(softmax, host_target, False) is None
    assert FloatElementwise().apply(softmax, host_target, False) is None
    (matmul,) = _legalized(lambda a, b: relax.op.matmul(a, b)).values()
    group = row_group_func("dense", "t", "fixed_8", (4, 256), "uint8", (16, 256))
    for rule in (FloatMatmul(), FloatElementwise(), FloatRowReduction(True), FloatRowReduction(False)):
        assert rule.apply(group, host_target, False) is None
    assert FloatRowReduction(True).apply(matmul, host_target, False) is None


def _legalized_op(build, shapes, fuse: bool = False):
    """The PrimFuncs of ``build(*vars)`` over float32 inputs of ``shapes``, legalized (and,
    with ``fuse``, fused as the build pipeline fuses them)."""
    from tvm import relax

    bb = relax.BlockBuilder()
    params = [relax.Var(f"a{i}", relax.TensorType(list(s), "float32")) for i, s in enumerate(shapes)]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(build(*params))
        bb.emit_func_output(out)
    mod = relax.transform.LegalizeOps()(bb.get())
    if fuse:
        mod = relax.transform.FuseTIR()(relax.transform.FuseOps()(relax.transform.AnnotateTIROpPattern()(mod)))
    return [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]


def _np_layer_norm(x, g, b):
    x = x.astype(np.float64)
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * g + b


def _np_softmax(x):
    e = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("case", ["layer_norm", "layer_norm_256", "softmax"])
def test_float_row_reduction_rule(case, host_target):
    """LayerNorm / softmax: rows in parallel, blocks per row. Without ``reassociate`` the same
    bits as the unscheduled function; with it (fast-math builds) each sum is split into
    vectorized partial sums (rfactor) and the result stays within float rounding. A row of
    256 = 16 x 16 leaves two loops of 16 under the row; only one can be vectorized."""
    from tvm import relax
    from schedules.cpu import FloatElementwise, FloatMatmul, FloatRowReduction

    rng = np.random.default_rng(5)
    if case.startswith("layer_norm"):
        c = 256 if case == "layer_norm_256" else 200
        shapes = [(96, c), (c,), (c,)]
        (func,) = _legalized_op(lambda x, g, b: relax.op.nn.layer_norm(x, g, b, axes=[-1]), shapes)
        reference = _np_layer_norm
    else:
        shapes = [(3, 40, 96)]
        (func,) = _legalized_op(lambda x: relax.op.nn.softmax(x, axis=-1), shapes)
        reference = _np_softmax
    inputs = [(rng.standard_normal(s) * 3 + 1).astype(np.float32) for s in shapes]
    out = np.zeros(shapes[0], np.float32)
    assert FloatMatmul().apply(func, host_target, False) is None
    assert FloatElementwise().apply(func, host_target, False) is None
    plain = _run_prim(func, host_target, *inputs, out.copy())
    exact = FloatRowReduction(reassociate=False).apply(func, host_target, False)
    fast = FloatRowReduction(reassociate=True).apply(func, host_target, False)
    assert exact is not None and fast is not None
    exact_text, fast_text = exact.mod["main"].script(), fast.mod["main"].script()
    assert "T.parallel" in exact_text and "T.vectorized" in fast_text
    # sums split into partial sums only with reassociate; max (softmax) either way: exact
    assert fast_text.count("_rf_update") == 2
    assert exact_text.count("_rf_update") == (1 if case == "softmax" else 0)
    np.testing.assert_array_equal(_run_prim(exact.mod["main"], host_target, *inputs, out.copy()), plain)
    result = _run_prim(fast.mod["main"], host_target, *inputs, out.copy())
    # a reassociated sum errs by a few ulps of the row's magnitude, also where x - mean cancels
    scale_atol = max(2e-6, 4 * float(np.finfo(np.float32).eps) * float(np.abs(plain).max()))
    np.testing.assert_allclose(result, plain, rtol=1e-5, atol=scale_atol)
    np.testing.assert_allclose(result, reference(*inputs), rtol=1e-4, atol=1e-5)


def test_float_elementwise_rule_runs_gelu_in_parallel(host_target):
    from tvm import relax
    from schedules.cpu import FloatElementwise

    funcs = _legalized(lambda a, b: relax.op.nn.gelu(relax.op.reshape(relax.op.matmul(a, b), [1, 4, 32, 48])))
    gelu = funcs["gelu"]
    sch = FloatElementwise().apply(gelu, host_target, False)
    assert sch is not None and "T.parallel" in sch.mod["main"].script()
    x = np.random.default_rng(1).standard_normal((1, 4, 32, 48)).astype(np.float32)
    out = np.zeros_like(x)
    np.testing.assert_array_equal(_run_prim(sch.mod["main"], host_target, x, out.copy()),
                                  _run_prim(gelu, host_target, x, out.copy()))


def test_float_elementwise_rule_splits_the_loop_where_concatenated_groups_meet(host_target):
    """concat(row groups) -> GELU: one loop per group, no per-element select, same bits."""
    from tvm import relax
    from schedules.cpu import FloatElementwise

    (func,) = _legalized_op(lambda *parts: relax.op.nn.gelu(relax.op.concat(list(parts), axis=1)),
                            [(2, 37), (2, 20), (2, 7)], fuse=True)
    sch = FloatElementwise().apply(func, host_target, False)
    assert sch is not None
    text = sch.mod["main"].script()
    assert text.count("_partition") == 3, text  # loops over [0, 37), [37, 57), [57, 64)
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((2, n)).astype(np.float32) for n in (37, 20, 7)]
    out = np.zeros((2, 64), np.float32)
    np.testing.assert_array_equal(_run_prim(sch.mod["main"], host_target, *xs, out.copy()),
                                  _run_prim(func, host_target, *xs, out.copy()))


def _gelu_module(shape=(4, 1000)):
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(list(shape), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.gelu(x))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("fast_math", [True, False])
def test_fast_math_gelu_is_vectorized_and_as_accurate_as_torch(fast_math, host_target):
    """fast_math: no libm call per element; the largest error stays at torch's own level
    (its vectorized GELU: 1.2e-6 on these inputs). Without it, libm's erff as TVM emits it."""
    import math

    from tvm import relax

    pipeline = schedules.build_pipeline(host_target, fast_math=fast_math)
    exe = tvm.compile(_gelu_module(), target=host_target, relax_pipeline=pipeline)
    ll = exe.mod.imports[0].inspect_source("ll") if exe.mod.imports else exe.mod.inspect_source("ll")
    assert ("@erff(" in ll) != fast_math
    x = (np.random.default_rng(3).standard_normal((4, 1000)) * 3).astype(np.float32)
    vm = relax.VirtualMachine(exe, tvm.cpu())
    y = vm["main"](tvm.runtime.tensor(x)).numpy()
    exact = x.astype(np.float64) * 0.5 * (1 + np.vectorize(math.erf)(x.astype(np.float64) / np.sqrt(2)))
    assert np.abs(y - exact).max() < 1.2e-6


@pytest.mark.parametrize("fast_math", [True, False])
def test_layer_norm_reassociated_only_in_fast_math_builds(fast_math, host_target):
    """The build pipeline's row-reduction rule splits LayerNorm's sums (rfactor) only when
    fast math is on; without it the result is bit-identical to TVM's own build."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([64, 768], "float32"))
    g = relax.Var("g", relax.TensorType([768], "float32"))
    b = relax.Var("b", relax.TensorType([768], "float32"))
    with bb.function("main", [x, g, b]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.layer_norm(x, g, b, axes=[-1]))
        bb.emit_func_output(out)
    mod = bb.get()
    rng = np.random.default_rng(6)
    inputs = [rng.standard_normal(s).astype(np.float32) for s in ((64, 768), (768,), (768,))]

    def run(exe):
        return relax.VirtualMachine(exe, tvm.cpu())["main"](*[tvm.runtime.tensor(a) for a in inputs]).numpy()

    ours = run(tvm.compile(mod, target=host_target, relax_pipeline=schedules.build_pipeline(host_target, fast_math)))
    tvm_own = run(tvm.compile(mod, target=host_target))
    if fast_math:
        np.testing.assert_allclose(ours, tvm_own, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ours, _np_layer_norm(*inputs), rtol=1e-4, atol=1e-5)
    else:
        np.testing.assert_array_equal(ours, tvm_own)


@pytest.mark.parametrize("swap_last", [True, False])
def test_float_elementwise_rule_tiles_transpositions(swap_last, host_target):
    """Attention's head split (``[T, H*D] -> [H, T, D]``: rows of D copied whole) and K^T
    (``-> [H, D, T]``: the two innermost axes swapped, 8 x 8 tiles): same values either way."""
    from tvm import relax
    from schedules.cpu import FloatElementwise

    tokens, heads, dim = 64, 4, 32

    def build(x):
        y = relax.op.permute_dims(relax.op.reshape(x, [1, tokens, heads, dim]), [0, 2, 1, 3])
        if swap_last:
            return relax.op.reshape(relax.op.permute_dims(y, [0, 1, 3, 2]), [heads, dim, tokens])
        return relax.op.reshape(y, [heads, tokens, dim])

    (func,) = _legalized_op(build, [(1, tokens, heads * dim)], fuse=True)
    sch = FloatElementwise().apply(func, host_target, False)
    assert sch is not None
    text = sch.mod["main"].script()
    assert ("T.unroll(T.int64(8))" in text) == swap_last and "T.parallel" in text
    xs = np.random.default_rng(7).standard_normal((1, tokens, heads * dim)).astype(np.float32)
    expected = xs.reshape(tokens, heads, dim).transpose(1, 2, 0) if swap_last else xs.reshape(tokens, heads, dim).transpose(1, 0, 2)
    result = _run_prim(sch.mod["main"], host_target, xs, np.zeros(expected.shape, np.float32))
    np.testing.assert_array_equal(result, expected)


def test_tile_weights_layout():
    """[tile, step, row, byte]: rows padded to whole tiles, bytes to whole steps, with zeros."""
    from schedules.x86_intrin import tile_weights

    w = np.arange(5 * 70, dtype=np.int64).reshape(5, 70).astype(np.uint8)
    t = tile_weights(w, 4, 32)
    assert t.shape == (2, 3, 4, 32) and t.dtype == np.uint8 and t.flags.c_contiguous
    for row in range(8):
        for col in range(96):
            expected = w[row, col] if row < 5 and col < 70 else 0
            assert t[row // 4, col // 32, row % 4, col % 32] == expected


def test_weight_layouts_reject_mismatched_shapes():
    from schedules.x86_intrin import tap_order_weights, taps_first_weights, tile_weights

    with pytest.raises(ValueError, match="tile_weights"):
        tile_weights(np.zeros((4, 8, 2), np.uint8), 4, 32)
    with pytest.raises(ValueError, match=r"taps_first_weights: weights of shape \(3, 64, 3, 3\)"):
        taps_first_weights(np.zeros((3, 64, 9), np.int8), 64, 3, 3)
    with pytest.raises(ValueError, match=r"shape \(3, 288\)"):
        taps_first_weights(np.zeros((3, 300), np.uint8), 64, 3, 3)
    with pytest.raises(ValueError, match=r"tap_order_weights: weights of shape \(3, 74\)"):
        tap_order_weights(np.zeros((3, 147), np.uint8), 3, 7, 7, 32)


BROADCAST_CASES = [(isa, scheme, act, m, k, n) for isa in ("avx2", "avx512vnni")
                   for scheme in ("sp2_4", "fixed_4", "fixed_8") for act in ("uint8", "int8")
                   for m, k, n in [(8, 64, 8), (13, 77, 61), (17, 130, 24), (29, 256, 50)]]


@pytest.mark.parametrize("isa,scheme,act,m,k,n", isa_cases(BROADCAST_CASES, [
    ("avx2", "fixed_8", "int8", 13, 77, 61), ("avx2", "sp2_4", "uint8", 29, 256, 50),
    ("avx512vnni", "fixed_4", "int8", 13, 77, 61), ("avx512vnni", "fixed_8", "uint8", 17, 130, 24)], full="runnable"))
def test_broadcast_dense_kernel_is_integer_exact(isa, scheme, act, m, k, n):
    """The outer-product kernel (8-row x 4-byte weight tiles laid out by ``tile_weights``;
    int8 rows on AVX2: 8-row x 2-byte tiles, int16 pairs) equals numpy: partial activation and
    row tiles, odd K (a half-empty last byte and a zero-padded last step), extreme values."""
    from schedules.x86_intrin import broadcast_dense_kernel, tile_weights
    from tvm_rmsmp.quant.schemes import nibble_decode

    packed = get_scheme(scheme).bits == 4
    rng = np.random.default_rng(stable_seed(isa, scheme, act, m, k, n))
    lo, hi = (0, 255) if act == "uint8" else (-128, 127)
    levels = nibble_decode(np.arange(16), get_scheme(scheme)) if packed else None
    func = broadcast_dense_kernel(m, k, n, act, levels, isa)
    tiles = [int(v) for v in func.attrs["rmsmp.weight_tiles"]]
    assert tiles == ([8, 2] if not packed and isa == "avx2" else [8, 4])
    exe = compile_for_isa(func, isa)

    def stored(w_int):
        return tile_weights(packed_weight(w_int, scheme) if packed else w_int.astype(np.int8), *tiles)

    x = rng.integers(lo, hi + 1, size=(m, k)).astype(act)
    w_int = _random_rows(rng, scheme, (n, k))
    bias = rng.integers(-1000, 1000, n).astype(np.int32)
    scale = rng.uniform(0.5, 2, n).astype(np.float32)
    out = _run(exe, x, stored(w_int), bias, scale, np.zeros((m, n), np.float32))
    np.testing.assert_array_equal(out, np_epilogue(np_dense_acc(x, w_int), bias.astype(np.int64), scale, 1))
    x_max = np.full((m, k), lo if act == "int8" else hi, dtype=act)
    w_max = np.full((n, k), get_scheme(scheme).levels.max(), dtype=np.int8)
    out = _run(exe, x_max, stored(w_max), np.zeros(n, np.int32), np.ones(n, np.float32), np.zeros((m, n), np.float32))
    np.testing.assert_array_equal(out.astype(np.int64), np_dense_acc(x_max, w_max))


@pytest.mark.parametrize("batch,scheme", [(1, "sp2_4"), (5, "sp2_4"), (16, "sp2_4"), (16, "fixed_8")])
def test_compiled_dense_layers_read_tiled_weight_constants(batch, scheme, host_target):
    """Every x86 dense row group of a compiled model reads its weight constant tiled (odd row
    and column counts: padded tiles and steps), and the model stays bit-exact. From 8
    activation rows on, the tiles are the outer-product kernel's (8 rows x 4 bytes; int8 rows
    on AVX2 8 rows x 2 bytes). Built for AVX2 with one scheme per model: a layer split into row
    groups becomes one kernel (tested below), a layer of a single row group keeps its own."""
    import torch

    import tvm_rmsmp as rmsmp
    from schedules.x86_intrin import x86_isa
    from tvm import relax

    if x86_isa(host_target) is None:
        pytest.skip("no x86 kernel on this host")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(77, 37), torch.nn.Tanh(), torch.nn.Linear(37, 19)).eval()
    calib = [torch.randn(8, 77) for _ in range(2)]
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(ratio={scheme: 1.0}, act_bits=8), calib)
    x = torch.randn(batch, 77)
    exe = rmsmp.compile(q, (x,), _x86_target("haswell"))
    tiled = {gv.name_hint: [int(v) for v in f.attrs["rmsmp.weight_tiles"]] for gv, f in exe.ir.functions.items()
             if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and "rmsmp.weight_tiles" in f.attrs}
    groups = [gv.name_hint for gv, f in exe.ir.functions.items()
              if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and "rmsmp.scheme" in f.attrs]
    x86 = [g for g in groups if "rmsmp.cpu_kernel" in exe.ir[g].attrs]
    assert x86 and sorted(tiled) == sorted(x86)
    shapes = {}
    relax.analysis.post_order_visit(exe.ir["main"], lambda e: shapes.__setitem__(
        e.args[0].name_hint, [int(d) for d in e.args[1].fields[1].ty.shape]) if isinstance(e, relax.Call)
        and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.call_tir" and e.args[0].name_hint in tiled else None)
    assert sorted(shapes) == sorted(tiled)
    from schedules.x86_intrin import BROADCAST_MIN_ROWS

    for name, shape in shapes.items():  # [tiles, steps, rows per tile, bytes per step]
        assert len(shape) == 4 and shape[2:] == tiled[name]
        int8_on_avx2 = "fixed_8" in name  # built for AVX2 at batch 16: int16 pairs
        outer = [8, 2] if int8_on_avx2 else [8, 4]
        assert tiled[name] == (outer if batch >= BROADCAST_MIN_ROWS else [tiled[name][0], 32])
    np.testing.assert_array_equal(exe(x), q(x).detach().numpy())


_SCHEME_ACT = [(scheme, act) for scheme in ("sp2_4", "fixed_4", "fixed_8") for act in ("uint8", "int8")]


@pytest.mark.parametrize("isa,scheme,act", isa_cases(
    [(isa, *case) for isa in ("avx2", "avx512vnni") for case in _SCHEME_ACT],
    [("avx2", "fixed_8", "int8"), ("avx2", "sp2_4", "uint8"), ("avx512vnni", "fixed_4", "int8"),
     ("avx512vnni", "fixed_8", "uint8")]))
def test_taps_first_conv_kernel_is_integer_exact(isa, scheme, act):
    """The per-tap conv kernel reading weights reordered at compile time equals numpy; with
    few output pixels it is still the per-tap kernel (the im2col was the default there).
    Every case for the host's ISA, two for the other."""
    from schedules.x86_intrin import ConvGeometry, gemm_kernel, taps_first_weights
    from tvm_rmsmp.quant.schemes import nibble_decode

    rng = np.random.default_rng(8)
    c, hw, n = 64, 5, 13
    conv = ConvGeometry(1, c, hw + 2, hw + 2, 3, 3)
    packed = scheme != "fixed_8"
    levels = nibble_decode(np.arange(16), get_scheme(scheme)) if packed else None
    kernel = gemm_kernel(conv.m, conv.k, n, act, levels, isa, conv=conv, taps_first=True)
    assert [int(v) for v in kernel.attrs["rmsmp.weight_taps_first"]] == [c, 3, 3]
    rows = _random_rows(rng, scheme, (n, c, 3, 3))
    w = packed_weight(rows.reshape(n, -1), scheme) if packed else rows
    x = _random_act(rng, act, (1, c, hw + 2, hw + 2))
    bias = rng.integers(-500, 500, n).astype(np.int32)
    scale = rng.random(n).astype(np.float32)
    exe = compile_for_isa(kernel, isa)
    out = _run(exe, x, taps_first_weights(w, c, 3, 3), bias, scale, np.zeros((1, n, hw, hw), np.float32))
    expected = np_epilogue(np_conv_acc(x, rows, (1, 1), (0, 0), (1, 1)), bias, scale, 1)
    np.testing.assert_array_equal(out, expected)
    # extreme values (AVX2 adds eight 4-bit pair sums in 16 bits): every activation at the
    # bound, the rows at the largest and the smallest level
    x_max = np.full(x.shape, -128 if act == "int8" else 255, dtype=act)
    levels_int = get_scheme(scheme).levels
    rows = np.where(np.arange(n)[:, None, None, None] % 2, levels_int.max(), levels_int.min()) * np.ones(
        (n, c, 3, 3), np.int64)
    rows = rows.astype(np.int8)
    w = packed_weight(rows.reshape(n, -1), scheme) if packed else rows
    out = _run(exe, x_max, taps_first_weights(w, c, 3, 3), np.zeros(n, np.int32), np.ones(n, np.float32),
               np.zeros((1, n, hw, hw), np.float32))
    np.testing.assert_array_equal(out.astype(np.int64), np_conv_acc(x_max, rows, (1, 1), (0, 0), (1, 1)))


def test_compiled_conv_layers_read_taps_first_weight_constants(host_target, monkeypatch):
    """Convolutions whose channels fill whole vector steps read weight constants reordered at
    compile time (the others keep theirs); the model stays bit-exact. (The VNNI kernels: on an
    AMX host the conv layers would be AMX kernels, tests/test_x86_amx_conv.py.)"""
    import torch

    monkeypatch.setenv("RMSMP_AMX", "0")

    import tvm_rmsmp as rmsmp
    from schedules.x86_intrin import x86_isa

    if x86_isa(host_target) is None:
        pytest.skip("not an x86 CPU with AVX2")
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(64, 70, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(70, 8, 3)).eval()
    calib = [torch.randn(2, 64, 6, 6) for _ in range(2)]
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(act_bits=8), calib)
    x = torch.randn(1, 64, 6, 6)
    exe = rmsmp.compile(q, (x,))
    groups = {gv.name_hint: f for gv, f in exe.ir.functions.items()
              if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and "rmsmp.scheme" in f.attrs}
    first = [f for name, f in groups.items() if "_0_" in name]
    second = [f for name, f in groups.items() if "_2_" in name]
    assert first and second
    assert all([int(v) for v in f.attrs["rmsmp.weight_taps_first"]] == [64, 3, 3] for f in first)
    assert not any("rmsmp.weight_taps_first" in f.attrs for f in second)
    np.testing.assert_array_equal(exe(x), q(x).detach().numpy())


def test_tap_order_weights_layout():
    """Column (ky, kx, c) of the tap-order layout holds weight column (c, ky, kx); packed: byte
    j of a step holds columns j and 32 + j of the step's 64, zero past the last column."""
    from schedules.x86_intrin import tap_order_weights
    from tvm_rmsmp.quant.schemes import pack_nibbles

    rng = np.random.default_rng(3)
    codes = rng.integers(0, 16, (2, 3, 7, 7)).astype(np.uint8)
    packed = tap_order_weights(pack_nibbles(codes.reshape(2, -1)), 3, 7, 7, 32)
    int8 = tap_order_weights(codes.astype(np.int8), 3, 7, 7, 32)
    assert packed.shape == (2, 96) and int8.shape == (2, 160)
    for j in range(192):
        ky, kx, c = j // 21, j // 3 % 7, j % 3
        expected = codes[:, c, ky, kx] if j < 147 else 0
        step, half, byte = j // 64, j % 64 // 32, j % 32
        np.testing.assert_array_equal(packed[:, step * 32 + byte] >> (4 * half) & 15, expected)
        if j < 160:
            np.testing.assert_array_equal(int8[:, j], expected)


@pytest.mark.parametrize("isa,n,scheme,act", isa_cases(  # n: fewer rows than pixels (25), and more
    [(isa, n, *case) for isa in ("avx2", "avx512vnni") for n in (5, 40) for case in _SCHEME_ACT],
    [("avx2", 5, "fixed_8", "int8"), ("avx2", 40, "fixed_4", "uint8"), ("avx512vnni", 5, "sp2_4", "int8"),
     ("avx512vnni", 40, "fixed_8", "uint8")]))
def test_tap_order_conv_kernel_is_integer_exact(isa, n, scheme, act):
    """Convolutions whose channels do not fill vector steps (a 7x7 stem, 3 channels) stage an
    im2col in tap order: with weights laid out at compile time, and (rows fewer than pixels)
    reordered per call, equal to numpy. Every case for the host's ISA, two for the other."""
    from schedules.x86_intrin import ConvGeometry, gemm_kernel, tap_order_weights
    from tvm_rmsmp.quant.schemes import nibble_decode

    rng = np.random.default_rng(n)
    conv = ConvGeometry(1, 3, 15, 15, 7, 7, (2, 2))
    packed = scheme != "fixed_8"
    levels = nibble_decode(np.arange(16), get_scheme(scheme)) if packed else None
    rows = _random_rows(rng, scheme, (n, 3, 7, 7))
    w = packed_weight(rows.reshape(n, -1), scheme) if packed else rows
    x = _random_act(rng, act, (1, 3, 15, 15))
    bias = rng.integers(-500, 500, n).astype(np.int32)
    scale = rng.random(n).astype(np.float32)
    expected = np_epilogue(np_conv_acc(x, rows, (2, 2), (0, 0), (1, 1)), bias, scale, 1)
    laid_out = gemm_kernel(conv.m, conv.k, n, act, levels, isa, conv=conv, taps_first=True)
    vec = 16 if not packed and isa == "avx2" else 32  # int16 pairs: 16 columns per step
    assert [int(v) for v in laid_out.attrs["rmsmp.weight_tap_order"]] == [3, 7, 7, vec]
    kernels = [(laid_out, tap_order_weights(w, 3, 7, 7, vec))]
    if n <= conv.m:
        kernels.append((gemm_kernel(conv.m, conv.k, n, act, levels, isa, conv=conv), w))
    built = [(compile_checked(kernel, isa), weights) for kernel, weights in kernels]
    skip_unless_runs_here(isa)
    for exe, weights in built:
        out = _run(exe, x, weights, bias, scale, np.zeros((1, n, 5, 5), np.float32))
        np.testing.assert_array_equal(out, expected)


def test_compiled_stem_reads_tap_order_weight_constants(host_target, monkeypatch):
    """A 7x7 stem over 3 channels reads weight constants laid out in tap order at compile time
    wherever it has an x86 kernel; the model stays bit-exact. (The VNNI kernels: on an AMX host
    the stem would be an AMX kernel, tests/test_x86_amx_conv.py.)"""
    import torch

    monkeypatch.setenv("RMSMP_AMX", "0")

    import tvm_rmsmp as rmsmp
    from schedules.x86_intrin import x86_isa

    if x86_isa(host_target) is None:
        pytest.skip("not an x86 CPU with AVX2")
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 40, 7, stride=2, padding=3), torch.nn.ReLU()).eval()
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(act_bits=8), [torch.randn(2, 3, 20, 20) for _ in range(16)])
    x = torch.randn(1, 3, 20, 20)
    exe = rmsmp.compile(q, (x,))
    kernels = [f for f in exe.ir.functions.values() if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None
               and str(f.attrs.get("rmsmp.cpu_kernel", "")).startswith("x86-")]
    assert kernels and all([int(v) for v in f.attrs["rmsmp.weight_tap_order"]][:3] == [3, 7, 7] for f in kernels)
    np.testing.assert_array_equal(exe(x), q(x).detach().numpy())


LAYER_CASES = [
    # (m, k, n, activations, share of sp2_4 / fixed_4 / fixed_8 rows)
    (8, 64, 8, "int8", (0.6, 0.35, 0.05)),
    (13, 77, 61, "uint8", (0.6, 0.35, 0.05)),   # odd K: half-empty last byte, padded step
    (17, 130, 50, "int8", (0.6, 0.35, 0.05)),
    (9, 64, 40, "int8", (0.5, 0.5, 0.0)),       # no 8-bit rows
    (9, 64, 40, "uint8", (0.0, 0.0, 1.0)),      # 8-bit rows only
    (11, 96, 33, "int8", (1.0, 0.0, 0.0)),      # one 4-bit table
]


@pytest.mark.parametrize("isa,vbmi,m,k,n,act,shares", isa_cases(
    [("avx512vnni", vbmi, *case) for vbmi in (False, True) for case in LAYER_CASES],
    [("avx512vnni", False, *LAYER_CASES[1]), ("avx512vnni", True, *LAYER_CASES[2])], full="runnable"))
def test_layer_dense_kernel_is_integer_exact(isa, vbmi, m, k, n, act, shares):
    """A whole layer (rows of three schemes, in a scattered order) in one kernel equals numpy,
    its outputs in the order given; extreme activations included. Both decodes: two
    ``vpshufb`` tables blended, and one ``vpermb`` over both (VBMI), each built for a CPU with
    just those features (VNNI kernel: compiled on every host, run where the host has VNNI).
    The MACs on 512-bit vectors (the default: 48-row register tiles, so every N here ends in a
    partial tile)."""
    _check_layer_dense(isa, vbmi, m, k, n, act, shares, wide=True)


@pytest.mark.parametrize("isa,vbmi,m,k,n,act,shares", isa_cases(
    [("avx512vnni", False, *LAYER_CASES[0]), ("avx512vnni", False, *LAYER_CASES[1]), ("avx512vnni", True, *LAYER_CASES[2])],
    [("avx512vnni", False, *LAYER_CASES[1])], full="runnable"))
def test_layer_dense_kernel_256_bit_form_is_integer_exact(isa, vbmi, m, k, n, act, shares):
    """The same layer kernel with its MACs on 256-bit vectors (``wide=False``) equals numpy."""
    _check_layer_dense(isa, vbmi, m, k, n, act, shares, wide=False)


def _check_layer_dense(isa, vbmi, m, k, n, act, shares, wide):
    from schedules.x86_intrin import layer_dense_kernel, layer_weights
    from tvm_rmsmp.quant.schemes import nibble_decode

    rng = np.random.default_rng(n * 1000 + m)
    names = ["sp2_4", "fixed_4", "fixed_8"]
    kind = rng.choice(3, size=n, p=shares)
    w_int = np.zeros((n, k), np.int64)
    groups, table_of_group, source = [], [], {}
    tables = [s for s in names[:2] if (kind == names.index(s)).any()]
    for gi, name in enumerate(names):
        rows = np.nonzero(kind == gi)[0]
        w_int[rows] = _random_rows(rng, name, (rows.size, k))
        if name == "fixed_8":
            groups.append(w_int[rows].astype(np.int8))
            table_of_group.append(-1)
        else:
            groups.append(packed_weight(w_int[rows], name) if rows.size else np.zeros((0, (k + 1) // 2), np.uint8))
            table_of_group.append(tables.index(name) if rows.size else 0)
        source.update({c: (gi, r) for r, c in enumerate(rows)})
    order = [source[c] for c in range(n)]
    levels = [nibble_decode(np.arange(16), get_scheme(s)) for s in tables] or [np.zeros(16, np.int64)]
    func = layer_dense_kernel(m, k, n, act, levels, int((kind == 2).sum()), vbmi=vbmi, wide=wide)

    def macs(asm):  # the MAC's vector width as asked
        found = re.findall(r"vpdpbusd\s+%([xyz])mm", asm)
        assert found and set(found) == ({"z"} if wide else {"y"}), sorted(set(found))

    exe = compile_for_isa(func, isa, vbmi, check=macs)
    consts = layer_weights(order, groups, table_of_group, k)
    bias = rng.integers(-1000, 1000, n).astype(np.int32)
    scale = rng.uniform(0.5, 2, n).astype(np.float32)
    lo, hi = (0, 255) if act == "uint8" else (-128, 127)
    for x in (rng.integers(lo, hi + 1, size=(m, k)).astype(act), np.full((m, k), lo if act == "int8" else hi, act)):
        out = _run(exe, x, *consts, bias, scale, np.zeros((m, n), np.float32))
        np.testing.assert_array_equal(out, np_epilogue(np_dense_acc(x, w_int), bias.astype(np.int64), scale, 1))


INT8_LAYER_CASES = [
    # (m, k, n, activations)
    (24, 77, 61, "uint8"),    # odd K: a padded step; N ends in a partial 48-row tile
    (33, 130, 50, "int8"),    # a partial 8-row activation tile
    (128, 64, 97, "int8"),
    (9, 96, 48, "uint8"),     # one whole weight tile
]


@pytest.mark.parametrize("m,k,n,act", INT8_LAYER_CASES)
def test_layer_int8_kernel_is_integer_exact(m, k, n, act):
    """The layer kernel on int8 weights laid out at compile time (``layer_int8_weights``: the
    rows of every scheme decoded, offset for signed activations) equals numpy for random and
    extreme activations and weights, on 512-bit MACs (compiled on every host, run where the
    host has VNNI)."""
    from schedules.x86_intrin import layer_int8_kernel, layer_int8_weights

    rng = np.random.default_rng(m * 7919 + k * 31 + n)
    func = layer_int8_kernel(m, k, n, act)

    def macs(asm):
        found = re.findall(r"vpdpbusd\s+%([xyz])mm", asm)
        assert found and set(found) == {"z"}, sorted(set(found))

    exe = compile_for_isa(func, "avx512vnni", False, check=macs)
    bias = rng.integers(-1000, 1000, n).astype(np.int32)
    scale = rng.uniform(0.5, 2, n).astype(np.float32)
    lo, hi = (0, 255) if act == "uint8" else (-128, 127)
    for w in (rng.integers(-128, 128, size=(n, k)), np.full((n, k), -128)):
        w = w.astype(np.int8)
        for x in (rng.integers(lo, hi + 1, size=(m, k)).astype(act), np.full((m, k), lo if act == "int8" else hi, act)):
            out = _run(exe, x, layer_int8_weights(w, act), bias, scale, np.zeros((m, n), np.float32))
            np.testing.assert_array_equal(out, np_epilogue(np_dense_acc(x, w.astype(np.int64)), bias.astype(np.int64),
                                                           scale, 1))


def test_static_and_dynamic_batches_get_their_layer_kernels():
    """Past the batch-1 kernel's rows a static batch gets the int8 layer kernel (weights
    decoded at compile time: one int8 constant), a dynamic batch the packed one (codes decoded
    per call)."""
    from relay_passes.contract import DenseLayer
    from schedules.x86_gemv import GEMV_MAX_ROWS
    from schedules.x86_layers import x86_layer_kernels

    rng = np.random.default_rng(3)
    w4 = rng.integers(0, 256, (40, 32)).astype(np.uint8)
    w8 = rng.integers(-128, 128, (8, 64)).astype(np.int8)
    groups = (("sp2_4", w4, np.zeros(40, np.int32), np.ones(40, np.float32)),
              ("fixed_8", w8, np.zeros(8, np.int32), np.ones(8, np.float32)))
    order = [(0, r) for r in range(40)] + [(1, r) for r in range(8)]
    kernels = x86_layer_kernels(tvm.target.Target(_x86_target("icelake-server")))
    built = {}
    for rows in (GEMV_MAX_ROWS + 1, tvm.tirx.Var("m", "int64")):
        layer = DenseLayer((rows, 64), "int8", groups, (True, False))
        key, name, make, consts = kernels.build(layer, order)
        built[isinstance(rows, int)] = (key[0], [str(dt) for _, dt in consts])
    assert built[True] == ("int8-layer", ["int8", "int32", "float32"])
    assert built[False][0] == "any" and built[False][1][:3] == ["uint8", "uint8", "int8"]


AVX2_LAYER_CASES = [
    # (m, k, n, activations, share of 8-bit rows)
    (13, 77, 61, "uint8", 0.1),     # odd K: a padded step; partial tiles of both GEMMs
    (33, 130, 50, "int8", 0.2),     # a partial activation tile
    (128, 64, 97, "int8", 0.05),
    (9, 96, 48, "uint8", 0.0),      # no 8-bit rows: one GEMM
    (16, 40, 24, "int8", 1.0),      # only 8-bit rows: the 4-bit GEMM's rows all zero
]


@pytest.mark.parametrize("m,k,n,act,share8", AVX2_LAYER_CASES)
def test_layer_avx2_kernel_is_integer_exact(m, k, n, act, share8):
    """The AVX2 layer kernel on weights decoded at compile time (``layer_avx2_weights``: SP2-4 and
    Fixed-4 levels as bytes for ``vpmaddubsw``, offset for signed activations; the 8-bit rows
    as int16 pairs for ``vpmaddwd``, written over their slots) equals numpy for random and
    extreme activations and weights in a scattered row order. Compiled for ``haswell`` on every
    host (its assembly: byte and pair MACs, no AVX-512), run where the host has AVX2."""
    from schedules.x86_intrin import layer_avx2_kernel, layer_avx2_weights
    from tvm_rmsmp.quant.schemes import get_scheme, nibble_decode

    rng = np.random.default_rng(stable_seed(m, k, n, act, share8))
    sp2, f4 = (nibble_decode(np.arange(16), get_scheme(s)) for s in ("sp2_4", "fixed_4"))
    levels = sorted({int(v) for v in np.concatenate([sp2, f4])})
    is8 = np.zeros(n, bool)
    is8[rng.permutation(n)[:int(round(share8 * n))]] = True
    func = layer_avx2_kernel(m, k, n, act, levels, int(is8.sum()))

    def macs(asm):
        assert "vpmaddubsw" in asm and "vpmaddwd" in asm and "zmm" not in asm and "vpdpbusd" not in asm

    exe = compile_for_isa(func, "avx2", False, check=macs)
    bias = rng.integers(-1000, 1000, n).astype(np.int32)
    scale = rng.uniform(0.5, 2, n).astype(np.float32)
    lo, hi = (0, 255) if act == "uint8" else (-128, 127)
    four = np.where(rng.random((n, 1)) < 0.5, sp2[rng.integers(0, 16, (n, k))], f4[rng.integers(0, 16, (n, k))])
    extreme4 = np.where(rng.random((n, 1)) < 0.5, -8, 8)
    for w4, w8 in ((four, rng.integers(-128, 128, (n, k))), (np.broadcast_to(extreme4, (n, k)), np.full((n, k), -128))):
        w = np.where(is8[:, None], w8, w4).astype(np.int8)
        consts = layer_avx2_weights(w, is8, act)
        cols8 = np.flatnonzero(is8)
        bias8, scale8 = (bias[cols8], scale[cols8]) if len(cols8) else (np.zeros(1, np.int32), np.ones(1, np.float32))
        for x in (rng.integers(lo, hi + 1, size=(m, k)).astype(act), np.full((m, k), lo if act == "int8" else hi, act)):
            out = _run(exe, x, *consts, bias, scale, bias8, scale8, np.zeros((m, n), np.float32))
            np.testing.assert_array_equal(out, np_epilogue(np_dense_acc(x, w.astype(np.int64)), bias.astype(np.int64),
                                                           scale, 1))


def test_layer_avx2_weights_reject_what_the_kernel_cannot_take():
    """8-bit levels in a row not flagged 8-bit, a flag per row missing, other activation types:
    a clear error, no constants."""
    from schedules.x86_intrin import layer_avx2_weights

    w = np.zeros((16, 8), np.int8)
    w[3, 5] = 9
    with pytest.raises(ValueError, match=r"levels within \+-8, got 0..9"):
        layer_avx2_weights(w, np.zeros(16, bool), "int8")
    flags = np.zeros(16, bool)
    flags[3] = True
    w4, w8, cols8 = layer_avx2_weights(w, flags, "uint8")
    assert cols8.tolist() == [3] and w8.view(np.int16).max() == 9 and w4.max() == 0
    with pytest.raises(ValueError, match="one flag per row"):
        layer_avx2_weights(w, np.zeros(15, bool), "int8")
    with pytest.raises(ValueError, match="uint8 or int8"):
        layer_avx2_weights(w, flags, "float32")


VNNI_CONV_LAYER_CASES = [
    # (activations' shape, output channels, kernel, stride, activations)
    ((2, 64, 10, 10), 45, 3, 1, "uint8"),    # per-tap GEMMs over channel-last activations
    ((2, 64, 9, 9), 20, 1, 2, "int8"),       # a strided 1x1 (ResNet's downsample)
    ((2, 3, 15, 15), 16, 7, 2, "int8"),      # the 3-channel stem: an im2col in tap order
    ((3, 40, 9, 9), 33, 3, 2, "uint8"),      # channels short of a 32-byte step: tap order too
]


@pytest.mark.parametrize("xs,n,k,stride,act", VNNI_CONV_LAYER_CASES)
def test_vnni_conv_layer_kernel_is_integer_exact(xs, n, k, stride, act):
    """Without AMX, a conv layer of two or more images is one VNNI kernel over all its rows
    (SP2-4, Fixed-4 and Fixed-8 in a scattered output order, decoded to int8 at compile time):
    it equals numpy's convolution in that order. One image keeps its row groups' kernels.
    Built for a VNNI CPU on every host, run where the host has VNNI."""
    from relay_passes.contract import ConvLayer
    from schedules.x86_layers import x86_layer_kernels

    rng = np.random.default_rng(stable_seed(xs, n, k, stride, act))
    layer, order, w_int, bias, scale = mixed_conv_layer(xs, n, k, stride, act, rng)
    kernels = x86_layer_kernels(_x86_target("icelake-server"))
    assert kernels.convs and kernels.accepts(layer)
    assert not kernels.accepts(ConvLayer((1, *xs[1:]), act, (k, k), (stride, stride), (0, 0), (1, 1), layer.groups,
                                         (True, True, False)))
    _, _, make, consts = kernels.build(layer, order)
    kernel = make()
    assert str(kernel.attrs["rmsmp.cpu_kernel"]) == "x86-avx512vnni-conv-layer"
    exe = compile_for_isa(kernel, "avx512vnni", True)
    lo, hi = (0, 255) if act == "uint8" else (-128, 127)
    for x in (rng.integers(lo, hi + 1, size=xs).astype(act), np.full(xs, lo if act == "int8" else hi, act)):
        expected = np_epilogue(np_conv_acc(x, w_int, (stride, stride), (0, 0), (1, 1)), bias, scale, 1)
        out = _run(exe, x, *(c for c, _ in consts), np.zeros(expected.shape, np.float32))
        np.testing.assert_array_equal(out, expected)


#: the levels of a made-up 4-bit table scheme (a second table beside SP2's)
_OTHER_TABLE = np.array([0, 1, -1, 2, -2, 3, -3, 4, -4, 6, -6, 8, -8, 5, -5, 7])

GEMV_CASES = [
    # (m, k, n, activations, share of sp2_4 / fixed_4 / fixed_8 / second-table rows)
    (1, 64, 8, "uint8", (0.6, 0.35, 0.05, 0.0)),
    (1, 200, 13, "int8", (0.6, 0.35, 0.05, 0.0)),     # partial blocks and a padded step
    (1, 77, 61, "uint8", (0.5, 0.3, 0.1, 0.1)),       # odd K, two tables
    (1, 130, 37, "int8", (0.0, 1.0, 0.0, 0.0)),       # fixed pairs only
    (1, 130, 37, "uint8", (1.0, 0.0, 0.0, 0.0)),      # one table only
    (1, 70, 40, "int8", (0.0, 0.0, 1.0, 0.0)),        # 8-bit rows only
    (1, 768, 300, "int8", (0.6, 0.35, 0.05, 0.0)),
    (2, 77, 61, "int8", (0.5, 0.3, 0.1, 0.1)),        # one pass of two rows
    (2, 600, 24, "int8", (0.6, 0.3, 0.1, 0.0)),       # AVX2: three groups of 16-bit sums, the last short
    (3, 130, 40, "uint8", (0.5, 0.4, 0.1, 0.0)),      # AVX2: one pass of three rows
    (4, 130, 37, "uint8", (0.5, 0.4, 0.1, 0.0)),      # blocks of two byte rows, four rows a pass
    (5, 200, 13, "uint8", (0.6, 0.35, 0.05, 0.0)),    # five rows a pass
    (6, 130, 40, "int8", (0.4, 0.3, 0.3, 0.0)),       # passes of three
    (7, 77, 61, "int8", (0.5, 0.3, 0.1, 0.1)),        # passes of four, the last one short
]


@pytest.mark.parametrize("isa,vbmi,m,k,n,act,shares", isa_cases(
    [(isa, vbmi, *case) for isa, vbmi in [("avx2", False), ("avx512vnni", False), ("avx512vnni", True)]
     for case in GEMV_CASES],
    [("avx2", False, *GEMV_CASES[2]), ("avx2", False, *GEMV_CASES[9]), ("avx512vnni", False, *GEMV_CASES[7]),
     ("avx512vnni", True, *GEMV_CASES[11])], full="runnable"))
def test_gemv_layer_kernel_is_integer_exact(isa, vbmi, m, k, n, act, shares):
    """The few-rows layer kernel (two rows per byte: VNNI fixed pairs by two MACs of whole
    bytes and low nibbles, AVX2 ones nibble by nibble; table pairs by ``vpermb``, or by
    ``vpshufb`` on AVX2 and when built for a CPU without VBMI; 8-bit rows by ``vpdpbusd``, on
    AVX2 in 16 bits) equals numpy for rows of every kind in a scattered order, each output at
    its place; random and extreme activations, the epilogue bit for bit."""
    from schedules.x86_gemv import INT8, LINEAR, block_pairs, gemv_layer_kernel, gemv_layer_weights
    from tvm_rmsmp.quant.schemes import nibble_decode

    rng = np.random.default_rng(n * 1000 + k + m)
    kind = rng.choice(4, size=n, p=shares)
    tables = {0: nibble_decode(np.arange(16), get_scheme("sp2_4")), 3: _OTHER_TABLE}
    table_ids = {t: i for i, t in enumerate(t for t in (0, 3) if (kind == t).any())}
    w_int = np.zeros((n, k), np.int64)
    groups, kinds, levels, source = [], [], [], {}
    for gi in range(4):
        rows = np.nonzero(kind == gi)[0]
        if gi == 2:  # 8-bit rows
            w_int[rows] = _random_rows(rng, "fixed_8", (rows.size, k))
            groups.append(w_int[rows].astype(np.int8))
            kinds.append(INT8)
            levels.append(None)
        else:
            lv = nibble_decode(np.arange(16), get_scheme("fixed_4")) if gi == 1 else tables[gi]
            codes = rng.integers(0, 16, size=(rows.size, k))
            w_int[rows] = lv[codes]
            groups.append(pack_nibbles(codes) if rows.size else np.zeros((0, (k + 1) // 2), np.uint8))
            kinds.append(LINEAR if gi == 1 or gi not in table_ids else table_ids[gi])  # empty: any kind
            levels.append(lv)
        source.update({c: (gi, r) for r, c in enumerate(rows)})
    order = [source[c] for c in range(n)]
    bias = rng.integers(-1000, 1000, n).astype(np.int32)
    scale = rng.uniform(0.5, 2, n).astype(np.float32)
    pairs = block_pairs(m, isa)
    layout, *consts = gemv_layer_weights(order, groups, kinds, levels, bias, scale, k, act, pairs=pairs, isa=isa)
    per_block = 2 * pairs
    assert layout.linear == -(-int((kind == 1).sum()) // per_block)
    assert layout.int8 == -(-int((kind == 2).sum()) // per_block)
    func = gemv_layer_kernel(layout, act, [tables[t] for t in table_ids], vbmi=vbmi, m=m)
    def check(asm):  # icelake-server: VNNI and VBMI; cascadelake: VNNI without VBMI; haswell: AVX2 alone
        if table_ids:
            assert ("vpermb" in asm) == vbmi
        assert ("zmm" in asm) == (isa == "avx512vnni")

    exe = compile_for_isa(func, isa, vbmi, check=check)
    lo, hi = (0, 255) if act == "uint8" else (-128, 127)
    for x in (rng.integers(lo, hi + 1, size=(m, k)).astype(act), np.full((m, k), lo, act), np.full((m, k), hi, act)):
        out = _run(exe, x, *consts, np.zeros((m, n), np.float32))
        np.testing.assert_array_equal(out, np_epilogue(np_dense_acc(x, w_int), bias.astype(np.int64), scale, 1))


def test_gemv_layer_rejects_what_it_cannot_compute():
    """A bias that overflows int32 once the offsets are folded in is an error naming the output;
    so are a linear group whose levels do not fit ``level + 8`` in a nibble, and a reduction
    too long for the kernel's int32 sums."""
    from schedules.x86_gemv import LINEAR, gemv_layer_weights
    from tvm_rmsmp.quant.schemes import nibble_decode

    codes = np.full((1, 64), 7)  # level 7 everywhere: 128 * 7 * 64 folded in for uint8 activations
    lv = nibble_decode(np.arange(16), get_scheme("fixed_4"))
    with pytest.raises(ValueError, match="output 0"):
        gemv_layer_weights([(0, 0)], [pack_nibbles(codes)], [LINEAR], [lv], np.array([2**31 - 10]),
                           np.ones(1, np.float32), 64, "uint8")
    with pytest.raises(ValueError, match="group 0 is linear"):  # SP2's levels reach 8
        sp2 = nibble_decode(np.arange(16), get_scheme("sp2_4"))
        gemv_layer_weights([(0, 0)], [pack_nibbles(codes)], [LINEAR], [sp2], np.zeros(1), np.ones(1, np.float32),
                           64, "int8")
    from schedules.x86_gemv import GemvLayout, gemv_layer_kernel

    with pytest.raises(ValueError, match="k = 2000000 is too long"):  # int32 lane sums would wrap
        gemv_layer_kernel(GemvLayout(2_000_000, 8, 1, (), 0), "int8", [])


@pytest.mark.parametrize("batch,mcpu", [(1, "icelake-server"), (1, "cascadelake"), (4, "icelake-server"),
                                        (24, "icelake-server"), (1, "haswell"), (12, "haswell"), (13, "haswell"), (40, "haswell")])
def test_dense_layers_fuse_into_one_kernel_with_many_rows(batch, mcpu):
    """On VNNI each split dense layer is one kernel, the two-rows-per-byte kernel up to
    ``GEMV_MAX_ROWS`` activation rows, the outer-product one from there: no concatenation and
    no gather are left (the final gather is folded into the kernel through the reshape back to
    3-D), and the two layers of the same shape share one kernel. Bit-exact, also for a VNNI CPU
    without VBMI (``cascadelake``: the batch-1 kernel's tables by ``vpshufb``). On AVX2
    (``haswell``) the same up to ``GEMV_MAX_ROWS_AVX2`` rows; from there the AVX2 layer kernel
    (``x86-avx2-layer``). Built on every host; run where the host has the target's ISA."""
    import torch
    from tvm import relax

    import tvm_rmsmp as rmsmp
    from schedules.x86_gemv import GEMV_MAX_ROWS, GEMV_MAX_ROWS_AVX2

    avx2 = mcpu == "haswell"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU(),
                                torch.nn.Linear(64, 40)).eval()
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(act_bits=8), [torch.randn(16, 64) for _ in range(2)])
    x = torch.randn(1, batch, 64)
    exe = rmsmp.compile(q, (x,), _x86_target(mcpu))
    ops = []
    relax.analysis.post_order_visit(exe.ir["main"], lambda e: ops.append(
        e.args[0].name_hint if e.op.name == "relax.call_tir" else e.op.name)
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) else None)
    layers = [op for op in ops if op.startswith("rmsmp_dense_layer_")]
    assert "relax.concat" not in ops and "relax.take" not in ops
    assert len(layers) == 3 and len(set(layers)) == 2
    kernel = "x86-avx512vnni-gemv" if batch <= (GEMV_MAX_ROWS_AVX2 if avx2 else GEMV_MAX_ROWS) else "x86-avx512vnni-layer"
    assert exe.stats["cpu_kernels"] == {kernel.replace("avx512vnni", "avx2") if avx2 else kernel: 2}
    isa, vbmi = [key for key, name in ISA_MCPU.items() if name == mcpu][0]
    skip_unless_runs_here(isa, vbmi, checked="its kernels checked")
    np.testing.assert_array_equal(exe(x), q(x).detach().numpy())


def test_batch1_dense_rows_use_512_bit_vectors_on_vnni():
    """Batch-1 dense row groups on VNNI (where a layer is not one kernel) read 64-byte steps
    where padding costs at most an eighth; ``DENSE_CASES`` runs such groups bit-exact."""
    from schedules.x86_intrin import vector_bytes

    assert vector_bytes("avx512vnni", 384, 1) == 64 and vector_bytes("avx512vnni", 384, 128) == 32
    assert vector_bytes("avx512vnni", 39, 1) == 32 and vector_bytes("avx2", 384, 1) == 32
    assert vector_bytes("avx512vnni", 384, 1, conv=True) == 32
    assert vector_bytes("avx512vnni", 128, 1) == 64 and vector_bytes("avx512vnni", 100, 1) == 32


def test_layer_kernel_benchmark_runs(host_target):
    """``python -m bench.layer_kernels`` (what ``GEMV_MAX_ROWS`` and ``GEMV_MAX_ROWS_AVX2`` are
    chosen from) runs and prints one row of both alternatives' times per row count."""
    import os
    import subprocess
    import sys

    from schedules.x86_intrin import x86_isa

    isa = x86_isa(host_target)
    if isa is None:
        pytest.skip("needs an x86 CPU with AVX2")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "bench.layer_kernels", "--rows", "2"], cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (row,) = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] == ["2"]]
    assert len(row) == 4 and float(row[1]) > 0 and float(row[2]) > 0 and row[3].endswith("x")
    # what runs past the layer kernel's rows: one outer-product kernel on VNNI, one per row group on AVX2
    assert ("layer/gemv" if isa == "avx512vnni" else "groups/gemv") in proc.stdout


def _modeled_us(m, pairs, tile, cost):
    """The cost model's time for ``m`` activation rows: passes of ``tile`` rows (the last one
    repeating rows to fill its tile) over blocks of ``pairs`` byte rows."""
    return -(-m // tile) * cost[(pairs, tile)]


def _check_tiling_is_cheapest(isa, ms):
    from schedules.x86_gemv import block_pairs, constants_for, row_tile

    cost = constants_for(isa)["pass_us"]
    for m in ms:
        pairs = block_pairs(m, isa)
        tile = row_tile(m, pairs, isa)
        assert (pairs, tile) in cost, f"{isa}, m={m}: ({pairs}, {tile}) was never measured"
        chosen = _modeled_us(m, pairs, tile, cost)
        # every legal tiling is one that PASS_US measured; the chosen one is the cheapest
        for alt in cost:
            assert chosen <= _modeled_us(m, *alt, cost), (
                f"{isa}, m={m}: chose {(pairs, tile)} at {chosen} us, but {alt} costs {_modeled_us(m, *alt, cost)} us")
        # and for the block size it chose, its rows per pass are the cheapest of that block size
        for other in (t for p, t in cost if p == pairs):
            assert chosen <= _modeled_us(m, pairs, other, cost)
        assert -(-m // tile) * tile >= m  # the passes cover every row


@pytest.mark.parametrize("isa", ["avx512vnni", "avx2"])
def test_gemv_tiling_is_the_cheapest_under_the_cost_model(isa):
    """For every row count the layer kernel takes (and a few past it), the tiling chosen
    (byte rows per block, activation rows per pass) costs no more under ``PASS_US`` than any
    other measured tiling: a property of the chooser, not a copy of the table's answer, so it
    holds when the table is re-measured."""
    from schedules.x86_gemv import gemv_max_rows

    _check_tiling_is_cheapest(isa, range(1, gemv_max_rows(isa) + 4))


@pytest.mark.parametrize("seed", range(6))
def test_gemv_tiling_chooser_follows_a_re_measured_table(seed, monkeypatch):
    """The same property for re-measured tables (random pass times, seeded): the chooser reads
    the table, it does not encode today's answer."""
    from schedules import x86_gemv

    rng = np.random.default_rng(stable_seed("pass_us", seed))
    tables = {isa: {key: float(rng.uniform(20, 200)) for key in table} for isa, table in x86_gemv.PASS_US.items()}
    # the chooser reads its CPU's row of the constants table; give every CPU the random one
    monkeypatch.setattr(x86_gemv, "constants_for", lambda isa, cpu=None: {"pass_us": tables[isa]})
    for isa in tables:
        _check_tiling_is_cheapest(isa, range(1, 30))