"""The command line (``tvm-rmsmp``, ``python -m tvm_rmsmp``) and the demo. Nothing imports it."""

from .main import main

__all__ = ["main"]
