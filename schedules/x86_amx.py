"""AMX-INT8 dense layers (Intel Xeon since Sapphire Rapids): the tile unit for many activation rows.

A ``tdpbusd`` / ``tdpbssd`` multiplies a 16 x 64 byte tile of activations (``A``, unsigned or
signed: the activation contract's uint8 / int8) by a 64 x 16 tile of int8 weights (``B``) into
a 16 x 16 int32 tile: 16384 MACs per instruction. Every row of a row-group layer (packed 4-bit
SP2 and Fixed-4 levels, which fit int8 exactly, and int8 rows) is one int8 column of ``B``, in
the order the graph wants the outputs: no offsets, no activation sums, no per-scheme code in
the loop.

The weights are constants, so ``B`` is laid out at compile time (:func:`amx_weights`): tile by
tile, ``[n / 16, k / 64, 16, 64]``, each 1 KiB tile in the VNNI layout the instruction reads,
zero-padded to whole tiles. The cost: one byte per weight where a packed 4-bit row stores half
a byte (a BERT FFN's two 768 x 3072 layers: 4.7 MB instead of 2.4 MB). Keeping the 4-bit rows
packed and decoding each 32-column panel per call right before its MACs (two ``vpshufb``
tables blended per column, the int8 rows copied over their columns) measured slower:
128 x 768 x 3072 and 128 x 3072 x 768, 60:35:5 rows, one thread, 331 and 359 us against 250
and 250 us (299 and 285 us without int8 rows, so the decode alone costs more than the halved
stream saves; a kernel of that design measured, not kept).

Per call the activations are staged once, zero-padded to whole 32 x 64 blocks, each block's
two ``A`` tiles contiguous (one sequential stream per block). The parallel loop runs over
chunks of 32-column panels; each task configures the tile unit (``ldtilecfg``: 8 tiles of 16
rows x 64 bytes), and for each panel and 32-row block of activations keeps a 2 x 2 block of
int32 accumulator tiles over the whole reduction (two ``A`` and two ``B`` loads feed four
products per 64-deep step), prefetching the next panel's weights into L2 meanwhile. The
accumulators go through a per-task buffer to the epilogue ``float32(acc + bias) * scale`` (as
every x86 kernel, bit for bit) on 16-lane AVX-512 vectors. ``tilerelease`` ends each task.

Linux grants a process the tile state only after ``arch_prctl(ARCH_REQ_XCOMP_PERM,
XFEATURE_XTILEDATA)``; every call of a kernel asks first (one system call, idempotent; the
permission is the process's, so the runtime's worker threads have it), so an exported library
works without this package. Refused (an old kernel, a container denying it), the call fails
with :data:`AMX_REFUSED`.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import warnings
from typing import Tuple

import numpy as np
import tvm
from tvm.script import tirx as T
from tvm.target.codegen import target_has_features

from .x86_bounds import activation_range, check_accumulators, describe, operand_range
from .x86_intrin import TargetFeatureWarning

__all__ = ["AMX_MIN_ROWS", "AMX_REFUSED", "amx_enabled", "amx_dense_kernel", "amx_weights", "os_grants_amx"]

#: Fewest activation rows for which the AMX kernel replaces the VNNI ones (the batch-1 layer
#: kernel up to here): both BERT FFN layers, SP2-4 : Fixed-4 : Fixed-8 rows 60:35:5, one thread,
#: ``python -m bench.layer_kernels --amx --cpu-time --rows 8 10 12 16 24`` (Intel Xeon, LLVM
#: rocketlake): 8 rows 163 vs 174 us (batch-1 kernel vs AMX), 10 rows 196 vs 183, 12 rows 259 vs
#: 187, 16 rows 331 vs 188, 24 rows 511 vs 206. The AMX time hardly moves below 32 rows: it
#: streams the layer's int8 weights (4.7 MB).
AMX_MIN_ROWS = 12

#: What the OS did (a kernel call's error and :func:`amx_enabled`'s warning)
AMX_OS_REFUSED = "AMX: the OS refused the tile state (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)"
#: The error a kernel call raises where the OS refuses the tile state
AMX_REFUSED = f"{AMX_OS_REFUSED}; rebuild without AMX: RMSMP_AMX=0, or a target without it (mattr '-amx-int8')"

MB, NB, KB = 32, 32, 64  # a block of outputs (2 x 2 tiles of 16 x 16) and a reduction step


def amx_enabled(target) -> bool:
    """Whether ``target`` gets the AMX kernels: x86 with ``amx-int8``, ``amx-tile`` and
    AVX-512 (the epilogue), unless the environment says ``RMSMP_AMX=0``; and, for a target
    naming this machine's CPU (what ``resolve_target("llvm")`` gives), only where the OS
    grants this process the tile state (:func:`os_grants_amx`): refused, the layers get the
    AVX-512 VNNI kernels and a :class:`~schedules.x86_intrin.TargetFeatureWarning` says so.
    A target naming another CPU (``mcpu`` ``sapphirerapids``) is built for as asked."""
    if os.environ.get("RMSMP_AMX", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if target.kind.name != "llvm":
        return False
    if not all(bool(target_has_features(f, target)) for f in ("amx-int8", "amx-tile", "avx512f", "avx512bw")):
        return False
    if _names_this_cpu(target) and not os_grants_amx():
        warnings.warn(f"{AMX_OS_REFUSED}: the AMX kernels are left out, the AVX-512 VNNI ones run instead (a target "
                      "naming another CPU, e.g. mcpu 'sapphirerapids', still gets them)", TargetFeatureWarning,
                      stacklevel=2)
        return False
    return True


def _names_this_cpu(target) -> bool:
    """Whether ``target`` is for this machine: LLVM's name of this CPU, no foreign triple."""
    from tvm.target import codegen

    triple = str(target.attrs.get("mtriple", "") or "")
    if (triple and not triple.startswith("x86_64")) or platform.machine() not in ("x86_64", "AMD64"):
        return False
    return str(target.attrs.get("mcpu", "") or "") == str(codegen.llvm_get_system_cpu())


