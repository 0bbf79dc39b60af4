"""``python -m bench.cpu`` end to end on one small workload, TVM fp32 tuned included."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_cpu_bench_runs_every_contender(tmp_path, capsys):
    """Every contender that applies is timed in the same run, tvm-rmsmp bit-exact; TVM fp32
    tuned searches once (2 trials per task) and a later build reuses its records; the JSON and
    the Markdown are written where asked, with the speedup table. ``--only`` with a full name
    runs that workload alone (its name is also the start of the batch-128 one's)."""
    out, md, tuning = tmp_path / "cpu.json", tmp_path / "performance.md", tmp_path / "tuning"
    cmd = [sys.executable, "-m", "bench.cpu", "--quick", "--threads", "1", "--only", "dense 768x768, batch 1",
           "--tvm-trials", "2", "--tuning-dir", str(tuning), "--json", str(out), "--markdown", str(md)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "TVM fp32 tuned: " in proc.stdout  # it tuned
    report = json.loads(out.read_text())
    (row,) = report["results"]
    assert row["rmsmp"]["bit_exact"] and report["tvm_fp32_trials_per_task"] == 2
    for who in ("torch fp32", "torch int8 dyn", "TVM fp32 untuned", "TVM fp32 tuned", "tvm-rmsmp untuned"):
        assert row["seconds"][who] > 0, who
    assert set(row["speedup"]) == set(row["seconds"]) - {"tvm-rmsmp untuned"}
    text = md.read_text()
    assert "| dense 768x768, batch 1 |" in text and "TVM fp32 tuned" in text and "vs fastest contender" in text
    done = json.loads((tuning / "dense_768x768_batch_1" / "done.json").read_text())
    assert done["trials_per_task"] == 2
    # a later build with the same budget reuses the records (no search, nothing printed)
    import torch

    from bench.cpu import dense_model, tvm_fp32_tuned
    from tvm_rmsmp.compiler.targets import resolve_target

    capsys.readouterr()
    run = tvm_fp32_tuned(dense_model(768, 768).eval(), torch.randn(1, 1, 768), resolve_target("llvm"),
                         str(tuning / "dense_768x768_batch_1"), 2)
    assert "TVM fp32 tuned: " not in capsys.readouterr().out
    run()


def test_freeze_runs_only_the_contender_being_timed():
    """With ``freeze`` every contender's process is stopped except while its own sample is
    taken (its spinning pool cannot take a core from another's sample), and all run again
    afterwards; without it nothing is paused."""
    from bench.cpu import sample_round_robin

    log = []

    class Fake:
        def __init__(self, name):
            self.name, self.running, self.cpuid_traps = name, True, 0

        def pause(self):
            self.running = False
            log.append(("pause", self.name))

        def resume(self):
            self.running = True
            log.append(("resume", self.name))

        def ask(self, what, n):
            assert what == "time"
            log.append(("time", self.name, tuple(sorted(c.name for c in live.values() if c.running))))
            return (1e-3 * n, 1)  # seconds, CPUIDs the --avx2-only mask answered meanwhile

    live = {"a": Fake("a"), "b": Fake("b"), "c": Fake("c")}
    result = sample_round_robin(live, repeat=3, min_time=0.002, gap=0.0, freeze=True)
    assert result == {"a": 1e-3, "b": 1e-3, "c": 1e-3}
    timed = [e for e in log if e[0] == "time"]
    assert len(timed) == 3 * (2 + 3)  # two probes and three samples each
    assert all(e[2] == (e[1],) for e in timed)  # only the one being timed runs
    assert all(c.running for c in live.values())
    assert all(c.cpuid_traps == 2 + 3 for c in live.values())  # counted over every call timed
    log.clear()
    sample_round_robin(live, repeat=2, min_time=0.002, gap=0.0, freeze=False)
    assert not [e for e in log if e[0] != "time"] and all(e[2] == ("a", "b", "c") for e in log)


def test_refused_amx_runs_are_rendered_as_the_vnni_path_proxy():
    """Runs made with ``--refuse-amx`` (``cpu-<name>-<t>t.json`` with ``refuse_amx``) get their own
    section, named as the VNNI path on the AMX Xeon, never as a VNNI-only host; AMX runs keep theirs."""
    from bench.cpu import RMSMP, other_runs_markdown, threads_markdown

    def run(threads, refused, ms):
        return {"hardware": {"cpu": "Intel(R) Xeon(R) Processor", "llvm_mcpu": "rocketlake", "cores": 2,
                             "threads": threads, "x86_kernel_isa": "avx512vnni", "x86_amx": not refused},
                "date_utc": "2026-12-06 10:50", "command": "python -m bench.cpu", "refuse_amx": refused,
                "results": [{"workload": "FFN 768-3072-768, batch 128", "seconds": {RMSMP: ms, "ORT int8 dyn": 2 * ms},
                             "speedup": {"ORT int8 dyn": 2.0}, "rmsmp": {"isa_path": "amx" if not refused else "vnni"}}]}

    others = {"cpu-xeon-amx-1t.json": run(1, False, 1e-3), "cpu-xeon-amx-2t.json": run(2, False, 5e-4),
              "cpu-xeon-vnni-1t.json": run(1, True, 2e-3), "cpu-xeon-vnni-2t.json": run(2, True, 1e-3)}
    text = "\n".join(threads_markdown(others))
    titles = [line for line in text.splitlines() if line.startswith("## ")]
    assert len(titles) == 2
    assert titles[1].startswith("## VNNI path (AMX refused by the OS) on the AMX Xeon")
    assert "AMX refused" not in titles[0] and "VNNI-only host" not in "".join(titles)
    assert "| FFN 768-3072-768, batch 128 | vnni | 2.000 (2.00x ORT int8 dyn) | 1.000 (2.00x ORT int8 dyn) | 2.00x |" in text
    head = next(line for line in other_runs_markdown(others["cpu-xeon-amx-1t.json"], others) if line.startswith("| workload"))
    assert head.count("AMX refused by the OS") == 2


def test_avx2_only_runs_are_rendered_as_the_avx2_path_proxy():
    """Runs made with ``--avx2-only`` get their own section, named as the AVX2 path on the AMX
    Xeon (never as an AVX2 host), with the notes on how CPUID was masked, and their goals
    paragraph names what the issue asks of an AVX2 host."""
    from bench.cpu import AVX2_ONLY_NOTES, RMSMP, other_runs_markdown, threads_markdown

    def run(threads, ms):
        return {"hardware": {"cpu": "Intel(R) Xeon(R) Processor", "llvm_mcpu": "rocketlake", "cores": 2,
                             "threads": threads, "x86_kernel_isa": "avx2", "x86_amx": False},
                "date_utc": "2026-12-06 12:30", "command": "python -m bench.cpu --avx2-only", "avx2_only": True,
                "results": [{"workload": "dense 768x768, batch 128", "seconds": {RMSMP: ms, "ORT int8 dyn": 1.5 * ms},
                             "speedup": {"ORT int8 dyn": 1.5}, "rmsmp": {"isa_path": "avx2"}}]}

    others = {"cpu-xeon-avx2-1t.json": run(1, 2e-3), "cpu-xeon-avx2-2t.json": run(2, 1e-3)}
    text = "\n".join(threads_markdown(others))
    titles = [line for line in text.splitlines() if line.startswith("## ")]
    assert titles == ["## AVX2 path (AVX-512, AVX-VNNI and AMX hidden from CPUID) on the AMX Xeon "
                      "(Intel(R) Xeon(R) Processor, LLVM `rocketlake`, 2 cores): 1 and 2 threads"]
    assert AVX2_ONLY_NOTES[0] in text and "Of an AVX2 host the issue asks the batch-128 rows" in text
    assert "| dense 768x768 batch 128 >= 1.0x | 2.000 vs ORT int8 dyn 3.000: 1.50x, met | 1.000 vs ORT int8 dyn" in text
    head = next(line for line in other_runs_markdown(others["cpu-xeon-avx2-1t.json"], others)
                if line.startswith("| workload"))
    assert head.count("AVX-512/VNNI/AMX hidden from CPUID") == 3
