"""From a quantized torch model to a TVM module: the frontend (torch.export -> Relax), the
targets, the pipeline that runs the graph passes and the schedules, and tuning. It may import
every other part; nothing but the CLI and the top-level names imports it."""

from .pipeline import compile, lower  # noqa: A004
from .targets import TARGET_NAMES, resolve_target
from .tuning import TuningReport, tune

__all__ = ["compile", "lower", "resolve_target", "TARGET_NAMES", "tune", "TuningReport"]
