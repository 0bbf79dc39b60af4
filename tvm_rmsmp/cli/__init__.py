"""The command line (``tvm-rmsmp``, ``python -m tvm_rmsmp``: :mod:`.main`), its report
(:mod:`.report`: report.json and plots) and VM profiler (:mod:`.profile`), and the demo.
Nothing in the package imports it; bench/ uses the report's plots and the profiler."""

from .main import main

__all__ = ["main"]
