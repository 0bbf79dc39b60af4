"""tvm-rmsmp: RMSMP (row-wise mixed-scheme, multi-precision) quantization from PyTorch to TVM.

    import tvm_rmsmp as rmsmp
    cfg = rmsmp.RMSMPConfig(ratio={"sp2_4": 0.60, "fixed_4": 0.35, "fixed_8": 0.05}, act_bits=8)
    q = rmsmp.quantize(model, cfg, calib_data=[x0, x1])            # PTQ, or:
    qat = rmsmp.prepare_qat(model, cfg, calib); rmsmp.train_qat(qat, batches, loss_fn); q = rmsmp.convert_qat(qat)
    plans = rmsmp.row_plans(q)
    exe = rmsmp.compile(q, (x,), target="llvm")       # or tuning=work_dir after rmsmp.tune(...)
    y = exe(x); seconds = exe.benchmark(x, repeat=20); exe.export_library("model.so")
"""

# Order matters: the quantization math (no TVM) first, then what builds on it.
from .schemes import Scheme, get_scheme, list_schemes, register_scheme  # noqa: I001
from .config import DEFAULT_RATIO, HessianConfig, RMSMPConfig, validate_ratio
from .plan import RowPlan, row_counts
from .assign import register_assign_rule
from .torch_quant import RMSMPConv2d, RMSMPLinear, RMSMPWarning, quantize, row_plans
from .qat import QATConfig, convert_qat, prepare_qat, train_qat

# The TVM side (graph passes, schedules, build) imports this package's math, so it is loaded
# on first use: ``import relay_passes`` alone must not pull in the whole pipeline.
_LAZY = {
    "compile": "pipeline", "load": "pipeline", "lower": "pipeline", "CompiledModel": "pipeline",
    "resolve_target": "targets",
    "tune": "tuning", "TuningReport": "tuning",
}


#: Subpackages loaded on first use (``rmsmp.fpga.derive_ratio(...)``).
_LAZY_MODULES = ("fpga",)


def __getattr__(name):
    if name in _LAZY_MODULES:
        import importlib

        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tvm_rmsmp' has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = [
    "Scheme", "get_scheme", "list_schemes", "register_scheme",
    "RMSMPConfig", "HessianConfig", "DEFAULT_RATIO", "validate_ratio",
    "QATConfig", "prepare_qat", "train_qat", "convert_qat",
    "RowPlan", "row_counts", "register_assign_rule",
    "RMSMPLinear", "RMSMPConv2d", "RMSMPWarning", "quantize", "row_plans",
    "resolve_target", "CompiledModel", "compile", "load", "lower",
]
