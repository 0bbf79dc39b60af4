"""A TVM RPC tracker and servers on this machine (127.0.0.1), for trying distributed tuning.

    with LoopbackRPC(servers=2, key="cpu") as rpc:
        runner = rpc.runner()                       # a MetaSchedule RPCRunner through the tracker
        rmsmp.tune(q, (x,), "llvm", "tuning/", trials=32, runner=runner)

On real hardware the tracker runs on a workstation (``python -m tvm.exec.rpc_tracker``) and
each board runs ``python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY``; the runner
is the same with that tracker's address.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import List, Optional

__all__ = ["LoopbackRPC", "free_port"]


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackRPC:
    """Starts ``python -m tvm.exec.rpc_tracker`` and ``servers`` x ``rpc_server`` subprocesses
    registered under ``key``; waits until the tracker lists them all; stops them on exit."""

    def __init__(self, servers: int = 2, key: str = "rmsmp-local", timeout: float = 60.0):
        if servers < 1:
            raise ValueError(f"servers must be >= 1, got {servers}")
        self.servers, self.key, self.timeout = servers, key, timeout
        self.host = "127.0.0.1"
        self.port: Optional[int] = None
        self.procs: List[subprocess.Popen] = []

    def _spawn(self, *args: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=dict(os.environ))
        self.procs.append(proc)
        return proc

    def __enter__(self) -> "LoopbackRPC":
        from ..quant.extras import require

        require("tune", "LoopbackRPC (a tracker and servers on this machine)")
        from tvm import rpc

        self.port = free_port()
        self._spawn("tvm.exec.rpc_tracker", "--host", self.host, "--port", str(self.port),
                    "--port-end", str(self.port + 1), "--silent")
        try:
            self._wait(lambda: rpc.connect_tracker(self.host, self.port).summary(), "the tracker to start")
            for _ in range(self.servers):
                port = free_port()
                self._spawn("tvm.exec.rpc_server", "--host", self.host, "--port", str(port),
                            "--port-end", str(port + 50), "--tracker", f"{self.host}:{self.port}",
                            "--key", self.key, "--silent")
            self._wait(lambda: self.free_servers() >= self.servers or None, f"{self.servers} servers to register")
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait(self, probe, what: str) -> None:
        deadline = time.time() + self.timeout
        last: Optional[BaseException] = None
        while time.time() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"RPC process {proc.args[2:4]} exited with code {proc.returncode}")
            try:
                if probe():
                    return
            except Exception as err:  # noqa: BLE001 - not up yet
                last = err
            time.sleep(0.3)
        raise TimeoutError(f"timed out after {self.timeout:.0f} s waiting for {what} (last error: {last})")

    def free_servers(self) -> int:
        from tvm import rpc

        info = rpc.connect_tracker(self.host, self.port).summary().get("queue_info", {}).get(self.key, {})
        return int(info.get("free", 0))

    def runner(self, max_workers: Optional[int] = None, session_timeout_sec: float = 60.0):
        """A MetaSchedule ``RPCRunner`` that measures on these servers."""
        from tvm.s_tir import meta_schedule as ms

        config = ms.runner.RPCConfig(tracker_host=self.host, tracker_port=self.port, tracker_key=self.key,
                                     session_timeout_sec=session_timeout_sec)
        return ms.runner.RPCRunner(rpc_config=config, max_workers=max_workers or self.servers)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs = []
