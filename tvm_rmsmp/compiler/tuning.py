"""Autotuning of the row-group kernels with MetaSchedule (XGBoost cost model).

Each distinct row-group kernel of a model (same op, shapes and scheme: layers that share
them share the task) is one MetaSchedule task whose search space is the target's own
schedule with its tile sizes sampled (``schedules.space_for``), so every candidate keeps the
kernel's structure: parallel row tiles and vectorized reductions on CPUs, whole work-group
tiles in local memory on GPUs, SP2 rows as shift-add everywhere.

Records go to a JSON database in ``work_dir`` (one line per measurement, appended and flushed
as measured: a run killed mid-way keeps every finished record; a second ``tune`` resumes from
them). ``rmsmp.compile(..., tuning=work_dir)`` applies the best record of each kernel and
falls back to the default schedule for kernels without one.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Dict, Optional, Sequence, Tuple

import attrs
import tvm
import tvm_ffi
from tvm import tirx

import schedules

from ..quant.config import RMSMPWarning
from ..quant.extras import require
from ..quant.progress import progress_enabled
from ..runtime.fileio import atomic_write
from .pipeline import apply_target_passes, lower
from .records import (
    apply_tuning,
    check_records,
    has_fixed_kernel,
    manifest_path,
    open_database,
    read_manifest,
    row_group_kernels,
    target_key,
    workload,
)
from .targets import resolve_target

__all__ = ["tune", "TuningReport", "apply_tuning", "open_database"]


@attrs.frozen
class TuningReport:
    """What a tuning run did: its tasks (kernel name -> best seconds, or None) and trials."""

    work_dir: str
    target: str
    tasks: Dict[str, Optional[float]]
    trials: int


def light_tensor_intrin() -> None:
    """Make ``import tvm.s_tir.tensor_intrin`` cheap in this process.

    MetaSchedule's TuneContext and every LocalBuilder worker import that package, whose
    ``__init__`` parses the CUDA, ROCm, ARM, x86, Hexagon and RISC-V intrinsics: 30-77 s on a
    loaded 2-core machine, past the builder's timeout, so every trial failed. For CPU targets
    the package is registered with its x86 and ARM intrinsics only; the other submodules stay
    importable (``tvm.s_tir.tensor_intrin.cuda``).
    """
    import importlib.util
    import sys
    import types

    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    import tvm.s_tir

    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        return
    module = types.ModuleType(name, "tensor intrinsics (registered lazily by tvm-rmsmp)")
    module.__path__ = list(spec.submodule_search_locations)
    module.__file__ = spec.origin
    sys.modules[name] = module
    tvm.s_tir.tensor_intrin = module
    # the CPU ones: MetaSchedule's default x86/ARM rules look them up (e.g. dot_16x4_vnni)
    import tvm.s_tir.tensor_intrin.arm_cpu  # noqa: F401
    import tvm.s_tir.tensor_intrin.x86  # noqa: F401


def check_tracker(runner) -> None:
    """Fail early, naming the address, when an RPC runner's tracker does not answer."""
    config = getattr(runner, "rpc_config", None)
    if config is None or config.tracker_host is None:
        return
    import socket

    from tvm import rpc

    try:
        # a plain socket first: TVM's connect_tracker retries for a minute before it gives up
        socket.create_connection((config.tracker_host, int(config.tracker_port)), timeout=10).close()
        tracker = rpc.connect_tracker(config.tracker_host, int(config.tracker_port))
        summary = tracker.summary()
    except Exception as err:  # noqa: BLE001 - any failure to reach it is the same user error
        raise ConnectionError(
            f"RPC tracker {config.tracker_host}:{config.tracker_port} is unreachable ({type(err).__name__}: {err}); "
            "start one with `python -m tvm.exec.rpc_tracker` or fix the runner's RPCConfig"
        ) from None
    keys = {k for k in summary.get("queue_info", {})}
    if config.tracker_key not in keys:
        raise ConnectionError(
            f"RPC tracker {config.tracker_host}:{config.tracker_port} has no server with key "
            f"{config.tracker_key!r} (keys: {sorted(keys)})"
        )


class _Progress:
    """Trials done and best latency so far, printed as MetaSchedule measures."""

    def __init__(self, total: int, names: Sequence[str], enabled: bool):
        from tqdm import tqdm

        self.best: Dict[int, float] = {}
        self.first_error: Optional[str] = None
        self.done = 0
        self.names = list(names)
        self.bar = tqdm(total=total, desc="tuning", unit="trial", disable=not enabled, dynamic_ncols=True)

    def update(self, task_id: int, runner_results) -> None:
        for r in runner_results:
            if r.error_msg is not None and self.first_error is None:
                self.first_error = str(r.error_msg)
            if r.error_msg is None and r.run_secs:
                secs = sum(float(s) for s in r.run_secs) / len(r.run_secs)
                if secs < self.best.get(task_id, float("inf")):
                    self.best[task_id] = secs
        self.done += len(runner_results)
        self.bar.update(len(runner_results))
        done = sum(self.best.get(i, 0.0) for i in range(len(self.names)))
        self.bar.set_postfix_str(f"best total {done * 1e6:.1f} us over {len(self.best)}/{len(self.names)} kernels")


