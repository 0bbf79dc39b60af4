"""Running compiled models: load a library with its sidecar, the OpenCL graph executor, RPC
helpers and atomic files. Imports the TVM runtime and numpy; never torch, so a deployment
machine needs neither torch nor the compiler."""

from .host import host_cpu_target
from .library import CompiledModel, OpenCLCompiledModel, checked_inputs, load

__all__ = ["CompiledModel", "OpenCLCompiledModel", "load", "checked_inputs", "host_cpu_target"]
