"""CPU benchmark: tvm-rmsmp against the tools a user would pick instead, in one run.

Run from the repository root::

    python -m bench.cpu            # full run (about 15-25 min on 2 cores)
    python -m bench.cpu --quick    # fewer repeats, smaller DRAM probe, no batch-128 TVM fp32
    python -m bench.cpu --tvm-trials 0   # without the MetaSchedule search of TVM fp32 tuned

Prints the hardware and thread count, measures the DRAM read bandwidth (a sum over an array
much larger than the last-level cache), then times each workload with every contender in the
same run (one worker process per contender, sampled round-robin): torch fp32, torch dynamic int8 (``quantize_dynamic``, fbgemm),
torchao int8 dynamic quantization under ``torch.compile`` (if ``torchao`` is installed), ONNX Runtime
dynamic int8 and 4-bit ``MatMulNBits`` (if ``onnxruntime`` is installed: ``pip install
.[bench]``), TVM fp32 (plain Relax build, untuned; and tuned by MetaSchedule with the XGBoost
cost model, ``--tvm-trials`` per task, records kept in ``--tuning-dir`` for later runs) and
tvm-rmsmp (RMSMP 60:35:5, 8-bit activations, untuned). Every number is a median of repeated wall-clock timings of one call
with pre-made inputs. Writes ``bench/results/cpu.json`` and the tables of
``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Callable, Dict, List, Optional

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATIO = {"sp2_4": 0.60, "fixed_4": 0.35, "fixed_8": 0.05}
CONTENDERS = ["torch fp32", "torch int8 dyn", "torchao int8 + compile", "ORT int8 dyn", "ORT 4-bit MatMulNBits",
              "TVM fp32 untuned", "TVM fp32 tuned"]
RMSMP = "tvm-rmsmp untuned"
TVM_TRIALS = 16  # MetaSchedule trials per task for "TVM fp32 tuned" (2-3 s each on 2 cores)
TUNING_DIR = os.path.join(ROOT, "bench", ".tuning", "tvm_fp32")  # its records, reused by later runs
#: ``--no-spin``: thread pools sleep when idle (OpenMP passive waits, ONNX Runtime without
#: spinning, TVM's pool without its spin loop), so a contender's idle workers do not keep the
#: cores busy while the next contender is timed (at 2 threads on 2 cores, torch's OpenMP workers
#: spinning after each call slowed the next contender down up to 50x)
NO_SPIN_ENV = "RMSMP_BENCH_NO_SPIN"
NO_SPIN = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0", "TVM_THREAD_POOL_SPIN_COUNT": "0", NO_SPIN_ENV: "1"}
#: ``--refuse-amx``: set in the parent after it installed the seccomp filter of
#: ``bench/refuse_amx.py``; each worker checks that the OS refuses it the AMX tile state
REFUSE_AMX_ENV = "RMSMP_BENCH_REFUSE_AMX"
#: ``--avx2-only``: set in the process started with ``bench/cpuid_mask.c`` preloaded; each
#: worker checks that CPUID shows it AVX2 without AVX-512, AVX-VNNI or AMX
AVX2_ONLY_ENV = "RMSMP_BENCH_AVX2_ONLY"
#: Idle seconds after each sample (``--gap``). Gaps alone did not give steady 2-thread timings
#: on the 2-vCPU AMX Xeon with spinning pools: the FFN at batch 1, 2 threads, timed beside one
#: other contender: with 0.1 s gaps tvm-rmsmp took 0.166 ms beside torch int8 dyn (0.038 ms
#: alone) and torchao 6.5 ms beside tvm-rmsmp; with 0.5 s gaps 0.048 and 0.156 ms (the pools of
#: torch's libgomp and TVM spin for more than 0.1 s). Hence ``--freeze`` (the default at several
#: threads without ``--no-spin``): every contender keeps its own thread-pool policy (what its
#: users get), and the contenders not being timed are stopped (SIGSTOP) between their samples,
#: so a pool still spinning after its sample cannot take a core from the next contender.


# ----- models --------------------------------------------------------------------------------
def _torch():
    import torch

    return torch


def dense_model(k: int, n: int):
    torch = _torch()
    return torch.nn.Sequential(torch.nn.Linear(k, n))


def ffn_model():
    torch = _torch()
    nn = torch.nn
    return nn.Sequential(nn.Linear(768, 3072), nn.GELU(), nn.Linear(3072, 768))


def bert_dense_stack(layers: int = 12):
    """The dense weights of ``layers`` BERT-base layers, chained: Q, K, V, O, FFN up, GELU, down."""
    torch = _torch()
    nn = torch.nn
    mods = []
    for _ in range(layers):
        mods += [nn.Linear(768, 768) for _ in range(4)] + [nn.Linear(768, 3072), nn.GELU(), nn.Linear(3072, 768)]
    stack = nn.Sequential(*mods)
    stack.rmsmp_layer_modules = 7  # see rmsmp_quantized: quantize one layer, copy it
    return stack


def rmsmp_quantized(model, calib):
    """RMSMP-quantize ``model``. A stack of repeated layers is quantized one layer's worth
    (RMSMP's per-row scale search over 85M weights would take minutes) and that quantized
    layer is copied: every copy has its own weight tensors, so the compiled model streams
    all of them, as the float contenders do."""
    import copy

    import tvm_rmsmp as rmsmp

    torch = _torch()
    cfg = rmsmp.RMSMPConfig(ratio=RATIO, act_bits=8)
    per_layer = getattr(model, "rmsmp_layer_modules", None)
    if per_layer is None:
        return rmsmp.quantize(model, cfg, calib_data=calib)
    one = rmsmp.quantize(torch.nn.Sequential(*list(model)[:per_layer]), cfg, calib_data=calib)
    mods = []
    for i in range(len(model) // per_layer):
        for j, m in enumerate(one):
            m = copy.deepcopy(m)
            if hasattr(m, "layer_name"):
                m.layer_name = str(i * per_layer + j)
            mods.append(m)
    return torch.nn.Sequential(*mods).eval()


def conv_model(c_in: int, c_out: int, stride: int):
    torch = _torch()
    return torch.nn.Sequential(torch.nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False))


def resnet18(num_classes: int = 1000):
    """ResNet-18 (He et al. 2016) as torchvision defines it; random weights."""
    torch = _torch()
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, c_in, c_out, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(c_out)
            self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(c_out)
            self.down = None
            if stride != 1 or c_in != c_out:
                self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + (x if self.down is None else self.down(x)))

    class ResNet18(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
            chans = [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]
            self.layers = nn.Sequential(*[nn.Sequential(Block(a, b, s), Block(b, b, 1)) for a, b, s in chans])
            self.fc = nn.Linear(512, num_classes)

        def forward(self, x):
            x = self.layers(self.stem(x))
            return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))

    return ResNet18()


def bert_layer(hidden: int = 768, heads: int = 12, inter: int = 3072):
    """One BERT-base encoder layer (post-LayerNorm), no attention mask."""
    torch = _torch()
    nn = torch.nn

    class BertLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden) for _ in range(4))
            self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
            self.up, self.down = nn.Linear(hidden, inter), nn.Linear(inter, hidden)

        def forward(self, x):
            b, s, _ = x.shape
            d = hidden // heads

            def split(t):
                return t.reshape(b, s, heads, d).transpose(1, 2)

            q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
            att = torch.softmax(q @ k.transpose(-1, -2) * (1.0 / d ** 0.5), dim=-1)
            ctx = (att @ v).transpose(1, 2).reshape(b, s, hidden)
            x = self.ln1(x + self.o(ctx))
            return self.ln2(x + self.down(torch.nn.functional.gelu(self.up(x))))

    return BertLayer()


def minilm_l6():
    """all-MiniLM-L6-v2 (real weights, :func:`tvm_rmsmp.models.minilm.load_minilm`) from token
    ids to the normalized sentence embedding, every token attended (mask of ones)."""
    torch = _torch()
    from tvm_rmsmp.models.minilm import load_minilm

    class MiniLMFromIds(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = load_minilm()
            self.token_vocab = self.model.embeddings.word_embeddings.num_embeddings

        def forward(self, ids):
            return self.model(ids, torch.ones_like(ids))

    return MiniLMFromIds()


def example_input(model, shape, generator):
    """Token ids for a model that reads them (``token_vocab``: the ids drawn from [1000, vocab),
    past the special tokens), else a standard normal float tensor."""
    torch = _torch()
    vocab = getattr(model, "token_vocab", None)
    if vocab is not None:
        return torch.randint(1000, vocab, tuple(shape), generator=generator)
    return torch.randn(shape, generator=generator)


def workloads(quick: bool):
    """(name, group, model factory, input shape, batch-1 weight streaming case)."""
    out = []
    for k, n in ((768, 768), (768, 3072), (3072, 768)):
        for b in (1, 128):
            out.append((f"dense {k}x{n}, batch {b}", "kernel", lambda k=k, n=n: dense_model(k, n), (1, b, k), b == 1))
    for b in (1, 8, 128):  # 8: a small batch, below the outer-product layer kernel's rows
        out.append((f"FFN 768-3072-768, batch {b}", "kernel", ffn_model, (1, b, 768), b == 1))
    out.append(("12 BERT-base layers' dense weights, batch 1", "kernel", bert_dense_stack, (1, 1, 768), True))
    for c_in, c_out, hw, s in ((64, 64, 56, 1), (128, 128, 28, 1), (256, 256, 14, 1), (512, 512, 7, 1)):
        out.append((f"ResNet-18 conv {c_in}->{c_out} 3x3 @{hw}x{hw}, batch 1", "kernel",
                    lambda c_in=c_in, c_out=c_out, s=s: conv_model(c_in, c_out, s), (1, c_in, hw, hw), False))
    out.append(("ResNet-18 1x3x224x224", "model", resnet18, (1, 3, 224, 224), False))
    out.append(("ResNet-18 8x3x224x224", "model", resnet18, (8, 3, 224, 224), False))
    out.append(("BERT-base encoder layer, seq 128", "model", bert_layer, (1, 128, 768), False))
    out.append(("MiniLM-L6 (all-MiniLM-L6-v2), seq 128", "model", minilm_l6, (1, 128), False))
    return out


# ----- measurement ---------------------------------------------------------------------------
def median_seconds(fn: Callable[[], object], repeat: int, min_time: float = 0.02) -> float:
    """Median over ``repeat`` timings of ``number`` calls each (``number`` fills ``min_time``)."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    if once > 0.5:
        repeat = min(repeat, 3)
    number = max(1, int(min_time / max(once, 1e-7)))
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - t0) / number)
    return statistics.median(samples)


