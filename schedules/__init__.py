"""Per-target realizations of the RMSMP row-group ops (one module per target)."""

from . import (
    cpu,  # noqa: F401  (registers "llvm")
    fpga,  # noqa: F401  (registers "ext_dev": the RMSMP FPGA accelerator)
    gpu,  # noqa: F401  (registers "opencl" and "cuda")
)
from .registry import (
    apply_rules,
    build_pipeline,
    fixed_kernel,
    graph_kernels,
    register_target,
    registered_kinds,
    rules_for,
    space_for,
)

__all__ = ["apply_rules", "build_pipeline", "fixed_kernel", "graph_kernels", "registered_kinds", "register_target", "rules_for", "space_for"]