@functools.lru_cache(maxsize=None)
def os_grants_amx() -> bool:
    """Whether Linux grants this process the AMX tile state: ``arch_prctl(ARCH_REQ_XCOMP_PERM,
    XFEATURE_XTILEDATA)``, the request every kernel call makes (granted, it stays granted;
    refused, by an old kernel or a seccomp filter such as ``bench/refuse_amx.py``, it stays
    refused, hence the cache). True off Linux x86-64, where there is nothing to ask."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return True
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc.syscall(ctypes.c_long(158), ctypes.c_long(0x1023), ctypes.c_long(18)) == 0


def _padded(m: int, k: int, n: int) -> Tuple[int, int, int]:
    return -(-m // MB) * MB, -(-k // KB) * KB, -(-n // NB) * NB


def amx_weights(w: np.ndarray) -> np.ndarray:
    """int8 weights ``[n, k]`` as :func:`amx_dense_kernel` reads them: ``[n / 16, k / 64, 16, 64]``,
    tile ``(j, s)`` holding rows ``16 j ..``, columns ``64 s ..`` in the VNNI layout (byte
    ``4 r + e`` of tile row ``q``: weight row ``16 j + r``, column ``64 s + 4 q + e``), zero-padded."""
    if w.ndim != 2 or w.dtype != np.int8:
        raise ValueError(f"amx_weights: int8 weights [rows, k], got {w.dtype} {w.shape}")
    n, k = w.shape
    _, kp, np_ = _padded(1, k, n)
    pad = np.zeros((np_, kp), np.int8)
    pad[:n, :k] = w
    tiles = pad.reshape(np_ // 16, 16, kp // KB, 16, 4).transpose(0, 2, 3, 1, 4)  # [j, s, q, r, e]
    return np.ascontiguousarray(tiles.reshape(np_ // 16, kp // KB, 16, 64))


def _tile(name: str, *args):
    return T.call_llvm_intrin("void", T.llvm_lookup_intrinsic_id(f"llvm.x86.{name}"), *args)


def _prefetch(address):
    """Into L2 (``prefetcht1``)."""
    return T.call_llvm_intrin("void", T.llvm_lookup_intrinsic_id("llvm.prefetch.p0"), address, T.int32(0), T.int32(2),
                              T.int32(1))


def _amx_gemm(m: int, k: int, n: int, x_dtype: str, num_cores: int):
    """Macro ``gemm(x, w, bias, scale, out)`` (module docstring), ``w`` laid out by :func:`amx_weights`."""
    mp, kp, np_ = _padded(m, k, n)
    m_blocks, n_blocks, k_steps = mp // MB, np_ // NB, kp // KB
    tasks = max(1, min(n_blocks, 4 * max(1, num_cores)))  # chunks of panels, 4 per core
    per_task = -(-n_blocks // tasks)
    tasks = -(-n_blocks // per_task)
    dot = "tdpbssd" if x_dtype == "int8" else "tdpbusd"
    panel = 2 * k_steps * 1024  # bytes of B per 32-column panel
    # the next panel is prefetched into L2 over this one's steps, evenly: at 128 x 768 x 3072,
    # one thread, 249 instead of 300 us (prefetching into L1, 267; twice the lines per step, 262)
    lines = -(-panel // 64 // (m_blocks * k_steps))
    whole = mp == m and kp == k

    def xat(i, j):
        """Staged activation ``(i, j)``: per 32-row block and step, its two A tiles contiguous."""
        return ((i // MB * k_steps + j // KB) * MB + i % MB) * KB + j % KB

    @T.macro
    def mac(xs, wf, p, mb):
        """Panel ``p`` times activation block ``mb`` into accumulator tiles 0-3, the next panel prefetched."""
        for t in T.unroll(4):
            _tile("tilezero", T.int8(t))
        for s in T.serial(k_steps):
            for line in T.unroll(lines):
                _prefetch(T.address_of(wf[T.min((p + 1) * panel + ((mb * k_steps + s) * lines + line) * 64,
                                                np_ // NB * panel - 1)]))
            _tile("tileloadd64", T.int8(4), T.address_of(xs[xat(mb * MB, s * KB)]), T.int64(KB))
            _tile("tileloadd64", T.int8(5), T.address_of(xs[xat(mb * MB + 16, s * KB)]), T.int64(KB))
            for t in T.unroll(2):
                _tile("tileloadd64", T.int8(6 + t), T.address_of(wf[p * panel + (t * k_steps + s) * 1024]), T.int64(64))
            _tile(dot, T.int8(0), T.int8(4), T.int8(6))
            _tile(dot, T.int8(1), T.int8(4), T.int8(7))
            _tile(dot, T.int8(2), T.int8(5), T.int8(6))
            _tile(dot, T.int8(3), T.int8(5), T.int8(7))

    @T.macro
    def epilogue(acc, base, out, bias, scale, p, mb):
        """``float32(acc + bias) * scale`` of the 32 x 32 block at ``acc[base]``, 16 outputs a vector."""
        for r in T.serial(MB):
            if mb * MB + r < m:
                for h in T.unroll(2):
                    if p * NB + h * 16 + 16 <= n:
                        out[mb * MB + r, T.ramp(p * NB + h * 16, 1, 16)] = T.Cast(
                            "float32x16", acc[T.ramp(base + r * NB + h * 16, 1, 16)] + bias[T.ramp(p * NB + h * 16, 1, 16)]
                        ) * scale[T.ramp(p * NB + h * 16, 1, 16)]
                    else:
                        for q in T.serial(16):
                            if p * NB + h * 16 + q < n:
                                out[mb * MB + r, p * NB + h * 16 + q] = T.Cast(
                                    "float32", acc[base + r * NB + h * 16 + q] + bias[p * NB + h * 16 + q]
                                ) * scale[p * NB + h * 16 + q]

    @T.macro
    def gemm(x, w, bias, scale, out):
        granted = T.call_extern("int64", "syscall", T.int64(158), T.int64(0x1023), T.int64(18))
        assert granted == T.int64(0), AMX_REFUSED
        xs = T.alloc_buffer((mp * kp,), x_dtype)
        wf = T.decl_buffer((np_ // NB * panel,), "int8", data=w.data)
        for i in T.parallel(mp):
            for s in T.serial(k_steps):
                for e in T.vectorized(KB):
                    if whole:  # no padding: a plain copy (the guarded one took 18 of 250 us at 128 x 3072 x 768)
                        xs[xat(i, s * KB) + e] = x[i, s * KB + e]
                    else:
                        xs[xat(i, s * KB) + e] = T.if_then_else(i < m and s * KB + e < k, x[T.min(i, m - 1), T.min(
                            s * KB + e, k - 1)], T.Cast(x_dtype, 0))
        for task in T.parallel(tasks):
            cfg = T.alloc_buffer((64,), "uint8")
            acc = T.alloc_buffer((MB * NB,), "int32")
            for b in T.serial(64):  # palette 1; tiles 0-7: 16 rows of 64 bytes
                cfg[b] = T.Select(b == 0, T.uint8(1), T.Select(b >= 16 and b < 32 and b % 2 == 0, T.uint8(64),
                                                               T.Select(b >= 48 and b < 56, T.uint8(16), T.uint8(0))))
            _tile("ldtilecfg", T.address_of(cfg[0]))
            # (running the epilogue of the previous block while a block's products are in flight,
            # two accumulator buffers: no faster, 228 / 258 vs 238 / 252 us at 128 x 3072 x 768 /
            # 128 x 768 x 3072, one thread; the epilogue's 1.5 MB of float32 stores bound it)
            for pb, mb in T.grid(per_task, m_blocks):
                if task * per_task + pb < n_blocks:
                    mac(xs, wf, task * per_task + pb, mb)
                    for t in T.unroll(4):
                        _tile("tilestored64", T.int8(t), T.address_of(acc[t // 2 * 16 * NB + t % 2 * 16]), T.int64(NB * 4))
                    epilogue(acc, 0, out, bias, scale, task * per_task + pb, mb)
            _tile("tilerelease")

    return gemm


def amx_dense_kernel(m: int, k: int, n: int, x_dtype: str, num_cores: int = 1) -> tvm.tirx.PrimFunc:
    """The PrimFunc ``(x [m, k], wb [n / 16, k / 64, 16, 64] int8 (:func:`amx_weights`), bias [n]
    int32, scale [n] f32, out [m, n] f32)``: ``out = float32(x @ w.T + bias) * scale``, any int8
    weights (decoded 4-bit levels or int8 rows) within the int32 bound (K <= 65793)."""
    if x_dtype not in ("uint8", "int8"):
        raise ValueError(f"amx_dense_kernel: activations must be uint8 or int8, got {x_dtype}")
    x, w = activation_range(x_dtype), operand_range(None)
    check_accumulators("amx_dense_kernel", k, x, w, describe(x_dtype, None, x, w))
    gemm = _amx_gemm(m, k, n, x_dtype, num_cores)
    _, kp, np_ = _padded(m, k, n)

    @T.prim_func(private=True)
    def kernel(x: T.Buffer((m, k), x_dtype), wb: T.Buffer((np_ // 16, kp // KB, 16, 64), "int8"),
               bias: T.Buffer((n,), "int32"), scale: T.Buffer((n,), "float32"), out: T.Buffer((m, n), "float32")):
        T.func_attr({"tirx.noalias": True})
        gemm(x, wb, bias, scale, out)

    return kernel
