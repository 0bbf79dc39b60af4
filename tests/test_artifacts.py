"""Exported libraries and their sidecars, the host target, and what load() refuses.

Every test uses tiny quantized MLPs (a second or two to compile) and a private library cache
under the test's temporary directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import tvm
from torch import nn
from tvm.target.codegen import llvm_get_system_cpu, target_has_features

import tvm_rmsmp as rmsmp
from tvm_rmsmp.compiler.targets import resolve_target
from tvm_rmsmp.runtime import fileio, host
from tvm_rmsmp.runtime.library import CompiledModel, _digest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CROSS = shutil.which("aarch64-linux-gnu-g++")

#: /proc/cpuinfo flag -> LLVM feature name
CPUINFO_TO_LLVM = {
    "avx2": "avx2", "fma": "fma", "bmi2": "bmi2", "avx512f": "avx512f", "avx512bw": "avx512bw",
    "avx512vl": "avx512vl", "avx512_vnni": "avx512vnni", "avx512vbmi": "avx512vbmi", "avx_vnni": "avxvnni",
    "avx512_fp16": "avx512fp16", "avx512_bf16": "avx512bf16", "amx_tile": "amx-tile", "amx_int8": "amx-int8",
    "amx_bf16": "amx-bf16",
}


def _cpuinfo_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TVM_RMSMP_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


X = torch.randn(2, 16, generator=torch.Generator().manual_seed(7))


def _tiny(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    return rmsmp.quantize(model, rmsmp.RMSMPConfig(), [torch.randn(8, 16) for _ in range(2)])


@pytest.fixture(scope="module")
def models():
    """Two quantized MLPs of the same shapes whose outputs differ, compiled for the host."""
    qa, qb = _tiny(0), _tiny(1)
    a, b = rmsmp.compile(qa, (X,)), rmsmp.compile(qb, (X,))
    assert not np.array_equal(a(X), b(X))
    return a, b


# --- the host target -------------------------------------------------------------------------


def test_host_target_has_the_hosts_features():
    t = tvm.target.Target(host.host_cpu_target())
    assert t.attrs["mcpu"] == str(llvm_get_system_cpu())
    feats = host.host_cpu_features()
    if not feats:
        pytest.skip("LLVM cannot query this host's features")
    have = set(tvm.target.codegen.llvm_get_cpu_features(t))
    # the target's ISA features are exactly LLVM's host query
    assert {f for f, on in feats.items() if on} == {f for f in have if f in feats}
    flags = _cpuinfo_flags()
    if flags is None or host.triple_arch(host.host_triple()) != "x86_64":
        pytest.skip("no x86 /proc/cpuinfo to compare with")
    for flag, name in CPUINFO_TO_LLVM.items():
        assert target_has_features(name, t) == (flag in flags), (flag, name)
    # the named targets use it
    mattr = [str(m) for m in t.attrs.get("mattr", [])]
    assert [str(m) for m in resolve_target("llvm").attrs.get("mattr", [])] == mattr
    assert resolve_target("cuda").host.attrs["mcpu"] == t.attrs["mcpu"]


def test_missing_features_of_an_avx512_build_on_an_avx2_host():
    """A znver4 (AVX-512) build on a host with znver3's features (AVX2 only) lacks AVX-512;
    tuning flags and OS-level features are never reported missing."""
    feats = host.host_cpu_features()
    if "avx512f" not in feats:
        pytest.skip("LLVM's host query has no x86 features here")
    zen3 = set(tvm.target.codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": "znver3"})))
    avx2_host = {f: f in zen3 for f in feats}
    zen4 = host.target_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": "znver4"}))
    missing = host.missing_host_features(zen4, avx2_host)
    assert {"avx512f", "avx512vnni", "avx512bw"} <= set(missing)
    assert "avx2" not in missing and not [f for f in missing if f.startswith(("fast-", "prefer-"))]
    assert host.missing_host_features(zen3, avx2_host) == []


def test_unknown_cpu_is_a_clear_error(models):
    with pytest.raises(ValueError, match="unknown CPU 'foo'"):
        resolve_target({"kind": "llvm", "mcpu": "foo"})
    with pytest.raises(ValueError, match="unknown CPU 'bar' \\(the host of the cuda target\\)"):
        resolve_target({"kind": "cuda", "host": {"kind": "llvm", "mcpu": "bar"}})
    with pytest.raises(ValueError, match="did you mean 'skylake-avx512'"):
        resolve_target({"kind": "llvm", "mcpu": "skylake-avx51"})
    assert resolve_target({"kind": "llvm", "mcpu": "znver3"}).attrs["mcpu"] == "znver3"
    assert resolve_target("aarch64").attrs["mcpu"] == "cortex-a76"  # valid for its own triple


def test_cuda_model_without_a_device_says_so():
    if tvm.cuda(0).exist:
        pytest.skip("this machine has a CUDA device")
    model = CompiledModel(None, resolve_target("cuda"), [{"shape": [2, 16], "dtype": "float32"}])
    for call in (lambda: model(X), lambda: model.benchmark(X)):
        with pytest.raises(RuntimeError, match="no CUDA device on this machine.*export_library"):
            call()
    with pytest.raises(ValueError, match="shape"):  # input errors still come first
        model(torch.randn(3, 16))


# --- export ----------------------------------------------------------------------------------


def test_export_writes_library_then_sidecar_with_the_umasks_permissions(models, tmp_path, monkeypatch):
    a, _ = models
    replaced = []
    real_replace = os.replace

    def recording(src, dst):
        replaced.append(os.fspath(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", recording)
    old = os.umask(0o022)
    try:
        path = a.export_library(str(tmp_path / "out" / "model.so"))
        os.umask(0o027)
        path2 = a.export_library(str(tmp_path / "out" / "model2.so"))
    finally:
        os.umask(old)
    assert replaced == [path, path + ".json", path2, path2 + ".json"]
    assert [oct(os.stat(p).st_mode & 0o777) for p in (path, path + ".json")] == ["0o644"] * 2
    assert [oct(os.stat(p).st_mode & 0o777) for p in (path2, path2 + ".json")] == ["0o640"] * 2
    assert sorted(os.listdir(tmp_path / "out")) == ["model.so", "model.so.json", "model2.so", "model2.so.json"]

    meta = json.loads(open(path + ".json").read())
    assert meta["format"] == "tvm-rmsmp" and meta["version"] == 2
    assert meta["inputs"] == [{"shape": [2, 16], "dtype": "float32", "name": "input"}]  # Sequential.forward(input)
    assert (meta["size"], meta["sha256"]) == _digest(path)
    assert tvm.target.Target(meta["target"]).attrs["mcpu"] == a.target.attrs["mcpu"]
    assert meta["target"] == json.loads(str(a.target))
    assert meta["arch"] == host.triple_arch(host.host_triple()) and meta["triple"] == host.host_triple()
    assert meta["cpu_features"] == host.target_cpu_features(a.target)
    for f, on in host.host_cpu_features().items():  # the library's features are the host's
        assert (f in meta["cpu_features"]) == on, f


def test_failed_export_leaves_nothing_behind(models, tmp_path, monkeypatch):
    a, _ = models
    (tmp_path / "model.so").mkdir()
    with pytest.raises(IsADirectoryError, match="model.so"):
        a.export_library(str(tmp_path / "model.so"))
    assert os.listdir(tmp_path) == ["model.so"] and os.listdir(tmp_path / "model.so") == []

    (tmp_path / "other.so.json").mkdir()
    with pytest.raises(IsADirectoryError, match="other.so.json"):
        a.export_library(str(tmp_path / "other.so"))
    assert sorted(os.listdir(tmp_path)) == ["model.so", "other.so.json"]

    # the sidecar cannot be put in place after the library is: the library is taken back
    real_replace = os.replace

    def failing(src, dst):
        if os.fspath(dst).endswith(".json"):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", failing)
    with pytest.raises(OSError, match="disk full"):
        a.export_library(str(tmp_path / "third.so"))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["model.so", "other.so.json"]


# --- load refuses what it cannot trust ---------------------------------------------------------


def test_sidecar_errors_name_the_file(models, tmp_path):
    a, _ = models
    path = a.export_library(str(tmp_path / "m.so"))
    good = json.loads(open(path + ".json").read())
    cases = [
        ("{not json", "m.so.json' is corrupt: not JSON"),
        (json.dumps([good]), "m.so.json' is corrupt: expected a JSON object, got a list"),
        (json.dumps({**good, "format": "onnx"}), "m.so.json' is not a tvm-rmsmp sidecar"),
        (json.dumps({**good, "version": 1, "target": str(a.target)}), "m.so.json' has sidecar version 1"),
        (json.dumps({**good, "target": "llvm"}), "m.so.json' is corrupt: invalid 'target'"),
        (json.dumps({**good, "inputs": [{"shape": "2x16"}]}), "m.so.json' is corrupt: invalid 'inputs'"),
        (json.dumps({**good, "sha256": "abc"}), "m.so.json' is corrupt: invalid 'sha256'"),
        (json.dumps({**good, "target": {"kind": "no-such-kind"}}), "m.so.json' is corrupt: its target"),
    ]
    for key in ("target", "inputs", "sha256"):
        cases.append((json.dumps({k: v for k, v in good.items() if k != key}), f"m.so.json' is corrupt: missing '{key}'"))
    for text, message in cases:
        with open(path + ".json", "w") as f:
            f.write(text)
        with pytest.raises(ValueError, match=message.replace("(", "\\(")):
            rmsmp.load(path)
    os.unlink(path + ".json")
    with pytest.raises(FileNotFoundError, match="m.so.json' is missing"):
        rmsmp.load(path)
    with pytest.raises(FileNotFoundError, match="no compiled library"):
        rmsmp.load(str(tmp_path / "nothing.so"))


def test_sidecar_of_another_library_is_refused(models, tmp_path, private_cache):
    a, b = models
    pa = a.export_library(str(tmp_path / "a.so"))
    pb = b.export_library(str(tmp_path / "b.so"))
    shutil.copy(pb + ".json", pa + ".json")
    with pytest.raises(ValueError, match="a.so' does not match its sidecar .*belongs to another library"):
        rmsmp.load(pa)
    # one flipped byte, same size
    data = bytearray(open(pb, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(pb, "wb").write(bytes(data))
    with pytest.raises(ValueError, match="b.so' does not match its sidecar"):
        rmsmp.load(pb)
    assert not os.listdir(private_cache)  # nothing unverified was kept


def test_truncated_library_is_refused_without_a_crash(models, tmp_path):
    a, _ = models
    path = a.export_library(str(tmp_path / "m.so"))
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    code = (
        "import sys, tvm_rmsmp as rmsmp\n"
        "try:\n    rmsmp.load(sys.argv[1])\n"
        "except ValueError as err:\n    print('REFUSED', err); sys.exit(3)\n"
        "print('LOADED')\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=env)
    assert proc.returncode == 3, (proc.returncode, proc.stdout, proc.stderr[-2000:])  # not -7 (SIGBUS)
    assert f"is {size // 2} bytes but its sidecar" in proc.stdout and "truncated" in proc.stdout


def test_library_for_cpu_features_this_host_lacks(tmp_path):
    feats = host.host_cpu_features()
    needed = ("avx10.2", "amx-fp8")
    if "avx512f" not in feats or any(feats.get(f) for f in needed):
        pytest.skip("not an x86 host without AVX10.2/AMX-FP8")
    exe = rmsmp.compile(_tiny(0), (X,), target={"kind": "llvm", "mcpu": "diamondrapids"})
    path = exe.export_library(str(tmp_path / "dmr.so"))
    with pytest.raises(ValueError, match="dmr.so' was built for a CPU \\(mcpu 'diamondrapids'\\) with features this "
                                         "machine lacks: .*amx-fp8.*avx10.2"):
        rmsmp.load(path)


def test_device_library_checks_its_host_part(models, tmp_path):
    """A cuda/opencl library's sidecar describes its host code: that is what is checked
    (the sidecar is edited here: its checksum covers the library, not itself)."""
    feats = host.host_cpu_features()
    if "avx512f" not in feats or feats.get("avx10.2"):
        pytest.skip("not an x86 host without AVX10.2")
    a, _ = models
    path = a.export_library(str(tmp_path / "gpu.so"))
    meta = json.loads(open(path + ".json").read())
    dmr = {"kind": "llvm", "mcpu": "diamondrapids"}
    meta["target"] = {"kind": "cuda", "host": dmr}
    meta["cpu_features"] = host.target_cpu_features(tvm.target.Target(dmr))
    with open(path + ".json", "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match="gpu.so' \\(the host code of a cuda library\\) was built for a CPU "
                                         "\\(mcpu 'diamondrapids'\\) with features this machine lacks: .*avx10.2"):
        rmsmp.load(path)
    meta.update(arch="riscv64", triple="riscv64-unknown-linux-gnu")
    with open(path + ".json", "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match="\\(the host code of a cuda library\\) was built for riscv64"):
        rmsmp.load(path)


@pytest.mark.skipif(CROSS is None, reason="apt-get install g++-aarch64-linux-gnu")
def test_library_for_another_architecture(tmp_path):
    if host.triple_arch(host.host_triple()) == "aarch64":
        pytest.skip("the host is aarch64")
    exe = rmsmp.compile(_tiny(0), (X,), target="aarch64")
    path = exe.export_library(str(tmp_path / "arm.so"), cc=CROSS)
    meta = json.loads(open(path + ".json").read())
    assert meta["arch"] == "aarch64" and meta["triple"] == "aarch64-linux-gnu" and "dotprod" in meta["cpu_features"]
    here = host.triple_arch(host.host_triple())
    with pytest.raises(ValueError, match=f"arm.so' was built for aarch64 \\(aarch64-linux-gnu\\); this machine is {here}"):
        rmsmp.load(path)


def test_reexported_path_loads_the_new_library(models, tmp_path, private_cache):
    a, b = models
    path = str(tmp_path / "m.so")
    a.export_library(path)
    sha_a = _digest(path)[1]
    la = rmsmp.load(path)
    np.testing.assert_array_equal(la(X), a(X))
    b.export_library(path)
    lb = rmsmp.load(path)
    np.testing.assert_array_equal(lb(X), b(X))
    np.testing.assert_array_equal(la(X), a(X))  # the first load still runs A
    np.testing.assert_array_equal(rmsmp.load(path)(X), b(X))  # and again: still B
    assert sorted(os.listdir(private_cache)) == sorted([sha_a + ".so", _digest(path)[1] + ".so"])
    assert oct(os.stat(private_cache).st_mode & 0o777) == "0o700"


def test_sidecar_with_a_bad_index_bound_is_refused(tmp_path):
    """An embedding input's bound in the sidecar must be a positive integer."""
    import json

    from tvm_rmsmp.runtime.library import _read_sidecar

    lib = tmp_path / "m.so"
    meta = {"format": "tvm-rmsmp", "version": 2, "size": 0, "sha256": "0" * 64, "target": {"kind": "llvm"},
            "arch": "x86_64", "triple": "x86_64-linux-gnu", "cpu_features": [],
            "inputs": [{"shape": [1, 4], "dtype": "int64", "index_bound": "ten"}]}
    (tmp_path / "m.so.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"m.so.json.* is corrupt: invalid 'inputs'"):
        _read_sidecar(str(lib))
    meta["inputs"][0]["index_bound"] = 10
    (tmp_path / "m.so.json").write_text(json.dumps(meta))
    assert _read_sidecar(str(lib))["inputs"][0]["index_bound"] == 10
