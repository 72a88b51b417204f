"""A scale-out cluster on one machine: Redis, N mlserve replicas and HAProxy in front, on loopback.

``make cluster`` runs ``python deploy/cluster/cluster.py up`` and ``make cluster-stop`` runs ``down``.
The tests start the same cluster on free ports through ``LoopbackCluster``, so what users try is what
the tests prove.

The replicas share state and the prediction cache through the cluster's own Redis. HAProxy spreads
requests round-robin and asks each replica's ``/health/ready`` every ``CHECK_INTERVAL_MS``; a replica
that answers 503 (loading, or draining after SIGTERM) leaves the rotation at the first failed check.
A request that finds a replica's connection refused or closed without an answer is retried on
another (``retry-on conn-failure empty-response``), so a rolling restart loses nothing: each replica
keeps accepting for ``DRAIN_DELAY_S`` after SIGTERM, long enough for HAProxy to stop sending to it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

CHECK_INTERVAL_MS = 200
DRAIN_DELAY_S = 1.0
"""Five health-check intervals: HAProxy sees the 503 and stops routing before the listener closes."""
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0

HAPROXY_CONFIG = """\
global
    maxconn 4096

defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response

frontend mlserve
    bind 127.0.0.1:{port}
    default_backend replicas

backend replicas
    balance roundrobin
    option httpchk GET /health/ready
    http-check expect status 200
    default-server inter {interval}ms fastinter {interval}ms downinter {interval}ms fall 1 rise 2
{servers}
"""


@dataclass
class LoopbackCluster:
    """The pieces' ports, processes and files; ``state.json`` in ``run_dir`` lets ``down`` find them."""

    run_dir: Path
    models_dir: Path
    port: int = 8090
    replica_ports: list[int] = field(default_factory=lambda: [8091, 8092, 8093])
    redis_port: int = 6391
    workers: int = 1
    env: dict[str, str] = field(default_factory=dict)
    """Extra settings for every replica (``MLSERVE_*``)."""
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def replica_url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.replica_ports[index]}"

    def up(self) -> None:
        """Start Redis, the replicas and HAProxy; return once HAProxy answers ready."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.start_redis()
            for index in range(len(self.replica_ports)):
                self.start_replica(index)
            for index in range(len(self.replica_ports)):
                _wait_ready(self.replica_url(index), self.pids[f"replica{index}"])
            config = self.run_dir / "haproxy.cfg"
            config.write_text(HAPROXY_CONFIG.format(
                port=self.port, interval=CHECK_INTERVAL_MS,
                servers="\n".join(f"    server replica{i} 127.0.0.1:{p} check" for i, p in enumerate(self.replica_ports)),
            ))
            self._start("haproxy", [_binary("haproxy"), "-db", "-f", str(config)])
            _wait_ready(self.url, self.pids["haproxy"])
        except BaseException:
            self.down()
            raise
        finally:
            (self.run_dir / "state.json").write_text(json.dumps(asdict(self), default=str))

    def start_replica(self, index: int) -> None:
        env = {
            "MLSERVE_REDIS_URL": self.redis_url,
            "MLSERVE_CACHE__ENABLED": "true",
            "MLSERVE_DRAIN_DELAY_S": str(DRAIN_DELAY_S),
            **self.env,
        }
        self._start(f"replica{index}", [
            sys.executable, "-m", "mlserve", "serve", "--models-dir", str(self.models_dir),
            "--port", str(self.replica_ports[index]), "--workers", str(self.workers),
        ], env)

    def restart_replica(self, index: int) -> None:
        """SIGTERM one replica, wait until it has drained and exited, start it again, wait until ready."""
        name = f"replica{index}"
        _stop(self.pids.pop(name))
        self.start_replica(index)
        _wait_ready(self.replica_url(index), self.pids[name])

    def start_redis(self) -> None:
        self._start("redis", [_binary("redis-server"), "--port", str(self.redis_port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no", "--dir", str(self.run_dir)])

    def stop_redis(self) -> None:
        _stop(self.pids.pop("redis"))

    def down(self) -> None:
        """HAProxy first (no new requests), then the replicas together (each drains), then Redis."""
        for group in (["haproxy"], [n for n in self.pids if n.startswith("replica")], ["redis"]):
            _stop(*(self.pids.pop(name) for name in group if name in self.pids))

    def _start(self, name: str, command: list[str], env: dict[str, str] | None = None) -> None:
        with (self.run_dir / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})}, start_new_session=True,
            )
        self.pids[name] = process.pid


def _binary(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        raise SystemExit(f"{name} is not installed (Debian: apt-get install {name})")
    return path


def _alive(pid: int) -> bool:
    try:
        finished, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child (``down`` from another process): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return finished == 0


def _wait_ready(url: str, pid: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not _alive(pid):
            raise RuntimeError(f"{url}: the process exited before it was ready (see its log)")
        try:
            with urllib.request.urlopen(f"{url}/health/ready", timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} was not ready within {START_TIMEOUT_S:.0f}s")


def _stop(*pids: int) -> None:
    """SIGTERM, wait for the exits (a replica drains first), SIGKILL past ``STOP_TIMEOUT_S``."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while running := [pid for pid in pids if _alive(pid)]:
        if time.monotonic() > deadline:
            for pid in running:
                os.killpg(pid, signal.SIGKILL)
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("up", "down"))
    parser.add_argument("--run-dir", default=".cluster", help="pids, logs and the HAProxy config (default .cluster)")
    parser.add_argument("--models-dir", default="models")
    parser.add_argument("--port", type=int, default=int(os.environ.get("CLUSTER_PORT", "8090")),
                        help="HAProxy's port; the replicas take the next three (default 8090, or CLUSTER_PORT)")
    parser.add_argument("--redis-port", type=int, default=int(os.environ.get("CLUSTER_REDIS_PORT", "6391")))
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    if args.command == "down":
        state = run_dir / "state.json"
        if not state.exists():
            raise SystemExit(f"no cluster is running from {run_dir}")
        saved = json.loads(state.read_text())
        cluster = LoopbackCluster(run_dir, Path(saved["models_dir"]), pids=saved["pids"])
        cluster.down()
        state.unlink()
        print("cluster stopped")
        return
    cluster = LoopbackCluster(
        run_dir, Path(args.models_dir), port=args.port,
        replica_ports=[args.port + 1, args.port + 2, args.port + 3], redis_port=args.redis_port,
    )
    cluster.up()
    print(f"cluster up: HAProxy on {cluster.url}, replicas on "
          f"{', '.join(str(p) for p in cluster.replica_ports)}, Redis on {cluster.redis_port}; "
          f"logs in {run_dir}/; stop with `make cluster-stop`")


if __name__ == "__main__":
    main()
