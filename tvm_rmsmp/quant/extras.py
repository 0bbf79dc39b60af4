"""Optional dependencies and the pip extra that installs each (``pip install 'tvm-rmsmp[tune]'``).

The base install quantizes, compiles, exports and loads; these add the rest. A feature that
needs a missing one raises an ImportError naming the extra, before it does any work.
"""

from __future__ import annotations

import importlib.util
from typing import Dict, Sequence, Tuple

__all__ = ["EXTRAS", "require"]

#: extra -> (import name, what it is for): kept in step with pyproject.toml's optional-dependencies
EXTRAS: Dict[str, Tuple[Tuple[str, str], ...]] = {
    "tune": (("xgboost", "MetaSchedule's cost model"), ("cloudpickle", "TVM's builder and runner workers"),
             ("psutil", "TVM's builder and runner workers"), ("tornado", "TVM's RPC tracker and servers")),
    "models": (("tokenizers", "the MiniLM tokenizer"), ("PIL", "the sample photographs"),
               ("matplotlib", "the sample photographs (shipped with it)")),
    "report": (("matplotlib", "the report's plots"),),
    "opencl": (("pyopencl", "running OpenCL kernels on this machine"),),
    "hf": (("transformers", "Hugging Face models"),),
}


def require(extra: str, what: str, modules: Sequence[str] = ()) -> None:
    """Raise ImportError naming ``extra`` if any of its ``modules`` (default: all of the
    extra's) is not installed; ``what`` says which feature needed them."""
    known = dict(EXTRAS[extra])
    missing = [m for m in (modules or known) if importlib.util.find_spec(m) is None]
    if missing:
        why = ", ".join(f"{m} ({known.get(m, 'needed')})" for m in missing)
        raise ImportError(f"{what} needs {why}: pip install 'tvm-rmsmp[{extra}]'")
