"""Machine-measured constants of the x86 kernels, one row per microarchitecture.

A row is picked by the target's LLVM CPU name (``mcpu``) when the table has it and its ISA
class is the target's (:func:`~schedules.x86_intrin.x86_isa`), else by ``<mcpu>/<isa>`` (a CPU
whose target has fewer features than the CPU: an AVX2 build for an AVX-512 CPU); every other CPU gets the row of
its ISA class, ``default-avx2`` or ``default-avx512vnni``, which hold the values measured on
znver3 (AVX2) and znver4 (AVX-512 VNNI). Every row has every key of :data:`KEYS`:

``pass_us``
    microseconds of one pass of :func:`~schedules.x86_gemv.gemv_layer_kernel` over both BERT
    FFN layers, by (byte rows per block, activation rows per pass), one thread:
    ``python -m bench.layer_kernels --passes``. Picks the batch-1 layer kernel's tiling
    (:func:`~schedules.x86_gemv.row_tile`, :func:`~schedules.x86_gemv.block_pairs`).
``gemv_max_rows``
    most activation rows a dense layer runs with that kernel (from one more on: the
    outer-product layer kernels, VNNI's or AVX2's): ``python -m bench.layer_kernels``.
``broadcast_min_rows``
    fewest activation rows for which the outer-product row-group kernel beats ``gemm_kernel``
    (1.05x at 8 rows, 1.13x at 64, 1.10x at 128; 1 x 768 x 1843 SP2 rows, one thread).
``l2_chunk_bytes``
    weight bytes per chunk of register tiles that the activation tiles pass over (kept in L2).
``zmm_pad_divisor``
    batch-1 dense on VNNI uses 64-byte (zmm) steps when its rows pad by at most
    ``bytes // zmm_pad_divisor`` (znver4: 1.10x at 1 x 768 x 1843 and 1 x 3072 x 461 SP2
    rows, one thread; 1.1-1.4x slower at batch 128, so batch 1 only); None: ymm always.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping, Optional

from tvm.target.codegen import target_has_features

__all__ = ["KEYS", "X86_CONSTANTS", "ISA_DEFAULTS", "constants_for", "target_cpu", "x86_constants", "x86_isa"]

KEYS = ("isa", "pass_us", "gemv_max_rows", "broadcast_min_rows", "l2_chunk_bytes", "zmm_pad_divisor")

#: AMD znver3 (EPYC, AVX2, no AVX-512), the project's first machine
_ZNVER3 = {
    "isa": "avx2",
    # python -m bench.layer_kernels --passes (znver3, one thread)
    "pass_us": {(4, 1): 84.0, (2, 1): 78.0, (2, 2): 110.0, (4, 2): 136.0, (2, 3): 183.0},
    # python -m bench.layer_kernels (both FFN layers, znver3, one thread; the row groups' kernels
    # alone, without the concatenation and gather they also need): 8 rows 433 vs 520 us,
    # 12 rows 638 vs 629, 14 rows 800 vs 779, 16 rows 851 vs 819; measured before the AVX2 layer
    # kernel (x86_intrin.layer_avx2_kernel) replaced them, not re-measured on znver3 since (on the
    # masked Xeon below the layer kernel took over from 5 rows)
    "gemv_max_rows": 12,
    # (measured on the project's znver3 / znver4 machines; the note does not say which)
    "broadcast_min_rows": 8,
    "l2_chunk_bytes": 96 * 1024,  # about 96 KiB of weights stay in L2 (znver3 / znver4: 512 KiB / 1 MiB L2)
    "zmm_pad_divisor": None,  # no zmm on AVX2
}

#: AMD znver4 (AVX-512 VNNI, VBMI; 512-bit operations run as two halves)
_ZNVER4 = {
    "isa": "avx512vnni",
    # python -m bench.layer_kernels --passes (znver4, one thread)
    "pass_us": {(4, 1): 37.0, (4, 2): 57.0, (4, 3): 82.0, (2, 4): 105.0, (2, 5): 135.0},
    # python -m bench.layer_kernels (both FFN layers, znver4, one thread): gemv vs layer kernel
    # 8 rows 209 vs 314 us, 16 rows 419 vs 481, 20 rows 524 vs 652, 24 rows 631 vs 649, 32 rows 845 vs 819
    "gemv_max_rows": 23,
    "broadcast_min_rows": 8,
    "l2_chunk_bytes": 96 * 1024,
    "zmm_pad_divisor": 8,  # znver4, see the module docstring
}

#: Intel Xeon with AVX-512 VNNI, VBMI and AMX (LLVM: rocketlake; 2 cores shared with other jobs,
#: load 3-4 while measuring, so within about 10%). ``pass_us``: 2026-12-05, ``python -m
#: bench.layer_kernels --passes``, one thread; three runs, medians. ``gemv_max_rows`` (where AMX is
#: off or refused; with AMX the AMX kernel takes over from 12 rows): the batch-1 kernel against the
#: static-batch layer kernel (``x86_intrin.layer_int8_kernel``), both FFN layers, one thread, CPU
#: time, ``RMSMP_AMX=0 python -m bench.layer_kernels --int8 --cpu-time --rows 8 9 12 13 16 17 20 23``
#: (2026-12-06, load 1.5): 8 rows 161 vs 134 us, 9 rows 190 vs 251, 12 rows 245 vs 247, 13 rows 290
#: vs 245, 16 rows 317 vs 233, 20 rows 383 vs 348, 23 rows 472 vs 342. The other constants are znver4's.
_ROCKETLAKE = dict(_ZNVER4, pass_us={(4, 1): 35.3, (4, 2): 44.4, (4, 3): 63.7, (2, 4): 77.2, (2, 5): 96.8},
                   gemv_max_rows=12)

#: The same Xeon with AVX-512, AVX-VNNI and AMX hidden from CPUID (``bench/cpuid_mask.py``;
#: LLVM still names it rocketlake, its targets then AVX2 only). 2026-12-06, one thread, load
#: about 1: ``pass_us`` from ``python -m bench.layer_kernels --passes``; ``gemv_max_rows`` from
#: ``python -m bench.layer_kernels --cpu-time --rows 4 5 6 7 8`` against ``layer_avx2_kernel``,
#: two runs (us, gemv vs layer): 4 rows 202 vs 223 and 254 vs 215, 5 rows 314 vs 297, 6 rows
#: 317 vs 300 and 306 vs 298, 8 rows 395 vs 358. The other constants are znver3's.
_ROCKETLAKE_AVX2 = dict(_ZNVER3, pass_us={(2, 1): 59.4, (2, 2): 105.2, (2, 3): 194.0, (4, 1): 66.0, (4, 2): 132.7},
                        gemv_max_rows=4)


def _frozen(row):
    return MappingProxyType({key: MappingProxyType(dict(v)) if isinstance(v, dict) else v for key, v in row.items()})


#: Constants per LLVM CPU name or ISA class default (module docstring)
X86_CONSTANTS: Mapping[str, Mapping] = MappingProxyType({name: _frozen(row) for name, row in {
    "znver3": _ZNVER3,
    "znver4": _ZNVER4,
    "rocketlake": _ROCKETLAKE,
    "rocketlake/avx2": _ROCKETLAKE_AVX2,
    "default-avx2": _ZNVER3,
    "default-avx512vnni": _ZNVER4,
}.items()})

#: The row a CPU missing from the table gets, by ISA class
ISA_DEFAULTS = MappingProxyType({"avx2": "default-avx2", "avx512vnni": "default-avx512vnni"})


def constants_for(isa: str, cpu: Optional[str] = None) -> Mapping:
    """The row of LLVM CPU ``cpu`` where the table has one for ``isa``, else ``isa``'s default."""
    if isa not in ISA_DEFAULTS:
        raise ValueError(f"x86 constants: unknown ISA {isa!r} (known: {sorted(ISA_DEFAULTS)})")
    for name in (str(cpu or ""), f"{cpu}/{isa}"):
        row = X86_CONSTANTS.get(name)
        if row is not None and row["isa"] == isa:
            return row
    return X86_CONSTANTS[ISA_DEFAULTS[isa]]


def target_cpu(target) -> Optional[str]:
    """The target's LLVM CPU name, or None."""
    return str(target.attrs.get("mcpu", "") or "") or None


def x86_isa(target) -> Optional[str]:
    """``"avx512vnni"``, ``"avx2"`` or None (not x86, or no AVX2) for an LLVM target (the ISA
    class of the x86 kernels; ``schedules.x86_intrin.x86_isa``)."""
    if target.kind.name != "llvm":
        return None
    triple = str(target.attrs.get("mtriple", "") or "")
    if triple and not triple.startswith(("x86_64", "i686", "i386")):
        return None
    if target_has_features("avx512vnni", target) and target_has_features("avx512vl", target):
        return "avx512vnni"
    if target_has_features("avx2", target):
        return "avx2"
    return None


def x86_constants(target) -> Optional[Mapping]:
    """The constants row for an LLVM ``target`` (its ``mcpu``, falling back to the default of
    its ISA class), or None where the target has no x86 kernels."""
    isa = x86_isa(target)
    return None if isa is None else constants_for(isa, target_cpu(target))
