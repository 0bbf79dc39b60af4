"""Deploy without torch: the build machine quantizes, compiles and exports; the deployment
machine loads the library and runs it with only the TVM runtime and numpy.

Run: python tutorials/deploy_without_torch.py [build DIR | run DIR]

``build DIR`` (a machine with torch and tvm-rmsmp): quantize a small CNN, compile it for this
CPU and write ``DIR/model.so``, its sidecar ``DIR/model.so.json`` (input specs, target,
sha256), an example input and the result the compiled model gives for it.

``run DIR`` (the deployment machine): needs ``apache-tvm`` and numpy, and tvm-rmsmp's runtime
for the checked loader: ``pip install apache-tvm==0.27.0.post1 numpy`` and
``pip install --no-deps tvm-rmsmp`` (its runtime imports neither torch nor the compiler).
The library's sidecar is checked before the code is mapped (size and sha256, architecture,
CPU features); then it runs on numpy arrays. The last step runs the same library with plain
TVM, without tvm-rmsmp at all (no checks: a library is native code, load only what you trust).

Without arguments both steps run, the second in a fresh interpreter where ``import torch``
fails, as on a machine without it.
"""

import os
import subprocess
import sys
import tempfile


def build(folder: str) -> None:
    import numpy as np
    import torch

    import tvm_rmsmp as rmsmp

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 10),
    ).eval()
    calib = [torch.randn(8, 1, 16, 16) for _ in range(2)]
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(assign="variance"), calib_data=calib)
    x = torch.randn(2, 1, 16, 16)
    exe = rmsmp.compile(q, (x,), target="llvm")
    os.makedirs(folder, exist_ok=True)
    exe.export_library(os.path.join(folder, "model.so"))
    np.save(os.path.join(folder, "input.npy"), x.numpy())
    np.save(os.path.join(folder, "expected.npy"), exe(x))
    print("built:", os.path.join(folder, "model.so"))


def run(folder: str) -> None:
    import numpy as np

    from tvm_rmsmp.runtime import load  # the TVM runtime and numpy: torch is never imported

    exe = load(os.path.join(folder, "model.so"))
    print("inputs:", exe.input_specs)
    x = np.load(os.path.join(folder, "input.npy"))
    y = exe(x)
    print("logits of the first image:", np.round(y[0], 3))
    print("equal to the build machine's result:", np.array_equal(y, np.load(os.path.join(folder, "expected.npy"))))

    # The same library with plain TVM (no tvm-rmsmp): the Relax VM on the CPU.
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(os.path.join(folder, "model.so")), tvm.cpu())
    y_tvm = vm["main"](tvm.runtime.tensor(x))[0].numpy()  # main returns a tuple of outputs
    print("plain TVM gives the same:", np.array_equal(y_tvm, y))
    print("torch imported:", "torch" in sys.modules)


#: Makes ``import torch`` fail in the child interpreter, as on a machine without torch.
NO_TORCH = """
import importlib.abc, runpy, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("no torch on this machine")
sys.meta_path.insert(0, NoTorch())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in ("build", "run"):
        (build if sys.argv[1] == "build" else run)(sys.argv[2])
    elif len(sys.argv) == 1:
        folder = tempfile.mkdtemp()
        build(folder)
        subprocess.run([sys.executable, "-c", NO_TORCH, __file__, "run", folder], check=True)
    else:
        sys.exit(__doc__)
