"""A fork-based supervisor: --workers processes serving one listening socket, each replaced when it
dies and all dying with the supervisor, even when it is killed."""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import time

from pipeline.errors import PipelineError

log = logging.getLogger("captcha-crnn.serve")


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies, even by SIGKILL."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the supervisor's SIGTERM still stops the workers
    if os.getppid() != parent:
        os._exit(0)


def supervise(workers: int, start_worker, quick_failure_s: float = 10.0, down=None, max_backoff_s: float = 30.0) -> None:
    """Fork `workers` processes running start_worker(); replace any that exits, stop them all on
    SIGTERM/SIGINT, pass SIGHUP on to them (each reloads its model). A worker that fails at start-up
    (exit 2, a config error it has printed) stops all, unless the service has been up: then the
    others keep serving the model they loaded, and the replacement is retried with a growing pause
    (the model file may be half-written by `dvc repro`). `down` (a shared integer) counts the
    workers missing, for /healthz."""
    children: dict[int, float] = {}
    stopping = False
    service_up = False  # some worker has outlived quick_failure_s
    failures_in_a_row = 0

    def signal_children(signum: int) -> None:
        for pid in list(children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def stop(*_):
        nonlocal stopping
        stopping = True
        signal_children(signal.SIGTERM)

    def reload(*_):  # each worker reloads its model on SIGHUP
        signal_children(signal.SIGHUP)

    def spawn():
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the worker's own handler: loading reads the new file
            die_with_parent()
            code = 1
            try:
                start_worker()
                code = 0
            except PipelineError as e:
                print(f"error: {e}", file=sys.stderr)
                code = 2
            finally:
                sys.stderr.flush()
                os._exit(code)
        children[pid] = time.monotonic()

    def set_down():
        if down is not None:
            down.value = workers - len(children)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    for _ in range(workers):
        spawn()
    failed_at_start = False
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        started = children.pop(pid, None)
        if started is None or stopping:
            continue
        set_down()
        lived = time.monotonic() - started
        service_up = service_up or lived >= quick_failure_s or any(
            time.monotonic() - t >= quick_failure_s for t in children.values())
        code = os.waitstatus_to_exitcode(status)
        if code == 2 and lived < quick_failure_s and not service_up:
            failed_at_start = True
            stop()
            continue
        failures_in_a_row = failures_in_a_row + 1 if code == 2 and lived < quick_failure_s else 0
        pause = min(max_backoff_s, 0.5 * 2 ** failures_in_a_row)  # a worker that keeps crashing must not spin
        log.warning("worker %d exited (%s); %d of %d serving; starting another in %.1f s",
                    pid, code, len(children), workers, pause)
        time.sleep(pause)
        if not stopping:
            spawn()
            set_down()
    if failed_at_start:
        sys.exit(2)


def default_workers() -> int:
    """One process per core (measured fastest on 2 cores: docs/benchmarks.md, "Serving"), at most 8."""
    return max(1, min(8, os.cpu_count() or 1))
