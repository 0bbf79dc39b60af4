"""AMX-INT8 dense kernels (Intel Xeon since Sapphire Rapids): the tile unit for many activation rows.

A ``tdpbusd`` / ``tdpbssd`` multiplies a 16 x 64 byte tile of activations (``A``, unsigned or
signed: the activation contract's uint8 / int8) by a 64 x 16 tile of int8 weights (``B``) into
a 16 x 16 int32 tile: 16384 MACs per instruction, 16x a 512-bit ``vpdpbusd``. Every row of a
row-group layer (packed 4-bit SP2 and Fixed-4 levels, which fit int8 exactly, and int8 rows)
is one int8 column of ``B``, in the order the graph wants the outputs, so the kernel needs no
offsets, no activation sums and no per-scheme code in its loop.

``B`` is laid out at compile time (:func:`amx_weights`, the weights are constants): tile by
tile, ``[n / 16, k / 64, 16, 64]``, each 1 KiB tile in the VNNI layout the instruction reads
(row ``k' / 4``, byte ``4 n' + k' % 4``), zero-padded to whole tiles. The cost: one byte per
weight (packed 4-bit rows take half a byte as stored), e.g. 4.7 MB for a BERT FFN's two
768 x 3072 layers instead of 2.4 MB; decoding per call instead measured slower (see
:data:`AMX_MIN_ROWS`'s note in ``docs/performance.md``).

Per call the activations are staged once, zero-padded to whole ``32 x 64`` blocks. The
parallel loop runs over chunks of 32-column weight panels; each task configures the tile
unit (``ldtilecfg``: 8 tiles of 16 rows x 64 bytes), and for each panel and each 32-row block
of activations keeps a 2 x 2 block of int32 accumulator tiles (32 x 32 outputs) over the
whole reduction: per 64-deep step two ``A`` and two ``B`` tile loads feed four products.
The accumulators are stored to a per-task buffer and the epilogue
``float32(acc + bias) * scale`` (as every x86 kernel, bit for bit) runs on 16-lane AVX-512
vectors. ``tilerelease`` at the end of each task.

Linux grants a process the tile state only after ``arch_prctl(ARCH_REQ_XCOMP_PERM,
XFEATURE_XTILEDATA)``; every call of the kernel asks first (one system call, about a
microsecond, idempotent; the permission is the process's, so the runtime's worker threads
have it), so an exported library works without this package. Refused (an old kernel, a
container denying it), the call fails with :data:`AMX_REFUSED`.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import numpy as np
import tvm
from tvm.script import tirx as T
from tvm.target.codegen import target_has_features

from .x86_bounds import activation_range, check_accumulators, describe, operand_range

__all__ = ["AMX_MIN_ROWS", "AMX_REFUSED", "amx_enabled", "amx_dense_kernel", "amx_weights", "amx_weight_layout"]

#: Fewest activation rows for which the AMX kernel replaces the VNNI ones (measured, see
#: docs/performance.md: ``python -m bench.layer_kernels --amx``)
AMX_MIN_ROWS = 16

#: The error a kernel call raises where the OS refuses the tile state
AMX_REFUSED = ("AMX: the OS refused the tile state (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); "
               "rebuild without AMX: RMSMP_AMX=0, or a target without it (mattr '-amx-int8')")

MB, NB, KB = 32, 32, 64  # a block of outputs (2 x 2 tiles of 16 x 16) and a reduction step


def amx_enabled(target) -> bool:
    """Whether ``target`` gets the AMX kernels: x86 with ``amx-int8``, ``amx-tile`` and
    AVX-512 (the epilogue), unless the environment says ``RMSMP_AMX=0``."""
    if os.environ.get("RMSMP_AMX", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if target.kind.name != "llvm":
        return False
    return all(bool(target_has_features(f, target)) for f in ("amx-int8", "amx-tile", "avx512f", "avx512bw"))


def _padded(m: int, k: int, n: int) -> Tuple[int, int, int]:
    return -(-m // MB) * MB, -(-k // KB) * KB, -(-n // NB) * NB


def amx_weights(w: np.ndarray) -> np.ndarray:
    """int8 weights ``[n, k]`` (decoded levels) as the kernel reads them: ``[n / 16, k / 64, 16, 64]``,
    tile ``(j, s)`` holding rows ``16 j ..``, columns ``64 s ..`` in the VNNI layout, zero-padded."""
    if w.ndim != 2 or w.dtype != np.int8:
        raise ValueError(f"amx_weights: int8 weights [rows, k], got {w.dtype} {w.shape}")
    n, k = w.shape
    _, kp, np_ = _padded(1, k, n)
    pad = np.zeros((np_, kp), np.int8)
    pad[:n, :k] = w
    # [tile j, row r, step s, quad q, lane e] -> [j, s, q, r, e]: byte 4 r + e of VNNI row q
    tiles = pad.reshape(np_ // 16, 16, kp // KB, 16, 4).transpose(0, 2, 3, 1, 4)
    return np.ascontiguousarray(tiles.reshape(np_ // 16, kp // KB, 16, 64))


def amx_weight_layout(k: int, n: int) -> Tuple[int, int, int, int]:
    _, kp, np_ = _padded(1, k, n)
    return np_ // 16, kp // KB, 16, 64


def _tile(name: str, *args):
    return T.call_llvm_intrin("void", T.llvm_lookup_intrinsic_id(f"llvm.x86.{name}"), *args)


def amx_dense_kernel(m: int, k: int, n: int, x_dtype: str, levels: Sequence[Sequence[int]] = (),
                     int8_rows: bool = True, num_cores: int = 1) -> tvm.tirx.PrimFunc:
    """The PrimFunc ``(x [m, k], wb amx_weight_layout(k, n) int8, bias [n] int32, scale [n] f32,
    out [m, n] f32)``; ``levels`` / ``int8_rows``: the weights' values, for the int32 bound."""
    if x_dtype not in ("uint8", "int8"):
        raise ValueError(f"amx_dense_kernel: activations must be uint8 or int8, got {x_dtype}")
    values = [int(v) for lv in levels for v in lv] + ([-128, 127] if int8_rows or not levels else [])
    x, w = activation_range(x_dtype), operand_range(values)
    check_accumulators("amx_dense_kernel", k, x, w, describe(x_dtype, None if int8_rows else values, x, w))
    mp, kp, np_ = _padded(m, k, n)
    m_blocks, n_blocks, k_steps = mp // MB, np_ // NB, kp // KB
    # tasks: chunks of weight panels (4 per core); each task's panels meet every activation block
    tasks = max(1, min(n_blocks, 4 * max(1, num_cores)))
    per_task = -(-n_blocks // tasks)
    tasks = -(-n_blocks // per_task)
    dot = "tdpbssd" if x_dtype == "int8" else "tdpbusd"
    wb_shape = amx_weight_layout(k, n)

    @T.prim_func(private=True)
    def kernel(
        x: T.Buffer((m, k), x_dtype),
        wb: T.Buffer(wb_shape, "int8"),
        bias: T.Buffer((n,), "int32"),
        scale: T.Buffer((n,), "float32"),
        out: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        granted = T.call_extern("int64", "syscall", T.int64(158), T.int64(0x1023), T.int64(18))
        assert granted == T.int64(0), AMX_REFUSED
        xs = T.alloc_buffer((mp, kp), x_dtype)
        for i in T.parallel(mp):
            for j in T.vectorized(kp):
                xs[i, j] = T.if_then_else(i < m and j < k, x[T.min(i, m - 1), T.min(j, k - 1)], T.Cast(x_dtype, 0))
        for task in T.parallel(tasks):
            cfg = T.alloc_buffer((64,), "uint8")
            acc = T.alloc_buffer((MB * NB,), "int32")
            for b in T.serial(64):
                cfg[b] = T.Select(b == 0, T.uint8(1), T.Select(b >= 16 and b < 32 and b % 2 == 0, T.uint8(64),
                                                               T.Select(b >= 48 and b < 56, T.uint8(16), T.uint8(0))))
            _tile("ldtilecfg", T.address_of(cfg[0]))
            for pb in T.serial(per_task):
                if task * per_task + pb < n_blocks:
                    for mb in T.serial(m_blocks):
                        for t in T.unroll(4):
                            _tile("tilezero", T.int8(t))
                        for s in T.serial(k_steps):
                            _tile("tileloadd64", T.int8(4), T.address_of(xs[mb * MB, s * KB]), T.int64(kp))
                            _tile("tileloadd64", T.int8(5), T.address_of(xs[mb * MB + 16, s * KB]), T.int64(kp))
                            _tile("tileloadd64", T.int8(6), T.address_of(wb[(task * per_task + pb) * 2, s, 0, 0]),
                                  T.int64(64))
                            _tile("tileloadd64", T.int8(7), T.address_of(wb[(task * per_task + pb) * 2 + 1, s, 0, 0]),
                                  T.int64(64))
                            _tile(dot, T.int8(0), T.int8(4), T.int8(6))
                            _tile(dot, T.int8(1), T.int8(4), T.int8(7))
                            _tile(dot, T.int8(2), T.int8(5), T.int8(6))
                            _tile(dot, T.int8(3), T.int8(5), T.int8(7))
                        for t in T.unroll(4):
                            _tile("tilestored64", T.int8(t), T.address_of(acc[t // 2 * 16 * NB + t % 2 * 16]), T.int64(NB * 4))
                        for r in T.serial(MB):
                            if mb * MB + r < m:
                                for h in T.unroll(2):
                                    if (task * per_task + pb) * NB + h * 16 + 16 <= n:
                                        out[mb * MB + r, T.ramp((task * per_task + pb) * NB + h * 16, 1, 16)] = T.Cast(
                                            "float32x16", acc[T.ramp(r * NB + h * 16, 1, 16)]
                                            + bias[T.ramp((task * per_task + pb) * NB + h * 16, 1, 16)]
                                        ) * scale[T.ramp((task * per_task + pb) * NB + h * 16, 1, 16)]
                                    else:
                                        for q in T.serial(16):
                                            if (task * per_task + pb) * NB + h * 16 + q < n:
                                                out[mb * MB + r, (task * per_task + pb) * NB + h * 16 + q] = T.Cast(
                                                    "float32", acc[r * NB + h * 16 + q]
                                                    + bias[(task * per_task + pb) * NB + h * 16 + q]
                                                ) * scale[(task * per_task + pb) * NB + h * 16 + q]
            _tile("tilerelease")

    return kernel
