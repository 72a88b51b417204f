"""Several front-end processes serving as one server (``--frontends N``).

One aiohttp process parses and answers every request, so for a cheap model its event loop is the
ceiling however many cores are idle. With N front ends, a supervisor (this module, in the process
that was started) spawns N front-end processes. Each binds the same port with ``SO_REUSEPORT``, so
the kernel spreads new connections over them, and each is a whole mlserve: its own control plane,
batchers, cache L1 and worker pool, with the workers split between them (``--workers`` is the
total). They act as one server the way replicas do (DESIGN.md, "State and scale-out"): every change
goes through the shared state store (the state file, watched, or Redis), which each front end
follows; and a scrape of ``/metrics`` on any of them gathers every front end's figures over the
private Unix sockets named in ``Role`` (``mlserve.siblings``).

Workers are split rather than shared: a worker shared by several front ends would need its loads,
unloads and replacement agreed between processes, while split workers keep each front end's pool
exactly the single-process one, with the same memory (every worker holds every model either way).

The supervisor forwards SIGTERM (and SIGINT) to every front end, each of which drains as a single
server does; a front end that dies while serving is started again. One that fails before it
listens stops the whole server, since the next would fail the same way (a taken port, a bad model).
"""

from __future__ import annotations

import ctypes
import logging
import math
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import msgspec

from mlserve.settings import Settings
from mlserve.siblings import SOCKET_NAME, Role

log = logging.getLogger(__name__)

LISTENING = "listening"
"""What a front end sends its supervisor once it accepts connections."""
SHARED_MEMORY = "/dev/shm"
"""Where the run directory goes when the system has it: the shared table is then memory, never written to disk."""
KILL_AFTER_S = 15.0
"""Grace beyond ``drain_delay_s`` and ``shutdown_timeout_s`` before a front end that has not stopped is killed."""
RESTART_PAUSE_S = 1.0
"""A front end that died is started again after this, so one that dies at once does not spin."""

Serve = Callable[[Settings, Role | None, Callable[[], None] | None], None]
"""Runs one front end until it is told to stop: ``app.run``. The third argument is called once it
listens."""


def worker_share(total: int, count: int, index: int) -> int:
    """Front end ``index``'s part of ``total`` workers: an even split, at least one each."""
    return max(1, total // count + (index < total % count))


RUN_DIR_PREFIX = "mlserve-frontends-{}-"
"""The run directory's name starts with this, and the supervisor's pid."""


def _make_run_dir() -> str:
    """A new run directory, in shared memory where the system has it, after removing those that
    supervisors killed outright (SIGKILL runs no cleanup) left behind: each holds the cache's table,
    which would otherwise keep its memory until the next reboot."""
    parent = SHARED_MEMORY if os.path.isdir(SHARED_MEMORY) and os.access(SHARED_MEMORY, os.W_OK) else None
    for left in Path(parent or tempfile.gettempdir()).glob(RUN_DIR_PREFIX.format("*") + "*"):
        pid = left.name.split("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(left, ignore_errors=True)
            log.info("removed %s, left by a supervisor that is gone", left)
    return tempfile.mkdtemp(prefix=RUN_DIR_PREFIX.format(os.getpid()), dir=parent)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    return True


def supervise(settings: Settings, serve: Serve) -> int:
    """Run ``settings.frontend_count`` front ends until SIGTERM or SIGINT and they have drained; the
    exit status."""
    count = settings.frontend_count
    run_dir = _make_run_dir()
    context = multiprocessing.get_context("spawn")
    processes: dict[int, Any] = {}
    links: dict[Connection, int] = {}
    stopping = False
    deadline = math.inf
    """When front ends still running after a stop are killed."""

    def start(index: int) -> None:
        role = Role(index, count, run_dir)
        share = msgspec.structs.replace(settings, workers=worker_share(settings.worker_count, count, index))
        ours, theirs = context.Pipe(duplex=False)
        process = context.Process(target=_frontend, args=(serve, share, role, theirs), name=f"frontend-{index}")
        process.start()
        theirs.close()
        processes[index] = process
        links[ours] = index

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping, deadline
        if not stopping:
            deadline = time.monotonic() + settings.drain_delay_s + settings.shutdown_timeout_s + KILL_AFTER_S
        stopping = True
        for process in processes.values():
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM if signum == signal.SIGINT else signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for index in range(count):
        start(index)
    listening: set[int] = set()
    status = 0
    try:
        while processes:
            sentinels = {process.sentinel: index for index, process in processes.items()}
            awake = wait([*links, *sentinels], None if deadline == math.inf else max(0.0, deadline - time.monotonic()))
            if not awake:
                log.error("front ends %s did not stop in time; killing them", sorted(processes))
                for process in processes.values():
                    process.kill()
                deadline = math.inf
            for ready in awake:
                if isinstance(ready, Connection):
                    index = links.pop(ready)
                    try:
                        ready.recv()
                        listening.add(index)
                        if len(listening) == count:
                            log.info("%d front ends listen on http://%s:%d (and each on %s)", count, settings.host,
                                     settings.port, Path(run_dir) / SOCKET_NAME.format("<n>"))
                    except EOFError:
                        pass  # it died before listening: its sentinel says so
                    ready.close()
                    continue
                index = sentinels[ready]
                process = processes.pop(index)
                process.join()
                if stopping:
                    status = status or (1 if process.exitcode else 0)
                elif index not in listening:
                    log.error("front end %d failed to start (exit %s); stopping", index, process.exitcode)
                    status = 2
                    stop(signal.SIGTERM, None)
                else:
                    log.error("front end %d exited (%s); starting it again", index, process.exitcode)
                    listening.discard(index)
                    time.sleep(RESTART_PAUSE_S)
                    start(index)
    finally:
        for link in links:
            link.close()
        for path in Path(run_dir).glob("*"):
            path.unlink(missing_ok=True)
        os.rmdir(run_dir)
    return status


PR_SET_PDEATHSIG = 1
"""Linux's ``prctl`` option: the signal a process gets when its parent dies."""


def _stop_with_supervisor() -> None:
    """Have Linux send this front end SIGTERM when its supervisor dies, so a supervisor killed outright
    (SIGKILL runs no handler) leaves no front end holding the port: each drains and stops. Elsewhere
    nothing is done."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    if prctl(PR_SET_PDEATHSIG, signal.SIGTERM) == 0:
        supervisor = multiprocessing.parent_process()
        if supervisor is not None and not supervisor.is_alive():  # it died before the prctl
            os.kill(os.getpid(), signal.SIGTERM)


def _frontend(serve: Serve, settings: Settings, role: Role, link: Connection) -> None:
    """A front end's process: the supervisor's logging, then the server. It ignores SIGINT, which a
    terminal's Ctrl-C sends the whole process group: the supervisor passes it on, once, as SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _stop_with_supervisor()
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s [frontend {role.index}] %(name)s: %(message)s",
    )
    try:
        serve(settings, role, lambda: (link.send(LISTENING), link.close()))
    finally:
        # The pool has stopped its workers by now; any left (they ignore SIGTERM) would keep this
        # process joining them at exit, and the supervisor waiting for it, for ever.
        for child in multiprocessing.active_children():
            child.kill()
