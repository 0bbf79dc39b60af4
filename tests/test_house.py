"""The parts of the package and the directions they may import in (docs/design.md, "The house").

The import graph is read from the source (every ``import`` statement, function-level ones
included), so a rule broken only inside a function still fails here.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from typing import Dict, List, Set, Tuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("tvm_rmsmp", "relay_passes", "schedules")

#: part -> (module prefixes of the part, parts it may import, third-party roots it must not import)
PARTS: Dict[str, Tuple[Tuple[str, ...], Set[str], Set[str]]] = {
    "quant": (("tvm_rmsmp.quant",), set(), {"torch", "tvm", "tvm_ffi"}),
    "nn": (("tvm_rmsmp.nn",), {"quant"}, {"tvm", "tvm_ffi"}),
    "runtime": (("tvm_rmsmp.runtime",), {"quant"}, {"torch"}),
    "passes": (("relay_passes",), {"quant", "contract"}, {"torch"}),
    # the row-group op contract: the one module of the passes that schedules and the FPGA model read
    "contract": (("relay_passes.contract",), {"quant"}, {"torch"}),
    "schedules": (("schedules",), {"quant", "contract", "fpga_hw"}, {"torch"}),
    # the FPGA hardware description (boards, ISA, simulator, code generation) and its executor
    "fpga_hw": (("tvm_rmsmp.fpga",), {"quant", "contract", "runtime"}, {"torch"}),
    "fpga_exec": (("tvm_rmsmp.fpga.runtime",), {"quant", "contract", "runtime", "fpga_hw", "schedules"}, {"torch"}),
    "models": (("tvm_rmsmp.models",), {"quant", "nn"}, {"tvm", "tvm_ffi"}),
    "compiler": (("tvm_rmsmp.compiler",), {"quant", "nn", "runtime", "passes", "contract", "schedules", "fpga_hw",
                                            "fpga_exec", "models"}, set()),
    "cli": (("tvm_rmsmp.cli", "tvm_rmsmp.__main__"), {"*"}, set()),
    "facade": (("tvm_rmsmp",), {"*"}, {"torch", "tvm", "tvm_ffi"}),
}


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _modules() -> Dict[str, str]:
    out = {}
    for pkg in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(folder, f)
                    out[_module_name(path)] = path
    return out


def _imports(name: str, path: str, known: Set[str]) -> List[Tuple[str, int]]:
    """(imported name, line) for every import statement of a module, relative ones resolved;
    ``from X import y`` counts as importing ``X.y`` where that is a module of the project (and
    as importing ``X`` where some imported name is not a module)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            # ``from pkg import module`` depends on that module; anything else on ``base`` itself
            found += [(m, node.lineno) for m in subs] if len(subs) == len(node.names) else [(base, node.lineno)]
            found += [(m, node.lineno) for m in subs if len(subs) != len(node.names)]
    return found


def _part(module: str) -> str:
    best, length = None, -1
    for part, (prefixes, _, _) in PARTS.items():
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > length:
                best, length = part, len(p)
    return best


def _graph():
    mods = _modules()
    known = set(mods)
    edges: Dict[str, List[Tuple[str, int]]] = {}
    for name, path in mods.items():
        edges[name] = _imports(name, path, known)
    return mods, edges


def test_every_module_belongs_to_a_part():
    mods, _ = _graph()
    assert [m for m in mods if _part(m) is None] == []


def test_parts_import_only_what_their_rules_allow():
    mods, edges = _graph()
    broken = []
    for name, imported in edges.items():
        part = _part(name)
        _, allowed, banned = PARTS[part]
        for target, line in imported:
            where = f"{os.path.relpath(mods[name], ROOT)}:{line}: {name} ({part}) imports {target}"
            if target.split(".")[0] in banned:
                broken.append(where)
            other = _part(target) if target in mods else None
            if other is None or other == part:
                continue
            if other == "cli" or not ("*" in allowed or other in allowed):
                broken.append(f"{where} ({other})")
    assert broken == []


def test_no_import_cycles():
    mods, edges = _graph()
    graph = {m: sorted({t for t, _ in edges[m] if t in mods and t != m}) for m in mods}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []
    counter = [0]

    def strongconnect(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            strongconnect(v)
    assert cycles == []


def test_rules_catch_a_forbidden_import(tmp_path):
    """The checker itself: a pass that imports schedules inside a function is found."""
    src = "def f():\n    import schedules.cpu\n    from tvm_rmsmp.nn import layers\n"
    path = tmp_path / "relay_passes" / "bad.py"
    path.parent.mkdir()
    path.write_text(src)
    found = [t for t, _ in _imports("relay_passes.bad", str(path), {"tvm_rmsmp.nn.layers"})]
    assert "schedules.cpu" in found and "tvm_rmsmp.nn.layers" in found
    assert _part("schedules.cpu") == "schedules" and _part("tvm_rmsmp.nn.layers") == "nn"
    assert "schedules" not in PARTS["passes"][1] and "nn" not in PARTS["passes"][1]


_NO_TORCH = textwrap.dedent("""
    import importlib.abc, sys
    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")
    sys.meta_path.insert(0, NoTorch())
""")


@pytest.mark.parametrize("module", ["tvm_rmsmp", "tvm_rmsmp.quant", "tvm_rmsmp.runtime", "relay_passes", "schedules"])
def test_parts_import_where_torch_is_absent(module):
    """A deployment machine without torch can import the runtime, the passes and the schedules
    (and the package's top level, whose names load on first use)."""
    code = _NO_TORCH + f"import {module}\nassert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules)\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_public_names_and_moved_module_paths():
    import tvm_rmsmp as rmsmp

    for name in rmsmp.__all__:
        assert getattr(rmsmp, name) is not None, name
    import tvm_rmsmp.nn.layers as layers
    import tvm_rmsmp.torch_quant as old

    assert old is layers and old.__name__ == "tvm_rmsmp.nn.layers"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        rmsmp.nope  # noqa: B018
