"""GPU kernel (OpenCL, CUDA) of the block-sparse dense op (``contract.DENSE_BSR``, made by
``relay_passes.SparsifyRowGroups``): every thread computes one output element from the kept
blocks of its block row only.

A work-group is ``TM`` activation rows (``threadIdx.y``) x ``TB`` block rows of ``br`` rows
each (``threadIdx.x``, ``TB * br`` threads: a block's ``br`` rows are neighbouring threads, so
they read one block's ``br x bc`` contiguous levels together). Each thread walks the kept
blocks of its block row (``ptr[rb] .. ptr[rb + 1]``), the ``bc`` columns unrolled, summing
int32 products, then applies the row-group epilogue ``float32(acc + bias) * scale``. The
threads of one block row run the same number of iterations; block rows of one work-group
may differ (their counts are whatever the pruning left). No local memory: a block's levels
are read once per activation row, the activations of a block column by its ``br`` threads
(cached). ``TM`` and ``TB`` divide the extents (no bounds guards; see ``schedules/gpu.py``
``_divisor``) and the work-group stays within the target's ``max_num_threads``.

Exact: int32 sums of int8/uint8 x int8 products, then one float multiply.
"""


from typing import Optional

import tvm
from tvm import s_tir
from tvm.script import tirx as T

from relay_passes import contract

from .registry import OpScheduleRule

__all__ = ["gpu_bsr_kernel", "GPUSparseDense", "GPU_KERNEL", "THREADS"]

#: Threads per work-group the kernel aims for (block rows are grouped up to this many rows).
THREADS = 64
#: ``rmsmp.cpu_kernel`` value of the kernel (the attribute names the hand-written kernel kind).
GPU_KERNEL = "gpu-bsr"


def _divisor(n: int, cap: int) -> int:
    return max(d for d in range(1, max(1, cap) + 1) if n % d == 0)


def gpu_bsr_kernel(m: int, k: int, n: int, br: int, bc: int, nnzb: int, x_dtype: str,
                   max_threads: int = 256) -> tvm.tirx.PrimFunc:
    """The block-sparse op as a GPU kernel (module docstring); parameters as the op's."""
    nrb, nb = n // br, max(nnzb, 1)
    if br > max_threads:
        raise ValueError(f"gpu_bsr_kernel: blocks of {br} rows exceed the work-group limit of {max_threads} threads")
    tm = _divisor(m, max(1, min(4, max_threads // br)))
    tb = _divisor(nrb, max(1, min(THREADS, max_threads // tm) // br))
    tx = tb * br

    @T.prim_func(private=True)
    def kernel(x: T.Buffer((m, k), x_dtype), w: T.Buffer((nb, br, bc), "int8"), col: T.Buffer((nb,), "int32"),
               ptr: T.Buffer((nrb + 1,), "int32"), wsum: T.Buffer((n,), "int32"), bias: T.Buffer((n,), "int32"),
               scale: T.Buffer((n,), "float32"), out: T.Buffer((m, n), "float32")):
        T.func_attr({"tirx.noalias": True})
        for bm in T.thread_binding(m // tm, thread="blockIdx.y"):
            for bn in T.thread_binding(nrb // tb, thread="blockIdx.x"):
                for ti in T.thread_binding(tm, thread="threadIdx.y"):
                    for tr in T.thread_binding(tx, thread="threadIdx.x"):
                        acc = T.alloc_buffer((1,), "int32", scope="local")
                        acc[0] = 0
                        for j in T.serial(ptr[bn * tb + tr // br], ptr[bn * tb + tr // br + 1]):
                            for c in T.unroll(bc):
                                acc[0] = acc[0] + T.Cast("int32", x[bm * tm + ti, col[j] * bc + c]) * T.Cast(
                                    "int32", w[j, tr % br, c])
                        out[bm * tm + ti, bn * tx + tr] = T.Cast(
                            "float32", acc[0] + bias[bn * tx + tr]) * scale[bn * tx + tr]

    return kernel


def bsr_gpu_kernel_for(func: tvm.tirx.PrimFunc, target: tvm.target.Target) -> Optional[tvm.tirx.PrimFunc]:
    """The GPU kernel for a block-sparse op on ``target`` (None for any other function)."""
    if contract.rmsmp_attr(func, contract.OP) != contract.DENSE_BSR:
        return None
    x, w = func.params[0], func.params[1]
    m, k = (int(d) for d in x.shape)
    n = int(func.params[-1].shape[1])
    br, bc = (int(v) for v in contract.attr(func, contract.SPARSE_BLOCK))
    try:
        max_threads = int(target.attrs["max_num_threads"])
    except (KeyError, TypeError):
        max_threads = 256
    kernel = gpu_bsr_kernel(m, k, n, br, bc, int(w.shape[0]), str(x.dtype), max_threads)
    for key in (contract.OP, contract.LAYER, contract.SPARSE_BLOCK, contract.SPARSE_ROW_SCHEMES):
        kernel = kernel.with_attr(key, func.attrs[key])
    return kernel.with_attr(contract.CPU_KERNEL, GPU_KERNEL).with_attr("tirx.is_scheduled", True)


class _GPUSparseRule(OpScheduleRule):
    def apply(self, func, target: tvm.target.Target, _tunable: bool):
        if target.kind.name not in self.kinds or not isinstance(func, tvm.tirx.PrimFunc):
            return None
        kernel = bsr_gpu_kernel_for(func, target)
        return None if kernel is None else s_tir.Schedule(kernel)


#: The schedule rule of the block-sparse op on GPU targets (registered with the GPU's rules).
GPUSparseDense = _GPUSparseRule(contract.DENSE_BSR, lambda sch, target: None,
                                kinds=("opencl", "cuda", "vulkan", "metal", "rocm"))
