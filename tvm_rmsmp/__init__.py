"""tvm-rmsmp: RMSMP (row-wise mixed-scheme, multi-precision) quantization from PyTorch to TVM.

    import tvm_rmsmp as rmsmp
    cfg = rmsmp.RMSMPConfig(ratio={"sp2_4": 0.60, "fixed_4": 0.35, "fixed_8": 0.05}, act_bits=8)
    q = rmsmp.quantize(model, cfg, calib_data=[x0, x1])            # PTQ, or:
    qat = rmsmp.prepare_qat(model, cfg, calib); rmsmp.train_qat(qat, batches, loss_fn); q = rmsmp.convert_qat(qat)
    plans = rmsmp.row_plans(q)
    rmsmp.save_quantized(q, "q-dir"); q = rmsmp.load_quantized("q-dir", model=Model())   # no pickle
    exe = rmsmp.compile(q, (x,), target="llvm")       # or tuning=work_dir after rmsmp.tune(...)
    y = exe(x); seconds = exe.benchmark(x, repeat=20); exe.export_library("model.so")
    exe = rmsmp.runtime.load("model.so")               # on a machine with TVM and numpy only

The package is built of parts (docs/design.md, "The house"): ``quant`` (the quantization
math: numpy only), ``nn`` (the torch side), ``runtime`` (TVM runtime and numpy, no torch),
``compiler`` (import, passes, schedules, build, tuning), ``fpga`` (the accelerator model),
``models`` (built-in models and data) and ``cli``. Every public name below is loaded on
first use, so ``import tvm_rmsmp.runtime`` (or ``import relay_passes``) does not load torch.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

#: public name -> the module that defines it
_LAZY = {
    **dict.fromkeys(("Scheme", "get_scheme", "list_schemes", "register_scheme"), "quant.schemes"),
    **dict.fromkeys(("RMSMPConfig", "HessianConfig", "DEFAULT_RATIO", "validate_ratio", "RMSMPWarning"),
                    "quant.config"),
    **dict.fromkeys(("RowPlan", "row_counts"), "quant.plan"),
    "register_assign_rule": "quant.assign",
    **dict.fromkeys(("set_progress", "progress_enabled"), "quant.progress"),
    **dict.fromkeys(("RMSMPLinear", "RMSMPConv2d", "quantize", "row_plans"), "nn.layers"),
    **dict.fromkeys(("RMSMPAdd", "RMSMPAvgPool", "RMSMPMaxPool"), "nn.residual"),
    **dict.fromkeys(("QATConfig", "prepare_qat", "train_qat", "convert_qat"), "nn.qat"),
    **dict.fromkeys(("save_quantized", "load_quantized"), "nn.saved"),
    **dict.fromkeys(("PruneConfig", "prune", "prune_masks", "apply_masks"), "nn.prune"),
    **dict.fromkeys(("compile", "lower"), "compiler.pipeline"),
    **dict.fromkeys(("load", "CompiledModel"), "runtime.library"),
    "resolve_target": "compiler.targets",
    **dict.fromkeys(("tune", "TuningReport"), "compiler.tuning"),
}

#: Subpackages loaded on first use (``rmsmp.fpga.derive_ratio(...)``).
_LAZY_MODULES = ("fpga", "quant", "nn", "compiler", "runtime", "models", "cli")

#: Module paths of releases before the package had parts -> where they live now. Importing an
#: old path still works (the module is the new one under both names).
MOVED = {
    "schemes": "quant.schemes", "config": "quant.config", "plan": "quant.plan", "assign": "quant.assign",
    "torch_quant": "nn.layers", "torch_ops": "nn.ops", "hessian": "nn.hessian", "qat": "nn.qat",
    "layerwise": "nn.layerwise", "frontend": "compiler.frontend", "pipeline": "compiler.pipeline",
    "targets": "compiler.targets", "tuning": "compiler.tuning", "opencl_tuning": "compiler.opencl_tuning",
    "relax_graph": "runtime.graph", "opencl_runtime": "runtime.opencl", "rpc_loopback": "runtime.rpc",
    "fileio": "runtime.fileio", "data": "models.data", "offline": "models.offline", "demo": "cli.demo",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``tvm_rmsmp.<old name>`` to the module's place in its part."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, rest = fullname.partition(".")
        if prefix != __name__ or rest not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(f"{__name__}.{MOVED[spec.name.partition('.')[2]]}")
        self._spec = module.__spec__  # the import machinery sets the alias's spec on it next
        return module

    def exec_module(self, module):
        module.__spec__, module.__loader__ = self._spec, self._spec.loader


if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())


def __getattr__(name):
    if name in _LAZY_MODULES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    if name in MOVED:  # ``rmsmp.targets.TARGET_NAMES``: an old module path as an attribute
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tvm_rmsmp' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_LAZY_MODULES))


__all__ = sorted(_LAZY)
