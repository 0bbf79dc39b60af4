"""The torch side runs on the weights' device: no tensor is made on a hard-coded device.

A static check (every torch factory call in ``tvm_rmsmp/nn`` names its device, or is moved to
one at once) fails on the mistake even on a machine without a GPU; the Hessian estimate, the
quantizer's calibration and a QAT step then run on every device this machine has."""

from __future__ import annotations

import ast
import os

import pytest
import torch

import tvm_rmsmp as rmsmp

NN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tvm_rmsmp", "nn")
FACTORIES = {"tensor", "zeros", "ones", "empty", "full", "arange", "randn", "rand", "randint", "eye", "linspace"}
#: fresh parameters of a new module are made on the CPU like any torch module's (``.to(device)`` moves them)
ALLOWED = {("attention.py", "__init__")}


def _unplaced_factory_calls(path: str):
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        func = getattr(node, "func", None)
        if not (isinstance(node, ast.Call) and isinstance(func, ast.Attribute) and func.attr in FACTORIES
                and isinstance(func.value, ast.Name) and func.value.id == "torch"):
            continue
        if any(k.arg == "device" for k in node.keywords):
            continue
        parent = parents.get(node)  # torch.zeros(...).to(device=...) places it at once
        if isinstance(parent, ast.Attribute) and parent.attr == "to":
            call = parents.get(parent)
            if isinstance(call, ast.Call) and (any(k.arg == "device" for k in call.keywords) or call.args):
                continue
        scope = node
        while scope in parents and not isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)):
            scope = parents[scope]
        if (os.path.basename(path), getattr(scope, "name", "")) in ALLOWED:
            continue
        found.append(f"{os.path.basename(path)}:{node.lineno} torch.{func.attr}(...) names no device")
    return found


def test_torch_side_names_the_device_of_every_tensor_it_makes():
    found = [hit for f in sorted(os.listdir(NN)) if f.endswith(".py")
             for hit in _unplaced_factory_calls(os.path.join(NN, f))]
    assert found == []


def test_the_check_finds_a_hard_coded_device(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\ndef f(w):\n    return w + torch.zeros(3)\n"
                   "def g(w):\n    return torch.ones(3, device=w.device) + torch.randn(3).to(w.device)\n")
    assert [h.split(" ")[0] for h in _unplaced_factory_calls(str(bad))] == ["bad.py:3"]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_hessian_quantize_and_qat_run_on_the_weights_device(device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).to(device).eval()
    calib = [torch.randn(32, 12, device=device)]
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(rounding="gptq"), calib)  # Hessian rule + GPTQ Hessians
    assert q(calib[0]).device.type == device
    qat = rmsmp.prepare_qat(model, rmsmp.RMSMPConfig(), calib)
    assert {p.device.type for p in qat.parameters()} == {device}
    batches = [(torch.randn(8, 12, device=device), torch.randint(0, 4, (8,), device=device))]
    rmsmp.train_qat(qat, batches, torch.nn.functional.cross_entropy, rmsmp.QATConfig(epochs=1))
    converted = rmsmp.convert_qat(qat)
    assert converted(calib[0]).shape == (32, 4)