def dram_read_bandwidth(quick: bool) -> Dict[str, float]:
    """GB/s of a float32 sum over an array 16x (quick: 8x) the L3 size, at most 2 GiB (a VM on an
    Intel Xeon reported its host's 480 MiB L3: 7.5 GB would crowd out the machine's memory)
    (medians of repeats)."""
    torch = _torch()
    l3 = _l3_bytes() or 32 * 2**20
    n_bytes = min((8 if quick else 16) * l3, 2 * 2**30)
    arr = np.ones(n_bytes // 4, dtype=np.float32)
    t_np = median_seconds(lambda: arr.sum(), repeat=5 if quick else 9, min_time=0)
    t_torch = median_seconds(lambda: torch.from_numpy(arr).sum(), repeat=5 if quick else 9, min_time=0)
    return {"array_bytes": n_bytes, "numpy_sum_1_thread_GBps": n_bytes / t_np / 1e9,
            f"torch_sum_{torch.get_num_threads()}_threads_GBps": n_bytes / t_torch / 1e9,
            "GBps": max(n_bytes / t_np, n_bytes / t_torch) / 1e9}


def _l3_bytes() -> Optional[int]:
    try:
        out = subprocess.run(["lscpu", "-B"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    for line in out.splitlines():
        if line.startswith("L3 cache:"):
            return int(line.split(":")[1].split()[0])
    return None


def hardware(threads: int) -> Dict[str, object]:
    from tvm.target import codegen

    from tvm_rmsmp.compiler.targets import resolve_target
    from tvm.target.codegen import target_has_features

    from schedules.x86_amx import amx_enabled, os_grants_amx
    from schedules.x86_intrin import x86_isa

    model = platform.processor() or "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    target = resolve_target("llvm")
    return {"cpu": model, "llvm_mcpu": str(codegen.llvm_get_system_cpu()), "cores": os.cpu_count(),
            "threads": threads, "l3_bytes": _l3_bytes(), "x86_kernel_isa": x86_isa(target),
            "x86_amx": amx_enabled(target), "cpu_has_amx_int8": bool(target_has_features("amx-int8", target)),
            "os_grants_amx": os_grants_amx(),
            "python": platform.python_version(), "machine": platform.machine()}


# ----- contenders ----------------------------------------------------------------------------
def torch_fp32(model, x):
    torch = _torch()

    def run():
        with torch.no_grad():
            return model(x)

    return run


def torch_int8_dyn(model, x):
    torch = _torch()
    torch.backends.quantized.engine = "fbgemm"
    qmodel = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    if not any("quantized" in type(m).__module__ for m in qmodel.modules()):
        return None

    def run():
        with torch.no_grad():
            return qmodel(x)

    return run


def torchao_int8_compiled(model, x):
    """torchao's int8 dynamic activation + int8 weight quantization of the Linear layers, under
    ``torch.compile`` (inductor); None when torchao is missing or the model has no Linear."""
    torch = _torch()
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        return None
    if not any(isinstance(m, torch.nn.Linear) for m in model.modules()):
        return None
    import copy

    qmodel = copy.deepcopy(model)
    quantize_(qmodel, Int8DynamicActivationInt8WeightConfig())
    compiled = torch.compile(qmodel)

    def run():
        with torch.no_grad():
            return compiled(x)

    run()  # compiles
    return run


def _onnx_export(model, x, path):
    torch = _torch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"])


def ort_contenders(model, x, threads: int, tmp: str, has_vnni: bool) -> Dict[str, Optional[Callable]]:
    """ONNX Runtime int8 dynamic and 4-bit MatMulNBits sessions (None where not applicable)."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = os.path.join(tmp, "fp32.onnx")
    _onnx_export(model, x, fp32)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if os.environ.get(NO_SPIN_ENV):  # --no-spin: idle workers sleep instead of spinning
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    feed = {"x": x.numpy()}
    out: Dict[str, Optional[Callable]] = {}

    def session(path):
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        return lambda: sess.run(None, feed)

    int8 = os.path.join(tmp, "int8.onnx")
    # Without VNNI the u8s8 path saturates unless the weights use 7 bits (reduce_range).
    quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8, reduce_range=not has_vnni)
    out["ORT int8 dyn"] = session(int8)
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        proto = onnx.load(fp32)
        quant = MatMulNBitsQuantizer(proto, block_size=32, is_symmetric=True, accuracy_level=4)
        quant.process()
        nbits = os.path.join(tmp, "nbits.onnx")
        quant.model.save_model_to_file(nbits, False)
        has_nbits = any(n.op_type == "MatMulNBits" for n in onnx.load(nbits).graph.node)
        out["ORT 4-bit MatMulNBits"] = session(nbits) if has_nbits else None
    except Exception as err:  # noqa: BLE001 - an optional contender; say why it is missing
        print(f"  ORT MatMulNBits unavailable: {type(err).__name__}: {err}", flush=True)
        out["ORT 4-bit MatMulNBits"] = None
    return out


def tvm_fp32(model, x, target):
    import tvm
    from tvm import relax

    exe = tvm.compile(_fp32_relax(model, x), target=target)
    vm = relax.VirtualMachine(exe, tvm.cpu())
    args = [tvm.runtime.tensor(x.numpy())]
    return lambda: vm["main"](*args)


def _fp32_relax(model, x):
    import torch
    from tvm.relax.frontend.torch import from_exported_program

    with torch.no_grad():
        return from_exported_program(torch.export.export(model, (x,)))


def tvm_fp32_tuned(model, x, target, work_dir: str, trials_per_task: int):
    """TVM fp32 tuned by MetaSchedule (XGBoost cost model, TVM's default CPU search space):
    every fused operator of the model is a task with ``trials_per_task`` measurements.

    Records go to ``work_dir`` (a MetaSchedule JSON database); a later run whose tasks and
    budget match the ``done.json`` written after the last tuning reuses them without tuning."""
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    from tvm_rmsmp.runtime.fileio import atomic_write
    from tvm_rmsmp.compiler.tuning import light_tensor_intrin

    light_tensor_intrin()  # else TuneContext and each builder worker spend 30-77 s importing it
    with target, tvm.transform.PassContext(opt_level=3):
        mod = tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(),
                                        relax.transform.CanonicalizeBindings(),
                                        relax.get_pipeline("zero")])(_fp32_relax(model, x))
    tasks = ms.relax_integration.extract_tasks(mod, target)
    budget = {"target": str(target), "trials_per_task": trials_per_task, "tasks": sorted(t.task_name for t in tasks)}
    done_path = os.path.join(work_dir, "done.json")
    try:
        with open(done_path) as fh:
            done = json.load(fh) == budget
    except (OSError, ValueError):
        done = False
    if not done:
        import shutil

        os.makedirs(work_dir, exist_ok=True)
        for name in ("done.json", "database_workload.json", "database_tuning_record.json"):
            if os.path.exists(os.path.join(work_dir, name)):  # records of another budget or target
                os.remove(os.path.join(work_dir, name))
        shutil.rmtree(os.path.join(work_dir, "logs"), ignore_errors=True)
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(tasks, work_dir, seed=0)
        t0 = time.perf_counter()
        ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=work_dir,
                      max_trials_global=trials_per_task * len(tasks), max_trials_per_task=trials_per_task,
                      num_trials_per_iter=16, cost_model="xgb",
                      builder=ms.builder.LocalBuilder(max_workers=os.cpu_count() or 1, timeout_sec=120,
                                                      initializer=light_tensor_intrin),
                      runner=ms.runner.LocalRunner(), database=ms.database.JSONDatabase(work_dir=work_dir))
        print(f"  TVM fp32 tuned: {len(tasks)} tasks x {trials_per_task} trials in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        atomic_write(done_path, json.dumps(budget))
    with target, tvm.transform.PassContext(opt_level=3):
        mod = relax.transform.MetaScheduleApplyDatabase(work_dir)(mod)
    exe = tvm.compile(mod, target=target)
    vm = relax.VirtualMachine(exe, tvm.cpu())
    args = [tvm.runtime.tensor(x.numpy())]
    return lambda: vm["main"](*args)


def rmsmp_build(model, x, target):
    torch = _torch()
    import tvm_rmsmp as rmsmp

    g = torch.Generator().manual_seed(1)
    calib = [example_input(model, x.shape, g) for _ in range(2)]
    q = rmsmp_quantized(model, calib)
    exe = rmsmp.compile(q, (x,), target=target)
    args = exe._inputs((x,))
    vm = exe.vm
    with torch.no_grad():
        ref = q(x).numpy()
    y = exe(x)
    info = {"bit_exact": bool(np.array_equal(y, ref)), "max_abs_diff": float(np.abs(y - ref).max()),
            "weight_bytes": rmsmp_weight_bytes(q), "stats": {k: v for k, v in exe.stats.items()},
            "isa_path": isa_path(exe.stats.get("cpu_kernels", {}))}
    return (lambda: vm["main"](*args)), info


def isa_path(cpu_kernels: Dict[str, int]) -> str:
    """Which x86 instruction path ran the model's integer layers (``exe.stats['cpu_kernels']``
    kinds, ``x86-<isa>-<kind>``): ``amx`` where any kernel used the tile unit, else ``vnni``,
    ``avx2``, or ``generic`` (the portable schedules)."""
    kinds = " ".join(cpu_kernels or {})
    for tag, path in (("-amx-", "amx"), ("-avx512vnni-", "vnni"), ("-avx2-", "avx2")):
        if tag in kinds:
            return path
    return "generic"


def rmsmp_weight_bytes(q) -> int:
    """Bytes of weights as stored: 4-bit rows two codes per byte, 8-bit rows one."""
    import tvm_rmsmp as rmsmp

    total = 0
    for plan in rmsmp.row_plans(q).values():
        per_row = int(np.prod(plan.weight_int.shape[1:]))
        for scheme in plan.schemes:
            total += (per_row + 1) // 2 if rmsmp.get_scheme(str(scheme)).bits <= 4 else per_row
    return total


def float_weight_count(model) -> int:
    torch = _torch()
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))


# ----- the run -------------------------------------------------------------------------------
def build_contender(who: str, index: int, quick: bool, threads: int, isa: Optional[str], tvm_trials: int = 0,
                    tuning_dir: str = TUNING_DIR):
    """(callable, info) for contender ``who`` on workload ``index``; (None, info) where it
    does not apply. Every process builds the same model and input (fixed seeds)."""
    torch = _torch()
    name, group, factory, shape, streaming = workloads(quick)[index]
    torch.manual_seed(0)
    model = factory().eval()
    x = example_input(model, shape, torch.Generator().manual_seed(2))
    info: Dict[str, object] = {"weights": float_weight_count(model)}
    if who == "torch fp32":
        return torch_fp32(model, x), info
    if who == "torch int8 dyn":
        return torch_int8_dyn(model, x), info
    if who == "torchao int8 + compile":
        return torchao_int8_compiled(model, x), info
    if who.startswith("ORT"):
        tmp = tempfile.mkdtemp()
        fns = ort_contenders(model, x, threads, tmp, isa == "avx512vnni")
        return fns.get(who), info
    from tvm_rmsmp.compiler.targets import resolve_target

    target = resolve_target("llvm")
    if who.startswith("TVM fp32"):
        if quick and shape[1] == 128 and group == "kernel":
            return None, info
        if who == "TVM fp32 untuned":
            return tvm_fp32(model, x, target), info
        if tvm_trials < 1:
            return None, info
        slug = re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_").lower()
        return tvm_fp32_tuned(model, x, target, os.path.join(tuning_dir, slug), tvm_trials), info
    fn, rinfo = rmsmp_build(model, x, target)
    info.update(rinfo)
    return fn, info


def _worker(conn, who: str, quick: bool, threads: int, isa: Optional[str], tvm_trials: int, tuning_dir: str) -> None:
    """One contender in its own process: builds a workload on request, times ``n`` calls."""
    os.environ["TVM_NUM_THREADS"] = str(threads)
    if os.environ.get(REFUSE_AMX_ENV):  # the filter is inherited; never time a worker that could use AMX
        _check_amx_refused("worker")
    if os.environ.get(AVX2_ONLY_ENV):  # LD_PRELOAD is inherited; never time a worker that could see AVX-512
        from bench.cpuid_mask import check_masked

        check_masked("worker")
    # unpinned TVM workers: on a shared machine a worker pinned to a busy core stalls every
    # parallel region (tvm-rmsmp at batch 1 went from 0.05 to 4 ms here with pinning)
    os.environ.setdefault("TVM_BIND_THREADS", "0")
    sys.path.insert(0, ROOT)
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)
    torch = _torch()
    torch.set_num_threads(threads)
    fn = None
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            return
        try:
            if msg[0] == "build":
                fn = None
                fn, info = build_contender(who, msg[1], quick, threads, isa, tvm_trials, tuning_dir)
                conn.send(("ok", fn is not None, info))
            elif msg[0] == "time":
                traps = _cpuid_traps()
                t0 = time.perf_counter()
                for _ in range(msg[1]):
                    fn()
                conn.send(("ok", time.perf_counter() - t0, _cpuid_traps() - traps))
        except Exception as err:  # noqa: BLE001 - reported by the parent, which goes on
            fn = None
            conn.send(("error", f"{type(err).__name__}: {err}"))


def _cpuid_traps() -> int:
    """CPUID instructions this process ran through ``bench/cpuid_mask.c`` (0 without it): each
    costs a signal and two system calls, so ``--avx2-only`` reports any within timed calls."""
    import ctypes

    try:
        count = ctypes.CDLL(None).rmsmp_cpuid_mask_count
    except AttributeError:
        return 0
    count.restype = ctypes.c_ulong
    return int(count())


def _check_amx_refused(who: str) -> None:
    """Raise unless the OS refuses this process the AMX tile state (``--refuse-amx``)."""
    import errno

    from bench.refuse_amx import amx_request_errno

    got = amx_request_errno()
    if got != errno.EPERM:
        raise RuntimeError(f"--refuse-amx: the {who} process was {'granted' if got == 0 else 'refused with errno ' + str(got)}"
                           " the AMX tile state; expected EPERM from the seccomp filter")


class Contender:
    """A contender's worker process (spawned: its own thread pools, nothing shared)."""

    def __init__(self, who: str, quick: bool, threads: int, isa: Optional[str], tvm_trials: int = 0,
                 tuning_dir: str = TUNING_DIR):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.who = who
        self.cpuid_traps = 0  # CPUIDs answered by the --avx2-only mask during timed calls
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, who, quick, threads, isa, tvm_trials, tuning_dir),
                                daemon=True)
        self.proc.start()

    def ask(self, *msg):
        self.conn.send(msg)
        reply = self.conn.recv()
        if reply[0] == "error":
            raise RuntimeError(f"{self.who}: {reply[1]}")
        return reply[1:]

    def pause(self):
        """Stop the worker process (all its threads, spinning pool workers included)."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self):
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self):
        self.resume()
        try:
            self.conn.send(("stop",))
        except OSError:
            pass
        self.proc.join(timeout=10)


def sample_round_robin(live: Dict[str, Contender], repeat: int, min_time: float = 0.02,
                       gap: float = 0.005, freeze: bool = False) -> Dict[str, float]:
    """Median seconds per call of each contender, one sample of each per round (so a change
    of machine load hits every contender alike); a sample is ``number`` calls filling
    ``min_time``, followed by ``gap`` idle seconds; contenders slower than 0.5 s per call get
    3 samples. ``freeze``: the contenders not being timed are stopped (SIGSTOP) meanwhile."""
    if freeze:
        for c in live.values():
            c.pause()
        try:
            return _sample_round_robin(live, repeat, min_time, gap, freeze)
        finally:
            for c in live.values():
                c.resume()
    return _sample_round_robin(live, repeat, min_time, gap, freeze)


def _sample_round_robin(live: Dict[str, Contender], repeat: int, min_time: float, gap: float,
                        freeze: bool) -> Dict[str, float]:
    def ask(c: Contender, n: int) -> float:
        if freeze:
            c.resume()
        try:
            secs, traps = c.ask("time", n)
            c.cpuid_traps += traps
            return secs
        finally:
            if freeze:
                c.pause()

    number: Dict[str, int] = {}
    wanted: Dict[str, int] = {}
    for who, c in live.items():
        ask(c, 1)
        once = ask(c, 1)
        number[who] = max(1, int(min_time / max(once, 1e-7)))
        wanted[who] = 3 if once > 0.5 else repeat
    samples: Dict[str, List[float]] = {who: [] for who in live}
    for _ in range(repeat):
        for who, c in live.items():
            if len(samples[who]) < wanted[who]:
                secs = ask(c, number[who])
                samples[who].append(secs / number[who])
                time.sleep(gap)  # let the last contender's pool go idle
    return {who: statistics.median(v) for who, v in samples.items()}


def _selected(name: str, only: Optional[List[str]], names_all: List[str]) -> bool:
    """Whether workload ``name`` is one of ``only``: each an exact name, or else a part of names."""
    if not only:
        return True
    for want in only:
        want = want.lower()
        if name.lower() == want if want in names_all else want in name.lower():
            return True
    return False


def run(quick: bool, threads: int, only=None, tvm_trials: int = TVM_TRIALS,
        tuning_dir: str = TUNING_DIR, skip=(), gap: float = 0.005, freeze: bool = False) -> Dict[str, object]:
    torch = _torch()
    torch.set_num_threads(threads)
    hw = hardware(threads)
    print(f"CPU: {hw['cpu']} ({hw['llvm_mcpu']}, {hw['machine']}), {hw['cores']} cores, {threads} threads; "
          f"L3 {hw['l3_bytes'] and hw['l3_bytes'] // 2**20} MiB; tvm-rmsmp x86 kernel ISA: {hw['x86_kernel_isa']}"
          f"{' + AMX-INT8' if hw['x86_amx'] else ''}", flush=True)
    bw = dram_read_bandwidth(quick)
    print(f"DRAM read bandwidth: {bw['GBps']:.1f} GB/s (numpy sum 1 thread {bw['numpy_sum_1_thread_GBps']:.1f}, "
          f"torch sum {threads} threads {bw[f'torch_sum_{threads}_threads_GBps']:.1f}; "
          f"{bw['array_bytes'] / 2**20:.0f} MiB array)", flush=True)
    try:
        import onnxruntime  # noqa: F401

        names = CONTENDERS + [RMSMP]
    except ImportError:
        names = [c for c in CONTENDERS if not c.startswith("ORT")] + [RMSMP]
        print("onnxruntime is not installed (pip install .[bench]): ONNX Runtime contenders skipped", flush=True)
    names = [who for who in names if who not in skip]
    repeat = 7 if quick else 21
    results = []
    workers = {who: Contender(who, quick, threads, hw["x86_kernel_isa"], tvm_trials, tuning_dir) for who in names}
    try:
        names_all = [w[0].lower() for w in workloads(quick)]  # "batch 1" is also in "batch 128": exact first
        only = [only] if isinstance(only, str) else only
        for index, (name, group, _factory, shape, streaming) in enumerate(workloads(quick)):
            if not _selected(name, only, names_all):
                continue
            print(f"\n{name}", flush=True)
            live: Dict[str, Contender] = {}
            infos: Dict[str, dict] = {}
            for who, c in workers.items():  # one build at a time: builds are heavy
                try:
                    applies, info = c.ask("build", index)
                except RuntimeError as err:
                    print(f"  {err}", flush=True)
                    continue
                infos[who] = info
                if applies:
                    live[who] = c
            if RMSMP not in live:
                print("  tvm-rmsmp failed to build: skipped", flush=True)
                continue
            w = infos[RMSMP]["weights"]
            bytes_of = {"torch fp32": 4 * w, "torch int8 dyn": w, "torchao int8 + compile": w, "ORT int8 dyn": w,
                        "ORT 4-bit MatMulNBits": w * 5 // 8, "TVM fp32 untuned": 4 * w, "TVM fp32 tuned": 4 * w,
                        RMSMP: infos[RMSMP]["weight_bytes"]}
            rinfo = {k: v for k, v in infos[RMSMP].items() if k != "weights"}
            row: Dict[str, object] = {"workload": name, "group": group, "input_shape": list(shape), "weights": w,
                                      "seconds": {}, "weight_bytes": {}, "rmsmp": rinfo}
            for c in live.values():
                c.cpuid_traps = 0
            for who, t in sample_round_robin(live, repeat, gap=gap, freeze=freeze).items():
                row["seconds"][who] = t
                row["weight_bytes"][who] = bytes_of[who]
                extra = f"  {bytes_of[who] / t / 1e9:6.1f} GB/s of weights" if streaming else ""
                print(f"  {who:24s} {t * 1e3:10.3f} ms{extra}", flush=True)
            traps = {who: c.cpuid_traps for who, c in live.items() if c.cpuid_traps}
            if traps:  # their times include the mask's trap cost (--avx2-only): say so, never hide it
                row["cpuid_traps_in_timed_calls"] = traps
                print(f"  CPUID trapped within timed calls (their times include the trap cost): {traps}", flush=True)
            secs = row["seconds"]
            row["speedup"] = {who: secs[who] / secs[RMSMP] for who in secs if who != RMSMP}
            if streaming:
                row["rmsmp_fraction_of_dram_bw"] = bytes_of[RMSMP] / secs[RMSMP] / 1e9 / bw["GBps"]
            print(f"  rmsmp bit-exact vs its torch reference: {rinfo['bit_exact']} "
                  f"(max |diff| {rinfo['max_abs_diff']:.3g}); kernels {rinfo['stats'].get('cpu_kernels')} "
                  f"({rinfo['isa_path']}); speedup: "
                  + ", ".join(f"{k} {v:.2f}x" for k, v in row["speedup"].items()), flush=True)
            results.append(row)
    finally:
        for c in workers.values():
            c.stop()
    return {"hardware": hw, "dram": bw, "quick": quick, "tvm_fp32_trials_per_task": tvm_trials,
            "command": " ".join(["python -m bench.cpu"] + [f'"{a}"' if " " in a else a for a in sys.argv[1:]]),
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "results": results}


def _fmt(seconds: Optional[float]) -> str:
    if seconds is None:
        return "–"
    return f"{seconds * 1e3:.3f}" if seconds < 0.01 else f"{seconds * 1e3:.1f}"


def _trials_text(report: Dict[str, object]) -> str:
    trials = report.get("tvm_fp32_trials_per_task")
    if not trials:
        return "not in this run"
    return (f"with {trials} trials per task (on these 2 cores a trial takes 2-3 s, so the models' 10-20 "
            "tasks take minutes each; more trials may find faster schedules: `--tvm-trials`)")


def _vs_fastest(row) -> Optional[float]:
    return min(row["speedup"].values()) if row.get("speedup") else None


def other_runs_markdown(report: Dict[str, object], others: Dict[str, Dict[str, object]]) -> List[str]:
    """A table of earlier committed runs on other CPUs (``bench/results/cpu-*.json``) next to
    this one: tvm-rmsmp's latency and its ratio to the fastest contender of each run."""
    if not others:
        return []
    runs = [("this run", report)] + sorted(others.items())
    head = [f"{r['hardware']['cpu']}, {r['hardware']['llvm_mcpu']} (`{name}`, {r['hardware']['x86_kernel_isa']}"
            f"{' + AMX' if r['hardware'].get('x86_amx') else ''}{_proxy_label(r)}, "
            f"{r['hardware']['threads']} thread{'s' if r['hardware']['threads'] > 1 else ''}, {r['date_utc'][:10]})"
            for name, r in runs]
    lines = ["## Other CPUs", "",
             "Committed runs of the same command on other machines (JSON in `bench/results/`): tvm-rmsmp",
             "untuned in ms, and in parentheses its speedup over the fastest contender of that run and",
             "the instruction path of its integer kernels (`amx`, `vnni`, `avx2`; where recorded).", "",
             "| workload | " + " | ".join(head) + " |", "|---|" + "---:|" * len(runs)]
    names = [row["workload"] for row in report["results"]]
    for _, r in runs[1:]:
        names += [row["workload"] for row in r["results"] if row["workload"] not in names]
    for name in names:
        cells = []
        for _, r in runs:
            row = next((x for x in r["results"] if x["workload"] == name), None)
            best = _vs_fastest(row) if row else None
            path = row and row.get("rmsmp", {}).get("isa_path")
            cells.append("–" if row is None else f"{_fmt(row['seconds'][RMSMP])} ({best:.2f}x{', ' + path if path else ''})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


#: The goals of issue 22 (2 threads): (what, workload, contenders compared with, least speedup)
GOALS = [
    ("FFN batch 128 >= 1.0x the fastest peer", "FFN 768-3072-768, batch 128", None, 1.0),
    ("dense 768x768 batch 128 >= 1.0x", "dense 768x768, batch 128", None, 1.0),
    ("dense 768x3072 batch 128 >= 1.0x", "dense 768x3072, batch 128", None, 1.0),
    ("dense 3072x768 batch 128 >= 1.0x", "dense 3072x768, batch 128", None, 1.0),
    ("BERT-base layer, seq 128 >= 1.2x ORT int8", "BERT-base encoder layer, seq 128", ["ORT int8 dyn"], 1.2),
    ("MiniLM-L6, seq 128 >= 1.2x ORT int8", "MiniLM-L6 (all-MiniLM-L6-v2), seq 128", ["ORT int8 dyn"], 1.2),
    ("ResNet-18 batch 8 ahead of every contender", "ResNet-18 8x3x224x224", None, 1.0),
    ("FFN batch 1 >= 1.5x the fastest peer", "FFN 768-3072-768, batch 1", None, 1.5),
]


def _proxy_label(report) -> str:
    """How a run stood in for another host (``--refuse-amx``, ``--avx2-only``), for table heads."""
    if report.get("refuse_amx"):
        return ", AMX refused by the OS"
    if report.get("avx2_only"):
        return ", AVX-512/VNNI/AMX hidden from CPUID"
    return ""


def _row(report, workload):
    return next((x for x in report["results"] if x["workload"] == workload), None)


#: What a run with ``--refuse-amx`` is (rendered above its CPU's table)
REFUSED_NOTES = [
    "These runs (`--refuse-amx`) are a stand-in for a VNNI-only host, not one: on the AMX Xeon, before any",
    "contender started, a seccomp filter (`bench/refuse_amx.py`) made the OS answer every process's request",
    "for the AMX tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`) with EPERM, as a",
    "kernel without AMX support would. Every contender asks before using the tile unit and falls back to",
    "AVX-512 VNNI when refused: tvm-rmsmp (`schedules/x86_amx.py` warns; its kernels are then",
    "`x86-avx512vnni-*`), oneDNN in torch (`ONEDNN_VERBOSE=1` names the ISA `Intel AVX 10.1` instead of",
    "`Intel AVX10.1 and Intel AMX ...`) and ONNX Runtime's MLAS (`python -m bench.refuse_amx` times both",
    "peers' int8 GEMMs granted and refused; `tests/test_refuse_amx.py` checks their results and ours under",
    "the filter). Same silicon, caches and clocks as the AMX runs; a VNNI-only CPU may differ in all three.",
]

#: What a run with ``--avx2-only`` is (rendered above its CPU's table)
AVX2_ONLY_NOTES = [
    "These runs (`--avx2-only`) are a stand-in for an AVX2-only host, not one: on the AMX Xeon, every",
    "contender's process was started with `bench/cpuid_mask.c` preloaded, which makes the CPUID",
    "instruction fault (Linux `arch_prctl(ARCH_SET_CPUID)`, the CPU's CPUID faulting) and answers it with",
    "the real values less AVX-512 (all subsets), AVX-VNNI, AVX10 and AMX; glibc's string functions are",
    "told the same (`GLIBC_TUNABLES`). Every contender picks its kernels from CPUID: tvm-rmsmp builds for",
    "LLVM's host features (`avx2`, no `avx512f`: its kernels are then `x86-avx2-*`), torch reports the",
    "CPU capability `AVX2`, and ONNX Runtime's MLAS takes its AVX2 `vpmaddubsw` kernels, whose int16 pair",
    "sums saturate as on any AVX2 CPU (`python -m bench.cpuid_mask` shows what each library sees and times",
    "the peers' int8 GEMMs with and without the mask; `tests/test_cpuid_mask.py` checks threads, children,",
    "chained signal handlers and our kernels under it). Same silicon, caches and clocks as the AMX runs;",
    "an AVX2-only CPU (AMD Zen 2/3, Intel client cores) differs in all three. A trapped CPUID costs about",
    "30 us here; the runs count those within timed calls (`cpuid_traps_in_timed_calls` in the JSON, the two",
    "calls that size a sample included): only torch's, in a new shape's first call (its dynamic int8 FFN:",
    "32 in the first call, none in the next 1000), none in tvm-rmsmp's or ONNX Runtime's calls.",
]

#: How the AMX runs' dense layers are computed (rendered under a CPU whose runs had AMX-INT8)
AMX_NOTES = [
    "On this CPU the dense layers from 12 activation rows on run `x86-amx-layer` (`schedules/x86_amx.py`):",
    "every row of a layer, SP2-4, Fixed-4 or Fixed-8, is decoded to int8 at compile time into one matrix in",
    "the graph's output order, laid out in 1 KiB tiles in the VNNI layout; per call the activations are",
    "staged once as `A` tiles (`tdpbusd` for uint8 activations, `tdpbssd` for int8), each task keeps a",
    "2 x 2 block of int32 accumulator tiles over the whole reduction while the next 32-column weight panel",
    "is prefetched into L2, and the epilogue `float32(acc + bias) * scale` runs on AVX-512 vectors (bit for",
    "bit the VNNI kernels' results). The threshold: `python -m bench.layer_kernels --amx --cpu-time --rows 8",
    "10 12 16 24` (both FFN layers, one thread; AMX time nearly flat below 32 rows: it streams the int8",
    "weights). The price of int8 tiles: one byte per weight in memory where packed 4-bit rows take half",
    "(a BERT FFN: 4.7 MB instead of 2.4 MB); decoding the packed rows per call, panel by panel, measured",
    "slower (the module docstring has the numbers). The convolutions run AMX tiles too",
    "(`schedules/x86_amx_conv.py`), an implicit GEMM: a layer's rows decoded to int8 at compile time as the",
    "`A` tiles, in the graph's channel order, one kernel per layer (`x86-amx-conv-layer`, through",
    "`relay_passes.FuseDenseLayers`); the activations staged once per call in 4-channel groups per stride",
    "phase as the `B` tiles (one `tileloadd` per kernel tap, no im2col); the epilogue written NCHW through",
    "masked stores; the 3-channel stem folds its 7 kernel columns into the channels. ResNet-18, one",
    "thread, VNNI convolutions vs AMX ones: batch 1 25.4 -> 4.9 ms, batch 8 206.2 -> 45.8 ms",
    "(`python -m bench.amx_conv --model --batch 1 8`, 2026-12-06, CPU time; it also times every conv",
    "shape: at batch 8 the stem 2.3x, the others 5.1-13.2x).",
    "`RMSMP_AMX=0` at compile time builds without AMX. Where the OS refuses the process the tile state",
    "(`arch_prctl(ARCH_REQ_XCOMP_PERM)`), a build for this CPU warns and takes the VNNI kernels instead (the",
    "runs named \"VNNI path\" below), and a kernel built for AMX elsewhere fails saying so.",
    "",
]


def threads_markdown(others: Dict[str, Dict[str, object]]) -> List[str]:
    """Per CPU with committed runs at several thread counts (``bench/results/cpu-<name>-<t>t.json``):
    tvm-rmsmp and the fastest contender at each thread count, the instruction path, the scaling,
    and the goals of issue 22 (from the run with the most threads)."""
    by_cpu: Dict[str, Dict[int, tuple]] = {}
    for name, r in others.items():
        m = re.fullmatch(r"cpu-(.+)-(\d+)t\.json", name)
        if m:
            by_cpu.setdefault(m.group(1), {})[int(r["hardware"]["threads"])] = (name, r)
    lines: List[str] = []
    for cpu, runs in sorted(by_cpu.items()):
        threads = sorted(runs)
        hw = runs[threads[-1]][1]["hardware"]
        refused = all(runs[t][1].get("refuse_amx") for t in threads)
        avx2_only = all(runs[t][1].get("avx2_only") for t in threads)
        where = f"({hw['cpu']}, LLVM `{hw['llvm_mcpu']}`, {hw['cores']} cores)"
        if refused:
            title, notes = f"VNNI path (AMX refused by the OS) on the AMX Xeon {where}", REFUSED_NOTES + [""]
        elif avx2_only:
            title, notes = f"AVX2 path (AVX-512, AVX-VNNI and AMX hidden from CPUID) on the AMX Xeon {where}", \
                AVX2_ONLY_NOTES + [""]
        else:
            title, notes = f"{hw['cpu']} (LLVM `{hw['llvm_mcpu']}`, {hw['cores']} cores)", []
        lines += [f"## {title}: 1 and 2 threads", ""] + notes + [
                  "Files " + ", ".join(f"`bench/results/{runs[t][0]}` ({runs[t][1]['date_utc']} UTC, "
                                       f"`{runs[t][1]['command']}`)" for t in threads) + ". tvm-rmsmp untuned in ms,",
                  "its speedup over the fastest contender of the same run (and which), the instruction path of its",
                  "integer kernels (`amx`: AMX-INT8 tiles, `vnni`: AVX-512 VNNI, `avx2`), and its scaling from",
                  f"{threads[0]} to {threads[-1]} threads (time at {threads[0]} / time at {threads[-1]}).", "",
                  "| workload | path | " + " | ".join(f"{t} thread{'s' if t > 1 else ''}: ms (x fastest)"
                                                       for t in threads) + " | scaling |",
                  "|---|---|" + "---:|" * (len(threads) + 1)]
        names = []
        for t in threads:
            names += [x["workload"] for x in runs[t][1]["results"] if x["workload"] not in names]
        for wl in names:
            cells, secs, path = [], [], "–"
            for t in threads:
                row = _row(runs[t][1], wl)
                if row is None:
                    cells.append("–")
                    secs.append(None)
                    continue
                best = min(row["speedup"], key=row["speedup"].get)
                cells.append(f"{_fmt(row['seconds'][RMSMP])} ({row['speedup'][best]:.2f}x {best})")
                secs.append(row["seconds"][RMSMP])
                path = row["rmsmp"].get("isa_path", path)
            scaling = f"{secs[0] / secs[-1]:.2f}x" if secs[0] and secs[-1] else "–"
            lines.append(f"| {wl} | {path} | " + " | ".join(cells) + f" | {scaling} |")
        for t in threads:
            if runs[t][1].get("note"):
                lines += ["", f"Note on the {t}-thread run: {runs[t][1]['note']}"]
        if hw.get("x86_amx"):
            lines += [""] + AMX_NOTES[:-1]
        lines += ["", "Goals of issue 22 on this CPU (the issue asks them at 2 threads): tvm-rmsmp ms, its speedup over",
                  "the contender compared with, met or not, per thread count."
                  + (" Of a VNNI-only host the issue asks the batch-128 rows (FFN and the three dense layers); the"
                     " BERT layer and MiniLM goals are asked of an AMX host (shown for reference); ResNet-18 at"
                     " batch 8 and the FFN at batch 1 without naming a host." if refused else "")
                  + (" Of an AVX2 host the issue asks the batch-128 rows (FFN and the three dense layers); the"
                     " BERT layer and MiniLM goals are asked of an AMX host (shown for reference); ResNet-18 at"
                     " batch 8 and the FFN at batch 1 without naming a host." if avx2_only else ""), "",
                  "| goal | " + " | ".join(f"{t} thread{'s' if t > 1 else ''}" for t in threads) + " |",
                  "|---|" + "---|" * len(threads)]
        for what, wl, against, least in GOALS:
            cells = []
            for t in threads:
                row = _row(runs[t][1], wl)
                peers = {} if row is None else {k: v for k, v in row["speedup"].items() if against is None or k in against}
                if not peers:
                    cells.append("not measured")
                    continue
                best = min(peers, key=peers.get)
                cells.append(f"{_fmt(row['seconds'][RMSMP])} vs {best} {_fmt(row['seconds'][best])}: "
                             f"{peers[best]:.2f}x, {'met' if peers[best] >= least else 'not met'}")
            lines.append(f"| {what} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _ratio_text(report: Dict[str, object], workload: str) -> str:
    row = next((r for r in report["results"] if r["workload"] == workload), None)
    if row is None or not row.get("speedup"):
        return "not measured in this run"
    best = min(row["speedup"], key=row["speedup"].get)
    return f"{row['speedup'][best]:.2f}x of {best} ({_fmt(row['seconds'][RMSMP])} vs {_fmt(row['seconds'][best])} ms)"


def _gaps(report: Dict[str, object], stack_pct: str, ffn_rates: str) -> List[str]:
    """The known gaps, for the kernels of the run's ISA."""
    from schedules.x86_gemv import GEMV_MAX_ROWS_AVX2

    batch1 = ["- Batch 1: a layer's weights (2.5 MB for the FFN, 1.2 MB per layer) come from L3, since",
              "  the next layer's evict them from this core's L2; the stack streams at",
              f"  {stack_pct} of the probe's DRAM bandwidth (above 100%: part of its 45 MB stays in the",
              f"  32 MB L3 between runs). In this run {ffn_rates}."]
    attention = ["- Attention's matmuls (float32) run at about one core's FMA peak (16 per cycle); at seq 128",
                 "  they are 7% of the BERT layer and 10% of MiniLM-L6 (AVX-512 run)."]
    if report["hardware"].get("x86_kernel_isa") != "avx512vnni":
        kinds = {kind for row in report["results"] for kind in (row.get("rmsmp", {}).get("stats", {})
                                                                .get("cpu_kernels") or {})}
        if "x86-avx2-layer" in kinds:
            batch128 = [
                "- Batch 128 (AVX2): each dense layer is one kernel (`x86_intrin.layer_avx2_kernel`): its",
                "  4-bit rows decoded to bytes at compile time, multiplied as outer products (two weight",
                "  vectors of eight rows against two broadcast activation words; `vpmaddubsw` pair sums",
                "  added in 16 bits eight at a time before one `vpmaddwd`), the 8-bit rows (5%) as int16",
                "  pairs (`vpmaddwd`: half the products per instruction) written over their slots. The MAC",
                "  loop is bound by the three vector ports: a `vpmaddubsw` and a 16-bit add per 32",
                "  products (`python -m bench.layer_kernels --peak`: 167-171 G MAC/s a thread on the AMX Xeon with",
                "  AVX-512 hidden, where the layer kernel reaches 125); ONNX Runtime's",
                "  int8 kernel needs a third operation per 32 (`vpmaddwd` after each `vpmaddubsw`). FFN at",
                f"  batch 128: {_ratio_text(report, 'FFN 768-3072-768, batch 128')}.",
            ]
        else:
            batch128 = [
                "- Batch 128 (AVX2, the kernels of this run): each row group ran its own outer-product",
                "  kernel, joined by a concatenation, the 4-bit rows decoded per call (since replaced by",
                "  one kernel per layer, `x86-avx2-layer`, rows decoded at compile time). FFN at batch 128:",
                f"  {_ratio_text(report, 'FFN 768-3072-768, batch 128')}.",
            ]
        return batch128 + [
            "- Batch 8 (AVX2): each dense layer is the two-rows-per-byte layer kernel (up to",
            f"  {GEMV_MAX_ROWS_AVX2} rows, `GEMV_MAX_ROWS_AVX2`), two activation rows per pass over the packed",
            "  weights, each pass decoding them again (more rows per pass would spill AVX2's 16",
            "  registers). FFN at batch 8:",
            f"  {_ratio_text(report, 'FFN 768-3072-768, batch 8')}.",
            "- Batch 1 (AVX2): the layer kernel issues about seven vector operations per 64 weights of",
            "  fixed rows (a split of both nibbles, two `vpmaddubsw`, two 16-bit adds) and nine for SP2",
            "  rows (two `vpshufb` more); one pass over both FFN layers' 4.7 M weights took 76 us on",
            "  its own (`python -m bench.layer_kernels --passes`, about 60 G weights/s), so the FFN is",
            "  bound by instructions, not memory, and its lead over ONNX Runtime int8 moves with the",
            f"  load of this shared machine (this run: {_ratio_text(report, 'FFN 768-3072-768, batch 1')}).",
            "- ResNet-18 at batch 1 (AVX2): `python -m bench.profile_model` puts about two thirds of the",
            "  time in the 3x3 convolutions' 4-bit row groups (per-tap GEMMs, `vpmaddubsw` with int16",
            "  pair sums), 3 ms in the 8-bit rows (int16 pairs, `vpmaddwd`: half the products per",
            "  instruction) and 4.5 ms in the stem (3 channels: an im2col in tap order per row group).",
        ] + batch1 + attention
    return [
        "- Batch 128 (from 24 activation rows on, AVX-512 VNNI): each dense layer is one kernel whose",
        "  row groups are decoded per call into one int8 matrix in the graph's output order, then one",
        "  outer-product GEMM (`vpdpbusd` of four broadcast activation bytes against eight weight",
        "  rows): no concatenation of groups and no row-order gather. It runs at about 205 GMAC/s",
        "  alone (128 x 768 x 3072, one thread), as fast as the int8 contenders' GEMMs (MLAS,",
        "  fbgemm), which also block the reduction for the caches; the per-call decode of the 4-bit",
        "  rows, and their streaming in from memory (about 75 us of 1.46 ms at 768 x 3072), is the",
        "  price of keeping them 4-bit in memory. The BERT layer and MiniLM-L6 run no gather and no",
        "  concatenation at seq 128; `python -m bench.profile_model` prints the time per kind of call.",
    ] + batch1 + [
        "- Batch 8: the FFN's layer kernels pass over each block of packed weights once per four",
        "  activation rows, decoding it again each time (more rows per pass spill AVX-512's 32",
        "  registers), so at 8 rows they take about as long as ONNX Runtime's int8 GEMM, whose",
        "  weights need no decode; the outer-product kernel, which decodes once per call, is",
        "  faster only from about 24 rows on (`python -m bench.layer_kernels`).",
    ] + attention



#: a hand-written block of docs/performance.md (``<!-- BEGIN hand-written NAME ... -->`` to
#: ``<!-- END hand-written NAME -->``): kept when the generated tables are rewritten
_HAND_WRITTEN = re.compile(r"<!-- BEGIN hand-written (?P<name>[\w-]+).*?-->.*?<!-- END hand-written (?P=name) -->", re.S)


def with_hand_written(path: str, generated: str) -> str:
    """``generated`` with the hand-written blocks of the file at ``path`` kept: the first one
    (the overview) after the title line, the others at the end, in their order."""
    try:
        with open(path) as fh:
            blocks = [m.group(0) for m in _HAND_WRITTEN.finditer(fh.read())]
    except FileNotFoundError:
        return generated
    if not blocks:
        return generated
    title, _, rest = generated.partition("\n\n")
    tail = "".join(f"\n\n{b}" for b in blocks[1:])
    return f"{title}\n\n{blocks[0]}\n\n{rest.rstrip()}{tail}\n"


def markdown(report: Dict[str, object], others: Optional[Dict[str, Dict[str, object]]] = None) -> str:
    from schedules.x86_amx import AMX_MIN_ROWS
    from schedules.x86_gemv import GEMV_MAX_ROWS, GEMV_MAX_ROWS_AVX2

    hw, bw = report["hardware"], report["dram"]
    cols = CONTENDERS + [RMSMP]
    lines = [
        "# Performance on CPUs",
        "",
        "Generated by `python -m bench.cpu` (JSON: `bench/results/cpu.json`). Medians of repeated",
        "wall-clock timings of one call, all contenders in the same run. RMSMP at SP2-4 : Fixed-4 :",
        "Fixed-8 = 60:35:5 with 8-bit activations, untuned `rmsmp.compile`. Random weights.",
        "",
        f"**Hardware**: {hw['cpu']} (LLVM `mcpu={hw['llvm_mcpu']}`), {hw['cores']} cores, threads per contender: {hw['threads']}, "
        f"L3 {hw['l3_bytes'] and hw['l3_bytes'] // 2**20} MiB; tvm-rmsmp x86 kernels: `{hw['x86_kernel_isa']}`. "
        f"Measured DRAM read bandwidth {bw['GBps']:.1f} GB/s (sum over a {bw['array_bytes'] // 2**20} MiB array). "
        f"Run {report['date_utc']} UTC, `{report['command']}`"
        + (" (quick mode: fewer repeats)." if report["quick"] else "."),
        "Each contender runs in its own process with its default thread settings (in one process,",
        "TVM's spinning, core-pinned thread pool slowed the next torch call down up to 9x); samples",
        "are taken round-robin, one per contender per round, so a change of load hits all alike.",
        "The machine (2 cores) was shared with other jobs during the run, so absolute numbers are",
        "noisy: compare within one run. With 2 threads per contender on it, thread-pool barriers",
        "waiting for descheduled workers made single timings swing by up to 10x (torch dynamic int8",
        "at batch 1: 0.07 to 12 ms), so the committed run uses one thread per contender.",
        "",
        "## Latency (ms)",
        "",
        "| workload | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for row in report["results"]:
        secs = row["seconds"]
        cells = [_fmt(secs.get(c)) for c in cols]
        cells[-1] = f"**{cells[-1]}**"
        lines.append(f"| {row['workload']} | " + " | ".join(cells) + " |")
    lines += ["", "## Speedup of tvm-rmsmp (contender time / tvm-rmsmp time; > 1: tvm-rmsmp faster)", "",
              "| workload | " + " | ".join(CONTENDERS) + " | vs fastest contender |",
              "|---|" + "---:|" * (len(CONTENDERS) + 1)]
    for row in report["results"]:
        sp = row["speedup"]
        cells = [f"{sp[c]:.2f}x" if c in sp else "–" for c in CONTENDERS]
        best = f"**{min(sp.values()):.2f}x**" if sp else "–"
        lines.append(f"| {row['workload']} | " + " | ".join(cells) + f" | {best} |")
    lines += ["", f"## Batch 1: weight bytes streamed per second (DRAM read bandwidth {bw['GBps']:.1f} GB/s)", "",
              "Weight bytes as each contender stores them (fp32: 4 B, int8: 1 B, MatMulNBits: 0.5 B + scales, "
              "tvm-rmsmp: 4-bit rows 0.5 B, 8-bit rows 1 B per weight) divided by the latency. Working sets that",
              "fit the 32 MiB L3 can exceed the DRAM bandwidth; the 12-layer stack's weights (85M, 44.6 MB as",
              "tvm-rmsmp stores them) do not fit. The bandwidth probe (one thread summing a large array) is a",
              "lower bound of what the memory system delivers: a kernel that streams one sequential tile after",
              "another can read faster than it, and part of a 44.6 MB working set can still hit the L3.", "",
              "| workload | tvm-rmsmp weight MB | tvm-rmsmp GB/s | % of DRAM bandwidth | fastest contender GB/s |",
              "|---|---:|---:|---:|---:|"]
    for row in report["results"]:
        if "rmsmp_fraction_of_dram_bw" not in row:
            continue
        secs, wb = row["seconds"], row["weight_bytes"]
        best = min((c for c in secs if c != RMSMP), key=lambda c: secs[c])
        lines.append(f"| {row['workload']} | {wb[RMSMP] / 1e6:.1f} | {wb[RMSMP] / secs[RMSMP] / 1e9:.1f} | "
                     f"{100 * row['rmsmp_fraction_of_dram_bw']:.0f}% | {wb[best] / secs[best] / 1e9:.1f} ({best}) |")
    stack = [r for r in report["results"] if r["workload"].startswith("12 BERT") and "rmsmp_fraction_of_dram_bw" in r]
    stack_pct = f"{100 * stack[0]['rmsmp_fraction_of_dram_bw']:.0f}%" if stack else "a fraction"
    ffn = [r for r in report["results"] if r["workload"].startswith("FFN") and "rmsmp_fraction_of_dram_bw" in r]
    if ffn:
        secs, wb = ffn[0]["seconds"], ffn[0]["weight_bytes"]
        best = min((c for c in secs if c != RMSMP), key=lambda c: secs[c])
        ffn_rates = (f"the FFN's whole time is {wb[RMSMP] / secs[RMSMP] / 1e9:.0f} GB/s of its packed bytes, {best}'s "
                     f"{wb[best] / secs[best] / 1e9:.0f} GB/s of its own")
    else:
        ffn_rates = "the FFN streams its packed bytes at about the rate ONNX Runtime streams its int8 ones"
    lines += ["", "## tvm-rmsmp kernels", "",
              "Every row group, dense or conv2d, runs the x86 kernel of `schedules/x86_intrin.py` where the",
              "CPU has the instructions: packed 4-bit rows (fixed and SP2) decoded to int8 by a 16-entry",
              "`vpshufb` table, then `vpdpbusd` (AVX-512 VNNI) or `vpmaddubsw` + `vpmaddwd` (AVX2); int8",
              "(Fixed-8) rows straight into `vpdpbusd` (VNNI) or, on AVX2, where `vpmaddubsw` would",
              "saturate on 8-bit products, as int16 pairs (`vpmaddwd`). SP2 rows are decoded and multiplied",
              "(not shift-added) on these targets. Signed activations are the MAC's signed operand and the",
              "weights its unsigned one (4-bit levels offset by 8, int8 rows by 128), corrected by the",
              "activation sums, taken once per call. Convolutions whose input channels fill whole vector",
              "steps run as one GEMM over the channels per kernel tap, on activations staged once per call",
              "as channel-last planes; others (the ResNet stem, C = 3) through an im2col in tap order (one",
              "vector copy of `kw * C` channel-last activations per kernel row and pixel). Dense layers read",
              "their weight constants laid out at compile time tile by tile (one sequential stream per",
              "tile of rows); conv weights are reordered at compile time too (taps first, or tap order).",
              "At small batches each dense layer's row groups run as one kernel with outputs in the graph's",
              f"order (`x86-<isa>-gemv`, `schedules/x86_gemv.py`; up to {GEMV_MAX_ROWS} activation rows on VNNI,",
              f"{GEMV_MAX_ROWS_AVX2} on AVX2): a byte holds two rows' codes at the same reduction element,",
              "so both nibbles meet the same activation vector. On VNNI fixed 4-bit rows cost an `and`",
              "and two `vpdpbusd` per 128 weights (`16 * hi + lo` and `lo`), SP2 rows two VBMI `vpermb`",
              "lookups and a shift; on AVX2",
              "(whole bytes would saturate `vpmaddubsw`) each nibble is split out and multiplied, SP2 ones",
              "through `vpshufb`, and the 16-bit pair sums are added for eight steps before `vpmaddwd`",
              f"widens them. From {GEMV_MAX_ROWS + 1} rows on (batch 128) VNNI runs `x86-avx512vnni-layer`: one",
              "outer-product GEMM on 512-bit `vpdpbusd` over the layer's rows as one int8 matrix, decoded at compile",
              "time for a static batch (one byte per weight, as on AMX), per call for a dynamic one; AVX2 runs from",
              f"{GEMV_MAX_ROWS_AVX2 + 1} rows on each group's own outer-product kernel. Where the CPU has AMX-INT8",
              f"(Intel Xeon since Sapphire Rapids), from {AMX_MIN_ROWS} activation rows on each dense layer runs",
              "`x86-amx-layer` (`schedules/x86_amx.py`): its rows decoded to int8 at compile time into 1 KiB",
              "tiles in the VNNI layout, activations as the other tile operand (`tdpbusd` / `tdpbssd`), 2 x 2",
              "int32 accumulator tiles over the whole reduction, the epilogue on AVX-512 vectors; and each",
              "conv layer `x86-amx-conv-layer` (`schedules/x86_amx_conv.py`, an implicit GEMM).",
              "Without AMX, each conv layer of a static batch of two or more images runs one",
              "`x86-avx512vnni-conv-layer` kernel over all its rows, decoded to int8 at compile time.",
              "`exe.stats['cpu_kernels']` counts the kernels of each kind.",
              "Tuning: on a CPU with AVX2 or AVX-512 every row group is one of these hand-written kernels, which",
              "have no tuning space, so `rmsmp.tune` finds nothing to tune (it warns and returns) and a tuned",
              "build is the untuned one; there is no separate tvm-rmsmp tuned column. TVM fp32 tuned: every",
              "fused operator of the float model is a MetaSchedule task (TVM's default CPU search space,",
              f"XGBoost cost model), tuned {_trials_text(report)}.",
              "Float operators between RMSMP layers: batched matmuls parallel and vectorized, element-wise",
              "chains parallel with the concatenation of the row groups split into one loop per group and",
              "transpositions (attention's K^T) in 8 x 8 tiles, LayerNorm and softmax one parallel row at a",
              "time, and GELU / softmax / exp / tanh through TVM's vectorizable `fast_*` approximations.",
              "In fast-math builds (the default) the sums of LayerNorm and softmax are also split into 16",
              "vectorized partial sums (a reassociation: float rounding changes), which took LayerNorm over",
              "128 x 768 from 185 to 22 us; `rmsmp.compile(..., fast_math=False)` keeps libm and TVM's",
              "summation order (GELU + quantizer over 128 x 3072 took 3.5 ms with libm, 0.15 ms now;",
              "GELU's largest error is 9.4e-7, torch's own 1.2e-6).",
              "Bit-exact against the torch reference: "
              + ", ".join(f"{r['workload']}: {'yes' if r['rmsmp']['bit_exact'] else 'no'}" for r in report["results"])
              + " (layers with GELU, LayerNorm, softmax or average pooling in float differ by float rounding only).",
              "",
              "## Where the time goes (known gaps)",
              ""] + _gaps(report, stack_pct, ffn_rates) + [""] + other_runs_markdown(report, others or {}) \
        + threads_markdown(others or {})
    return "\n".join(lines)


def other_runs(json_path: str) -> Dict[str, Dict[str, object]]:
    """The committed runs on other CPUs beside ``json_path``: ``cpu-<name>.json``."""
    import glob

    out = {}
    for path in sorted(glob.glob(os.path.join(os.path.dirname(json_path), "cpu-*.json"))):
        if os.path.abspath(path) != os.path.abspath(json_path):
            with open(path) as fh:
                out[os.path.basename(path)] = json.load(fh)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats, smaller DRAM probe, no batch-128 TVM fp32")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", nargs="+", help="run the workloads of these names, else those whose name contains "
                    "one of these texts")
    ap.add_argument("--tvm-trials", type=int, default=TVM_TRIALS,
                    help="MetaSchedule trials per task for TVM fp32 tuned (0: leave that contender out)")
    ap.add_argument("--skip", nargs="+", default=[], choices=CONTENDERS, metavar="CONTENDER",
                    help="leave these contenders out (e.g. \"TVM fp32 untuned\": seconds per call at batch 8 of ResNet-18)")
    ap.add_argument("--no-spin", action="store_true", help="idle thread pools sleep instead of spinning (every "
                    "contender; see NO_SPIN): for several threads on a machine with as many cores")
    ap.add_argument("--gap", type=float, default=0.005, help="idle seconds after each sample")
    ap.add_argument("--freeze", action=argparse.BooleanOptionalAction, default=None,
                    help="stop (SIGSTOP) the contenders not being timed, so that their spinning pools cannot take "
                    "a core (default: on at several threads without --no-spin)")
    ap.add_argument("--refuse-amx", action="store_true", help="before any worker starts, install a seccomp filter "
                    "that makes the OS refuse the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM) to this process and "
                    "every worker (bench/refuse_amx.py): all contenders fall back to AVX-512 VNNI, a proxy for a "
                    "VNNI-only host on an AMX Xeon")
    ap.add_argument("--avx2-only", action="store_true", help="run this process and every worker with "
                    "bench/cpuid_mask.c preloaded (CPUID faulting hides AVX-512, AVX-VNNI and AMX): every contender "
                    "takes its AVX2 path, a proxy for an AVX2-only host on a CPU with CPUID faulting")
    ap.add_argument("--note", help="a remark on the run's conditions, kept in the JSON and shown in the docs")
    ap.add_argument("--tuning-dir", default=TUNING_DIR,
                    help="where TVM fp32 tuned keeps its records, one folder per workload (reused by later runs)")
    ap.add_argument("--json", default=os.path.join(ROOT, "bench", "results", "cpu.json"))
    ap.add_argument("--markdown", default=os.path.join(ROOT, "docs", "performance.md"))
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--render", action="store_true", help="only rewrite the Markdown from the JSON file")
    args = ap.parse_args(argv)
    if args.render:
        sys.path.insert(0, ROOT)
        from tvm_rmsmp.runtime.fileio import atomic_write

        with open(args.json) as fh:
            atomic_write(args.markdown, with_hand_written(args.markdown, markdown(json.load(fh), other_runs(args.json))))
        return 0
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    sys.path.insert(0, ROOT)
    warnings.filterwarnings("ignore")
    if args.tvm_trials < 0:
        ap.error(f"--tvm-trials must be >= 0, got {args.tvm_trials}")
    if args.no_spin:
        os.environ.update(NO_SPIN)  # before the workers are spawned: they inherit it
    gap = args.gap
    if gap < 0:
        ap.error(f"--gap must be >= 0, got {gap}")
    freeze = args.freeze if args.freeze is not None else (args.threads > 1 and not args.no_spin)
    if args.avx2_only:
        from bench import cpuid_mask

        if args.refuse_amx:
            ap.error("--avx2-only hides AMX already; leave out --refuse-amx")
        if not cpuid_mask.active():  # start again with the mask preloaded: it must come before any library
            if not cpuid_mask.cpu_can_fault():
                ap.error("--avx2-only: this CPU or kernel has no CPUID faulting (no cpuid_fault in /proc/cpuinfo)")
            env = cpuid_mask.masked_env()
            env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
            sys.stdout.flush()
            os.execve(sys.executable, [sys.executable, "-m", "bench.cpu"] + list(sys.argv[1:] if argv is None else argv),
                      env)
        cpuid_mask.check_masked("parent")
        os.environ[AVX2_ONLY_ENV] = "1"
    if args.refuse_amx:  # before anything asks for the tile state, and before any worker is spawned
        from bench.refuse_amx import refuse_amx

        refuse_amx()
        _check_amx_refused("parent")
        os.environ[REFUSE_AMX_ENV] = "1"
    report = run(args.quick, args.threads, args.only, args.tvm_trials, args.tuning_dir, args.skip, gap, freeze)
    report["no_spin"] = bool(args.no_spin)
    report["gap_seconds"] = gap
    report["freeze"] = freeze
    report["refuse_amx"] = bool(args.refuse_amx)
    report["avx2_only"] = bool(args.avx2_only)
    if args.note:
        report["note"] = args.note
    if not args.no_write:
        from tvm_rmsmp.runtime.fileio import atomic_write

        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        atomic_write(args.json, json.dumps(report, indent=1))
        atomic_write(args.markdown, with_hand_written(args.markdown, markdown(report, other_runs(args.json))))
        print(f"\nwrote {args.json} and {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