def _progress_callback(progress: _Progress):
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class _Callback(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            progress.update(task_id, runner_results)

    return _Callback()


def tune(
    model,
    example_inputs: Sequence,
    target="llvm",
    work_dir: str = "rmsmp_tuning",
    trials: int = 64,
    *,
    trials_per_task: Optional[int] = None,
    trials_per_iter: int = 16,
    runner=None,
    seed: Optional[int] = 0,
    progress: Optional[bool] = None,
) -> TuningReport:
    """Tune the row-group kernels of ``model`` for ``target``; records go to ``work_dir``.

    trials: measurements in total (over all kernels); a second call adds to the records.
    runner: a MetaSchedule runner (default: measure on this machine), e.g.
    ``tvm.s_tir.meta_schedule.runner.RPCRunner(...)`` to measure on a board through TVM's RPC
    (its tracker is checked first: unreachable, or no server of the key, is a ConnectionError).
    Kernels that the target realizes with a hand-written intrinsic kernel (on x86: packed
    4-bit rows with AVX2, int8 rows with AVX-512 VNNI, dense and conv2d, and whole dense layers
    at small batches) have nothing to tune and are left out; on a VNNI CPU that is every row
    group.
    progress: the trials bar; None follows :func:`tvm_rmsmp.set_progress` (shown on a terminal).
    """
    require("tune", "tvm_rmsmp.tune", ("xgboost", "cloudpickle", "psutil"))
    from tvm.s_tir import meta_schedule as ms

    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    target = resolve_target(target)
    if target.kind.name == "llvm" and "num-cores" not in str(target):  # noqa: SIM102
        raise ValueError("MetaSchedule needs 'num-cores' in an llvm target dict")
    if target.kind.name == "llvm":
        light_tensor_intrin()
    mod, _ = lower(model, example_inputs, target, schedule=False)
    # the target's own kernels in place first: groups it replaces or fuses (whole dense layers
    # on x86) are not tuned, since a tuned schedule would only keep them from it
    mod = apply_target_passes(mod, target)
    kernels = [k for k in row_group_kernels(mod)
               if "tirx.is_scheduled" not in k[2].attrs and not has_fixed_kernel(k[2], target)]
    check_tracker(runner)
    unique: Dict[str, Tuple[str, str, tirx.PrimFunc]] = {}
    for name, op, func in kernels:
        wl = workload(func)
        key = hashlib.sha256(str(tvm_ffi.structural_hash(wl)).encode()).hexdigest()[:16]
        unique.setdefault(key, (name, op, wl))
    os.makedirs(work_dir, exist_ok=True)
    meta = read_manifest(work_dir)
    if meta is not None and meta.get("target") != target_key(target):
        raise ValueError(f"tuning directory {work_dir!r} was tuned for {meta.get('target')}; use another directory")
    check_records(work_dir)

    tasks = []
    names = []
    for key, (name, op, wl) in sorted(unique.items(), key=lambda kv: kv[1][0]):
        space = schedules.space_for(target, op)
        if space is None:
            continue
        fn = (lambda space_fn: lambda sch: space_fn(sch, target, tunable=True))(space)
        tasks.append(
            ms.TuneContext(
                mod=tvm.IRModule({"main": wl}),
                target=target,
                space_generator=ms.space_generator.ScheduleFn(fn),
                search_strategy="evolutionary",
                task_name=name,
                rand_state=seed if seed is not None else -1,
                num_threads="physical",
                logger=None,
            ).clone()
        )
        names.append(name)
    if not tasks:
        warnings.warn("no row-group kernel to tune in this model", RMSMPWarning, stacklevel=2)
        return TuningReport(work_dir, target_key(target), {}, 0)

    manifest = {"format": "tvm-rmsmp-tuning", "version": 1, "target": target_key(target),
                "kernels": sorted(set((meta or {}).get("kernels", [])) | set(names))}
    atomic_write(manifest_path(work_dir), json.dumps(manifest, indent=1).encode())
    if target.kind.name == "opencl" and runner is None:
        # No OpenCL runtime in the TVM wheel: measure on the local OpenCL device (PoCL here).
        from .opencl_tuning import OpenCLArtifactBuilder, PyOpenCLRunner

        builder, runner = OpenCLArtifactBuilder(), PyOpenCLRunner()
    else:
        builder = ms.builder.LocalBuilder(max_workers=os.cpu_count() or 1, timeout_sec=60,
                                          initializer=light_tensor_intrin)
        runner = runner or ms.runner.LocalRunner()
    bar = _Progress(trials, names, progress_enabled() if progress is None else progress)
    db = open_database(work_dir, target)
    try:
        ms.tune_tasks(
            tasks=tasks,
            task_weights=[1.0] * len(tasks),
            work_dir=work_dir,
            max_trials_global=trials,
            max_trials_per_task=trials_per_task,
            num_trials_per_iter=trials_per_iter,
            builder=builder,
            runner=runner,
            database=db,
            cost_model="xgb",
            measure_callbacks=ms.measure_callback.MeasureCallback.create("default") + [_progress_callback(bar)],
            task_scheduler="gradient",
        )
    finally:
        bar.bar.close()
    if bar.done and not bar.best:
        warnings.warn(f"tuning: none of the {bar.done} candidates ran; the first error was:\n{bar.first_error}",
                      RMSMPWarning, stacklevel=2)
    best = {}
    for i, task in enumerate(tasks):
        top = db.get_top_k(db.commit_workload(task.mod), 1)
        secs = [float(s) for s in top[0].run_secs] if top and top[0].run_secs else []
        best[names[i]] = sum(secs) / len(secs) if secs else bar.best.get(i)
    return TuningReport(work_dir, target_key(target), best, bar.done)
