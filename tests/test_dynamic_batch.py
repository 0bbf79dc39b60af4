"""compile(..., dynamic_batch=True): one build for any batch >= 1, equal to the quantized torch
model at every batch, with the batch-1 (and the examples' batch) specialisation chosen per call."""

import json
import warnings

import numpy as np
import pytest
import torch
import tvm
from tvm import tirx
from tvm.script import relax as R

import tvm_rmsmp as rmsmp
from conftest import needs_opencl
from relay_passes import ops
from tvm_rmsmp.compiler.frontend import check_dynamic_batch

MIXED = rmsmp.RMSMPConfig(ratio={"sp2_4": 0.4, "fixed_4": 0.3, "fixed_8": 0.3})
BATCHES = (1, 3, 17)


def _reference(q, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return q(x).numpy()


class SmallCNN(torch.nn.Module):
    """Convolution (padded), ReLU, strided convolution, max pooling, flatten, dense."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.nn.functional.max_pool2d(x, 2).flatten(1))


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    q = rmsmp.quantize(SmallCNN().eval(), MIXED, [torch.randn(8, 1, 16, 16) for _ in range(2)])
    x = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    return q, rmsmp.compile(q, (x,), target="llvm", dynamic_batch=True)


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(24, 48), torch.nn.ReLU(), torch.nn.Linear(48, 10)).eval()
    return rmsmp.quantize(model, MIXED, [torch.randn(16, 24) for _ in range(2)])


def test_cnn_equals_torch_at_any_batch_with_the_batch1_specialisation(cnn):
    q, exe = cnn
    assert exe.dynamic_batch and exe.variants == {1: "main_b1"}
    for batch in BATCHES:
        x = torch.randn(batch, 1, 16, 16, generator=torch.Generator().manual_seed(batch))
        np.testing.assert_array_equal(exe(x), _reference(q, x))
        assert exe.last_function == ("main_b1" if batch == 1 else "main")
    variants = exe.stats["variants"]
    assert set(variants) == {"any", "1"} and variants["1"]["function"] == "main_b1"
    # every layer's row groups have kernels in both functions
    assert sum(variants["1"]["cpu_kernels"].values()) > 0 and sum(variants["any"]["cpu_kernels"].values()) > 0


def test_dynamic_batch_input_checks_name_the_input(cnn):
    _, exe = cnn
    with pytest.raises(ValueError, match=r"input 0 has shape \[3, 2, 16, 16\], the model was compiled for "
                                         r"\[batch, 1, 16, 16\] \(any batch >= 1\)"):
        exe(np.zeros((3, 2, 16, 16), np.float32))
    with pytest.raises(ValueError, match=r"input 0 has shape \[0, 1, 16, 16\]"):
        exe(np.zeros((0, 1, 16, 16), np.float32))
    with pytest.raises(ValueError, match=r"input 0 has shape \[1, 16, 16\]"):
        exe(np.zeros((1, 16, 16), np.float32))


def test_export_and_load_keep_the_dynamic_batch(cnn, tmp_path):
    q, exe = cnn
    path = exe.export_library(str(tmp_path / "dyn.so"))
    meta = json.loads(open(path + ".json").read())
    assert meta["version"] == 3 and meta["inputs"] == [{"shape": [-1, 1, 16, 16], "dtype": "float32", "name": "x"}]
    assert meta["variants"] == {"1": "main_b1"}
    loaded = rmsmp.load(path)
    for batch, function in ((1, "main_b1"), (5, "main")):
        x = torch.randn(batch, 1, 16, 16, generator=torch.Generator().manual_seed(10 + batch))
        np.testing.assert_array_equal(loaded(x), _reference(q, x))
        assert loaded.last_function == function
    meta["inputs"][0]["shape"] = [-1, -1, 16, 16]  # only dimension 0 may be "any"
    (tmp_path / "dyn.so.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"dyn.so.json' is corrupt: invalid 'inputs'"):
        rmsmp.load(path)


def test_mlp_equals_torch_at_any_batch_with_a_batch_specialised(mlp):
    exe = rmsmp.compile(mlp, (torch.randn(1, 24),), target="llvm", dynamic_batch=(4,))
    assert exe.variants == {1: "main_b1", 4: "main_b4"}
    for batch, function in zip(BATCHES + (4,), ("main_b1", "main", "main", "main_b4")):
        x = torch.randn(batch, 24, generator=torch.Generator().manual_seed(batch))
        np.testing.assert_array_equal(exe(x), _reference(mlp, x))
        assert exe.last_function == function
    # the library keeps its kernels' noalias compute functions although it has symbolic shapes
    # (TVM 0.27 drops them all for one function without tirx.noalias: the VM's shape function)
    llvm = exe.executable.mod.imports[0].inspect_source("ll")
    assert "@__tvm_ffi_shape_func" in llvm and llvm.count("_compute_(") >= 6


def test_transformer_layer_matches_at_any_batch():
    torch.manual_seed(9)
    layer = torch.nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True,
                                             dropout=0.0).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rmsmp.RMSMPWarning)
        q = rmsmp.quantize(layer, MIXED, [torch.randn(4, 5, 16) for _ in range(2)])
    exe = rmsmp.compile(q, (torch.randn(1, 5, 16),), dynamic_batch=True)
    for batch in BATCHES:
        x = torch.randn(batch, 5, 16, generator=torch.Generator().manual_seed(batch))
        # the float operators between the layers (softmax, LayerNorm) as in the static test
        # (test_bad_inputs_compile.py): fast-math rounding
        np.testing.assert_allclose(exe(x), _reference(q, x), rtol=0, atol=2e-5)


@needs_opencl()
def test_opencl_on_pocl_equals_torch_at_any_batch(mlp):
    exe = rmsmp.compile(mlp, (torch.randn(1, 24),), target="opencl", dynamic_batch=True)
    for batch in BATCHES:
        x = torch.randn(batch, 24, generator=torch.Generator().manual_seed(batch))
        np.testing.assert_array_equal(exe(x), _reference(mlp, x))
        assert exe.last_function == f"main_b{batch}"
    with pytest.raises(ValueError, match="cannot be exported"):
        exe.export_library("unused.so")


def test_fpga_model_equals_torch_at_any_batch(mlp):
    """A program per batch: batch 1 and the examples' (3) up front, 5 on its first call; each
    equal to the torch reference (as tests/test_fpga.py checks the static build)."""
    exe = rmsmp.compile(mlp, (torch.randn(3, 24),), target="fpga:xc7z020", dynamic_batch=True)
    assert exe.dynamic_batch and exe.variants == {1: "main_b1", 3: "main_b3"}
    assert exe.input_specs[0]["shape"] == [-1, 24]
    for batch in (1, 3, 5):
        x = torch.randn(batch, 24, generator=torch.Generator().manual_seed(batch))
        np.testing.assert_array_equal(exe(x), _reference(mlp, x))
        assert exe.last_function == f"main_b{batch}"
        prog = exe.models[batch]
        assert prog.layers and not prog.fallbacks  # the layers ran on the accelerator model
        assert prog.input_specs[0]["shape"] == [batch, 24]
    assert exe.variants == {1: "main_b1", 3: "main_b3", 5: "main_b5"}
    assert exe.profile()["cycles"] == exe.models[3].profile()["cycles"] > 0
    with pytest.raises(ValueError, match=r"input 0 has shape \[2, 23\], the model was compiled for \[batch, 24\]"):
        exe(np.zeros((2, 23), np.float32))
    with pytest.raises(NotImplementedError, match="no device library to export"):
        exe.export_library("unused.so")


def test_cuda_builds_for_any_batch_without_a_gpu(cnn):
    """The CUDA source of a dynamic-batch CNN builds here: the any-batch kernels (the GPU
    schedules over a symbolic number of rows) take the batch as a kernel argument, the batch-1
    and examples' batch kernels are static. (Running them needs a CUDA device.)"""
    import re

    q, _ = cnn
    cuda = {"kind": "cuda", "arch": "sm_80", "host": {"kind": "llvm"}}
    exe = rmsmp.compile(q, (torch.randn(3, 1, 16, 16),), target=cuda, dynamic_batch=True)
    assert exe.dynamic_batch and exe.variants == {1: "main_b1", 3: "main_b3"}
    src = exe.executable.mod.imports[0].imports[0].inspect_source()
    kernels = dict(re.findall(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(([^)]*)\)', src))
    rows = {name: args for name, args in kernels.items() if name.startswith(("rmsmp_dense_", "rmsmp_conv2d_"))}
    by_variant = {}
    for name, args in rows.items():
        suffix = re.search(r"_b(\d+)_kernel$", name)
        by_variant.setdefault(suffix.group(1) if suffix else "any", []).append(name)
        # the batch as a kernel argument exactly in the any-batch kernels
        assert bool(re.search(r"int64_t \w+$", args)) == (suffix is None), (name, args)
        assert "__shared__" in src.split(f" {name}(")[-1].split('extern "C"')[0]  # the row-group schedule
    assert {k: len(v) for k, v in by_variant.items()} == {"any": 9, "1": 9, "3": 9}  # 3 layers x 3 schemes
    if not tvm.cuda(0).exist:
        with pytest.raises(RuntimeError, match="no CUDA device on this machine"):
            exe(torch.randn(5, 1, 16, 16))


def test_cuda_builds_per_token_activations_over_batch_times_tokens_rows():
    """Rows = batch x tokens (an expression of the batch): the per-token functions stay
    unfused in the any-batch function (TVM's FuseTIR cannot map their own rows var to it)."""
    import re

    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.LayerNorm(32), torch.nn.Linear(32, 48), torch.nn.GELU(),
                                torch.nn.Linear(48, 16)).eval()
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(act_granularity="per_token"), [torch.randn(4, 6, 32) for _ in range(2)])
    cuda = {"kind": "cuda", "arch": "sm_80", "host": {"kind": "llvm"}}
    exe = rmsmp.compile(q, (torch.randn(2, 6, 32),), target=cuda, dynamic_batch=True)
    src = exe.executable.mod.imports[0].imports[0].inspect_source()
    kernels = dict(re.findall(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(([^)]*)\)', src))
    epilogues = {n: a for n, a in kernels.items() if "token_epilogue" in n}
    # the any-batch function's epilogues are kernels of their own; the specialisations' fused
    assert {n for n in epilogues if not re.search(r"_b\d+_", n)} == {
        "rmsmp_token_epilogue_1_kernel", "rmsmp_token_epilogue_3_kernel"}, sorted(kernels)
    assert any(n.startswith("fused_") and "_b2_" in n for n in epilogues)
    assert re.search(r"int64_t \w+$", epilogues["rmsmp_token_epilogue_3_kernel"])


def test_targets_without_dynamic_shapes_and_bad_sizes_are_refused(mlp):
    with pytest.raises(ValueError, match=r"dynamic_batch must be True, False or a sequence of batch sizes >= 1"):
        rmsmp.compile(mlp, (torch.randn(2, 24),), dynamic_batch=(0,))
    with pytest.raises(ValueError, match=r"dynamic_batch is not supported for target kind 'vulkan'.*"
                                         r"dynamic_batch=False once per batch size"):
        rmsmp.compile(mlp, (torch.randn(2, 24),), target={"kind": "vulkan", "host": {"kind": "llvm"}},
                      dynamic_batch=True)


def test_a_model_that_fixes_its_batch_is_refused():
    class FixedBatch(torch.nn.Module):
        def forward(self, x):
            return x.reshape(4, -1) * 2.0

    with pytest.raises(ValueError, match="torch.export failed"):
        rmsmp.compile(FixedBatch(), (torch.randn(4, 3),), dynamic_batch=True)


def test_only_the_leading_dimension_may_be_symbolic():
    @R.function
    def two(x: R.Tensor(("n", "m"), "float32")) -> R.Tensor(("n", "m"), "float32"):
        return x

    with pytest.raises(ValueError, match=r"input 0 has a symbolic dimension 1 \(m\)"):
        check_dynamic_batch(tvm.IRModule({"main": two}))
    with pytest.raises(ValueError, match="only the leading"):
        ops.func_shape([4, tirx.Var("m", "int64")])


def test_symbolic_row_group_op():
    """A row-group dense over a symbolic number of rows: its own var, mapped back at the call."""
    batch = tirx.Var("batch", "int64")
    func = ops.dense_func([batch * 3, 8], "uint8", [4, 8], "int8", ops.fixed_product, {})
    x, out = func.params[0], func.params[-1]
    n = x.shape[0]
    assert isinstance(n, tirx.Var) and n.same_as(out.shape[0]) and [int(d) for d in x.shape[1:]] == [8]
    shape, dtype = ops.output_shape(func)
    assert dtype == "float32" and shape[0].same_as(n) and shape[1] == 4
    lead = ops.call_shape(shape, batch * 3)[0]
    tvm.ir.assert_structural_equal(lead, batch * 3)
