"""Tuning records: the database a :func:`tvm_rmsmp.tune` run writes, and applying its best
schedules to a lowered module (the pipeline reads records; only tuning writes them)."""

from __future__ import annotations

import json
import os
import warnings
from typing import Dict, List, Optional, Tuple

import tvm
from tvm import tirx

import schedules

from ..quant.config import RMSMPWarning
from ..runtime.fileio import atomic_write
from relay_passes import contract

__all__ = ["apply_tuning", "open_database", "check_records", "target_key", "read_manifest", "manifest_path", "row_group_kernels",
           "workload", "has_fixed_kernel", "RECORD_FILES"]

_MANIFEST = "rmsmp_tuning.json"
RECORD_FILES = ("database_workload.json", "database_tuning_record.json")


def workload(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """The tuning identity of a kernel: its computation, not the layer it came from."""
    return func.without_attr(contract.LAYER).with_attr("global_symbol", "main")


def row_group_kernels(mod: tvm.IRModule) -> List[Tuple[str, str, tirx.PrimFunc]]:
    out = []
    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc) and func.attrs is not None and contract.OP in func.attrs:
            op = str(func.attrs[contract.OP])
            if op in ("dense", "conv2d"):
                out.append((gv.name_hint, op, func))
    return out


def has_fixed_kernel(func: tirx.PrimFunc, target: tvm.target.Target) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the schedule rules warn once, at compile time
        return schedules.fixed_kernel(func, target) is not None


def check_records(work_dir: str, structure: bool = True) -> None:
    """Refuse corrupt record files by name and line; drop a torn last line left by a kill;
    (``structure``) then check every line is what MetaSchedule reads (:func:`check_record_structure`)."""
    for name in RECORD_FILES:
        path = os.path.join(work_dir, name)
        if not os.path.exists(path):
            continue
        with open(path, "rb") as fh:
            data = fh.read()
        lines = data.split(b"\n")
        torn = data and not data.endswith(b"\n")
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except ValueError:
                if torn and i == len(lines):
                    warnings.warn(f"{path}: dropping a torn last record (line {i}) from an interrupted run",
                                  RMSMPWarning, stacklevel=3)
                    keep = b"\n".join(lines[:-1]) + b"\n"
                    atomic_write(path, keep)
                    break
                raise ValueError(f"tuning database {path} is corrupt at line {i}: not a JSON record") from None
    if structure:
        check_record_structure(work_dir)


def check_record_structure(work_dir: str) -> None:
    """Every workload line must parse as a MetaSchedule workload and every record line as
    ``[workload index, record]`` of a known workload; a clear error names the file and line
    (TVM's own reader fails deep in C++ on such files)."""
    from tvm.s_tir import meta_schedule as ms

    workloads = []
    wl_path, rec_path = (os.path.join(work_dir, n) for n in RECORD_FILES)
    for i, item in _json_lines(wl_path):
        try:
            workloads.append(ms.database.Workload.from_json(item))
        except Exception as err:  # noqa: BLE001  (TVM raises its own error types)
            raise ValueError(f"tuning database {wl_path} line {i} is not a MetaSchedule workload: "
                             f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    for i, item in _json_lines(rec_path):
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], int)
                and 0 <= item[0] < len(workloads)):
            raise ValueError(f"tuning database {rec_path} line {i} is not [workload index, record] with an index "
                             f"below {len(workloads)} (the workloads in {os.path.basename(wl_path)})")
        try:
            ms.database.TuningRecord.from_json(item[1], workloads[item[0]])
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"tuning database {rec_path} line {i} is not a MetaSchedule tuning record: "
                             f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


def _json_lines(path: str):
    if not os.path.exists(path):
        return
    with open(path, "rb") as fh:
        for i, line in enumerate(fh, 1):
            if line.strip():
                yield i, json.loads(line)


def manifest_path(work_dir: str) -> str:
    return os.path.join(work_dir, _MANIFEST)


def read_manifest(work_dir: str) -> Optional[dict]:
    path = manifest_path(work_dir)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as fh:
            meta = json.load(fh)
        if meta.get("format") != "tvm-rmsmp-tuning":
            raise ValueError("not a tvm-rmsmp tuning manifest")
        return meta
    except (ValueError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is corrupt: {err}") from err


def target_key(target: tvm.target.Target) -> str:
    t = target.export() if hasattr(target, "export") else json.loads(str(target))
    keep = {k: t[k] for k in ("kind", "mcpu", "mtriple", "device", "arch") if k in t}
    return json.dumps(keep, sort_keys=True)


def open_database(work_dir: str, target: tvm.target.Target):
    """The JSON database of ``work_dir`` after checking it belongs to ``target``."""
    from tvm.s_tir import meta_schedule as ms

    meta = read_manifest(work_dir)
    if meta is not None and meta.get("target") != target_key(target):
        raise ValueError(
            f"tuning directory {work_dir!r} was tuned for {meta.get('target')}, not for {target_key(target)}"
        )
    check_records(work_dir)
    return ms.database.JSONDatabase(
        os.path.join(work_dir, RECORD_FILES[0]), os.path.join(work_dir, RECORD_FILES[1]), allow_missing=True
    )


def apply_tuning(mod: tvm.IRModule, target: tvm.target.Target, work_dir: str) -> Tuple[tvm.IRModule, Dict[str, bool]]:
    """Replace each row-group kernel by its best tuned schedule from ``work_dir``, where one exists."""
    if not os.path.isdir(work_dir):
        raise FileNotFoundError(f"tuning directory {work_dir!r} does not exist")
    db = open_database(work_dir, target)
    used: Dict[str, bool] = {}
    mod = tvm.IRModule(dict(mod.functions.items()), attrs=mod.attrs, global_infos=mod.global_infos)
    for name, _op, func in row_group_kernels(mod):
        if has_fixed_kernel(func, target):
            continue  # a hand-written intrinsic kernel replaces it: nothing tuned applies
        sch = db.query_schedule(tvm.IRModule({"main": workload(func)}), target=target, workload_name="main")
        used[name] = sch is not None
        if sch is not None:
            tuned = sch.mod["main"].with_attrs(dict(func.attrs)).without_attr("global_symbol")
            mod[mod.get_global_var(name)] = tuned.with_attr("tirx.is_scheduled", True)
    if used and not any(used.values()):
        warnings.warn(f"tuning directory {work_dir!r} has no record for any kernel of this model and target",
                      RMSMPWarning, stacklevel=3)
    return mod, used


