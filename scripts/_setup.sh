#!/usr/bin/env bash
# Shared set-up for scripts/demo and scripts/test: system packages, .venv, Python packages.
# Idempotent: a second run only checks.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# Fashion-MNIST for the demo model and its tests comes from Debian (offline-installable).
FMNIST=/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
if [ ! -f "$FMNIST" ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        echo "[setup] installing dataset-fashion-mnist (apt)"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null
    else
        echo "[setup] warning: $FMNIST missing and not root; run: apt-get install dataset-fashion-mnist" >&2
    fi
fi

# PoCL: a real OpenCL implementation on the CPU, to run the mobile-GPU (OpenCL) kernels here.
if ! ls /etc/OpenCL/vendors/*.icd >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        echo "[setup] installing PoCL (apt)"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            pocl-opencl-icd ocl-icd-libopencl1) >/dev/null || echo "[setup] warning: PoCL install failed; OpenCL tests will be skipped" >&2
    else
        echo "[setup] warning: no OpenCL ICD; install pocl-opencl-icd to run the OpenCL tests" >&2
    fi
fi

# AArch64 cross toolchain: exports for ARM boards and phones' host code (about 10 s to install).
if ! command -v aarch64-linux-gnu-g++ >/dev/null; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        echo "[setup] installing g++-aarch64-linux-gnu (apt)"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            g++-aarch64-linux-gnu) >/dev/null || echo "[setup] warning: no AArch64 cross compiler; cross-export tests will be skipped" >&2
    else
        echo "[setup] warning: no aarch64-linux-gnu-g++ and not root; run: apt-get install g++-aarch64-linux-gnu" >&2
    fi
fi

# qemu-user: runs the cross-exported AArch64 libraries here (tests/test_cross.py, with the
# AArch64 TVM runtime from the pinned wheels; tests/aarch64_qemu.py).
if ! command -v qemu-aarch64 >/dev/null; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        echo "[setup] installing qemu-user (apt)"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            qemu-user) >/dev/null || echo "[setup] warning: qemu-user install failed; the AArch64 run test will be skipped" >&2
    else
        echo "[setup] warning: no qemu-aarch64; install qemu-user to run the AArch64 libraries in the tests" >&2
    fi
fi

# Yosys and Verilator: synthesis (bench/fpga_synth.py) and RTL simulation (tests/test_fpga_rtl.py)
# of the FPGA accelerator's compute units in tvm_rmsmp/fpga/rtl/.
if ! command -v yosys >/dev/null || ! command -v verilator >/dev/null; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        echo "[setup] installing yosys and verilator (apt)"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            yosys verilator) >/dev/null || echo "[setup] warning: yosys/verilator install failed; the FPGA RTL tests will be skipped" >&2
    else
        echo "[setup] warning: no yosys/verilator and not root; run: apt-get install yosys verilator" >&2
    fi
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv"
    "$PY" -m venv .venv
fi
VPY="$ROOT/.venv/bin/python"
STAMP=.venv/.rmsmp-installed
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
    echo "[setup] installing Python packages into .venv"
    "$VPY" -m pip install -q --upgrade pip wheel
    # torch first, pinned, the CPU build: on Linux, PyPI's torch (pinned or not) is a multi-GB
    # CUDA build; the CPU wheels come from PyTorch's own index (or a local wheel of 2.13.0+cpu).
    if ! "$VPY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
        "$VPY" -m pip install -q "torch==2.13.0+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
    fi
    # the extras: test (tune, models, report, opencl, pytest) and bench (its contenders)
    "$VPY" -m pip install -q -e ".[test,bench]"
    touch "$STAMP"
fi
export PATH="$ROOT/.venv/bin:$PATH"

# The AArch64 TVM runtime (from the pinned packages' aarch64 wheels) and the VM runner the
# AArch64 test runs under qemu, built once into ~/.cache/tvm-rmsmp (the test would do it too).
if command -v qemu-aarch64 >/dev/null && command -v aarch64-linux-gnu-g++ >/dev/null; then
    "$VPY" tests/aarch64_qemu.py >/dev/null || echo "[setup] warning: AArch64 runner not prepared; the AArch64 run test will retry or skip" >&2
fi
