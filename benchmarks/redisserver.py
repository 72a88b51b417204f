"""A redis-server of the benchmark's own, on a free port, for the cache scenarios.

Never the machine's Redis on 6379: a run must not read or leave state there. Killed and restarted
on the same port by the outage scenario.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.servers import free_port

START_TIMEOUT_S = 10.0


class RedisServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="mlserve-bench-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir)]
        with (self.workdir / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.command(b"PING") != b"+PONG":
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {(self.workdir / 'redis.log').read_text()[-500:]}")
            time.sleep(0.02)

    def command(self, line: bytes) -> bytes | None:
        """One inline command's first reply line, or None when Redis does not answer."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                sock.sendall(line + b"\r\n")
                return sock.recv(64).split(b"\r\n")[0]
        except OSError:
            return None

    def flush(self) -> None:
        self.command(b"FLUSHALL")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)
