"""MetaSchedule builder and runner that measure OpenCL candidates on the local OpenCL device.

TVM's own runners measure through TVM's OpenCL runtime, which the PyPI wheel lacks. Here the
builder compiles each candidate with TVM and saves its OpenCL C source and launches as a
JSON artifact; the runner builds that with pyopencl and times it on the local device (PoCL on
a CPU: a proxy, labelled as such; on a phone, use TVM's RPCRunner against TVM's RPC app).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from typing import List

import numpy as np
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

import schedules

from ..runtime.opencl import OpenCLPrimFunc, opencl_context

__all__ = ["OpenCLArtifactBuilder", "PyOpenCLRunner"]


def _error(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


@derived_object
class OpenCLArtifactBuilder(ms.builder.PyBuilder):
    """Compiles candidates with TVM; the artifact is the kernel source plus its launches (JSON)."""

    def build(self, build_inputs: List[ms.builder.BuilderInput]) -> List[ms.builder.BuilderResult]:
        results = []
        for inp in build_inputs:
            try:
                schedules.registry._VERIFY.get(inp.target.kind.name, lambda m, t: None)(inp.mod, inp.target)
                art = OpenCLPrimFunc._compile(inp.mod["main"], inp.target, "candidate")
                # one folder per artifact: MetaSchedule removes the artifact's folder after measuring
                path = os.path.join(tempfile.mkdtemp(prefix="rmsmp_opencl_"), "kernel.json")
                with open(path, "w") as fh:
                    json.dump(art, fh)
                results.append(ms.builder.BuilderResult(path, None))
            except Exception as err:  # noqa: BLE001  (an invalid candidate is a build error)
                results.append(ms.builder.BuilderResult(None, _error(err)))
        return results


@derived_object
class _DoneFuture(ms.runner.PyRunnerFuture):
    def __init__(self, result: ms.runner.RunnerResult):
        super().__init__()
        self.res = result

    def done(self) -> bool:
        return True

    def result(self) -> ms.runner.RunnerResult:
        return self.res


@derived_object
class PyOpenCLRunner(ms.runner.PyRunner):
    """Times candidates on the local OpenCL device with pyopencl (random inputs, ``repeat`` launches)."""

    def __init__(self, repeat: int = 5):
        super().__init__()
        self.repeat = repeat

    def run(self, runner_inputs: List[ms.runner.RunnerInput]) -> List[ms.runner.RunnerFuture]:
        import pyopencl as cl

        ctx, queue, _ = opencl_context()
        futures = []
        rng = np.random.default_rng(0)
        for inp in runner_inputs:
            try:
                with open(inp.artifact_path) as fh:
                    kernel = OpenCLPrimFunc.from_artifact(json.load(fh))
                bufs = []
                for info in inp.args_info:
                    shape = [int(d) for d in info.shape]
                    dtype = str(info.dtype)
                    arr = rng.integers(-8, 8, shape).astype(dtype) if "int" in dtype else rng.random(shape).astype(dtype)
                    bufs.append(cl.Buffer(ctx, cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR,
                                          hostbuf=np.ascontiguousarray(arr)))
                work = kernel.workspaces()
                kernel.enqueue(queue, bufs, work)
                queue.finish()
                times = []
                for _ in range(self.repeat):
                    t0 = time.perf_counter()
                    kernel.enqueue(queue, bufs, work)
                    queue.finish()
                    times.append(time.perf_counter() - t0)
                futures.append(_DoneFuture(ms.runner.RunnerResult([statistics.median(times)], None)))
            except Exception as err:  # noqa: BLE001
                futures.append(_DoneFuture(ms.runner.RunnerResult(None, _error(err))))
        return futures
