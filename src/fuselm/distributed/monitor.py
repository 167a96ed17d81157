"""Failure detection for a distributed engine: no rank may die or stall silently.

Every rank runs a ``Monitor`` thread that talks through the rendezvous store only (never through
the process groups, which may be the thing that hangs):

- it bumps its heartbeat counter ``hb/<rank>`` every ``period`` seconds;
- rank 0 watches the spawned worker processes (their exit is seen at once), the other ranks'
  heartbeats (stale after ``stale_after`` seconds: a dead or frozen rank on another node), and
  the errors workers report (``error/<rank>``); on the first failure it writes ``abort`` with a
  message naming the rank, and exits the process ``grace`` seconds later if the engine has not
  exited by itself (the engine fails its requests with EngineDeadError meanwhile);
- workers watch ``abort``, rank 0's heartbeat, and (when spawned) their parent, and exit
  non-zero at once, naming the cause.

A collective that stalls is bounded separately by the process groups' timeout
(``--distributed-timeout``); it raises on rank 0, which then asks ``diagnose`` for the name.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import wait as wait_sentinels
from typing import Any

import torch.distributed as dist

logger = logging.getLogger(__name__)

SETTLE_SECONDS = 0.3  # after the first evidence, wait this long for the rest before naming


def describe_exit(code: int) -> str:
    """'was killed by SIGKILL' / 'exited with code 1'."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def hard_exit(rank: int, message: str, code: int = 1) -> None:
    """Prints ``message`` naming this rank and ends the process now (no atexit, no joins)."""
    print(f"fuselm rank {rank}: {message}", file=sys.stderr, flush=True)
    os._exit(code)


class Monitor:
    """Heartbeats and failure detection of one rank (see the module docstring)."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, timeout: float,
                 procs: dict[int, Any] | None = None, parent_pid: int | None = None,
                 grace: float | None = None) -> None:
        self.store, self.rank, self.world_size = store, rank, world_size
        self.period = max(0.05, min(0.5, timeout / 20))
        self.stale_after = min(timeout, max(3.0, 6 * self.period))
        self.grace = grace if grace is not None else min(timeout, 5.0)
        self.procs = procs or {}
        self.parent_pid = parent_pid
        self.failure: str | None = None
        self.failed = threading.Event()
        self.armed = False
        self._stopping = threading.Event()
        self._seen: dict[int, tuple[int, float]] = {}
        self._first_evidence: float | None = None
        self._thread = threading.Thread(target=self._loop, name=f"fuselm-monitor-{rank}",
                                        daemon=True)
        self.on_failure: list[Any] = []  # callables run (in this thread) on rank 0's failure

    def start(self) -> None:
        """Starts the heartbeat/watch thread."""
        self._thread.start()

    def arm(self) -> None:
        """Starts judging heartbeats (once every rank has joined the process group)."""
        now = time.monotonic()
        watched = range(1, self.world_size) if self.rank == 0 else [0]
        self._seen = {r: (-1, now) for r in watched}
        self.armed = True

    def stop(self) -> None:
        """Normal shutdown: stops watching (workers exiting now is expected)."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        """True once ``stop`` was called."""
        return self._stopping.is_set()

    def report_error(self, message: str) -> None:
        """A worker's own failure, for rank 0 to name (best effort: the store may be gone)."""
        try:
            self.store.set(f"error/{self.rank}", message)
            self.store.add("num_errors", 1)
        except Exception:  # noqa: BLE001
            pass

    def explain(self, exc: BaseException) -> str:
        """A worker, after its step failed: the cause if rank 0 is gone or aborted, else the
        error itself (a lost link to a peer usually means the peer failed)."""
        error = f"{type(exc).__name__}: {exc}"
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            return f"rank 0 (pid {self.parent_pid}) is gone ({error})"
        try:
            if self.store.check(["abort"]):
                return f"rank 0 aborted: {self.store.get('abort').decode()}"
        except Exception:  # noqa: BLE001
            return f"lost the rendezvous store (rank 0 gone?) ({error})"
        return error

    def diagnose(self, exc: BaseException) -> str:
        """Rank 0, after a collective failed: the message naming the failed rank.

        Waits for the watch thread's evidence (a dead process is seen at once, a silent rank
        after ``stale_after``); names the error itself when there is none.
        """
        self.failed.wait(self.stale_after + 2 * self.period + SETTLE_SECONDS + 0.5)
        if self.failure is None:
            self.fail(f"a collective failed on rank 0: {exc}")
        assert self.failure is not None
        return self.failure

    def fail(self, message: str) -> None:
        """Records the first failure; rank 0 tells everyone and schedules its own exit."""
        if self.failure is not None:
            return
        self.failure = message
        self.failed.set()
        if self.rank != 0:
            hard_exit(self.rank, f"exiting: {message}")
        logger.error("distributed engine failed: %s", message)
        try:
            self.store.set("abort", message)
        except Exception:  # noqa: BLE001
            pass
        for callback in self.on_failure:
            callback(message)
        threading.Thread(target=self._exit_after_grace, daemon=True).start()

    def _exit_after_grace(self) -> None:
        time.sleep(self.grace)
        for proc in self.procs.values():
            if proc.is_alive():
                proc.kill()
        hard_exit(0, f"exiting: {self.failure}")

    # the watch thread -----------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping.is_set() and self.failure is None:
            try:
                self.store.add(f"hb/{self.rank}", 1)
                message = self._check_rank0() if self.rank == 0 else self._check_worker()
            except Exception as exc:  # noqa: BLE001 - the store itself is unreachable
                if self._stopping.is_set():
                    return
                message = f"lost the rendezvous store (rank 0 gone?): {exc}"
            if message is not None and not self._stopping.is_set():
                self.fail(message)
                return
            self._sleep()

    def _sleep(self) -> None:
        alive = [p.sentinel for p in self.procs.values() if p.exitcode is None]
        if alive:
            wait_sentinels(alive, timeout=self.period)
        else:
            time.sleep(self.period)

    def _check_worker(self) -> str | None:
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            return f"rank 0 (pid {self.parent_pid}) is gone"
        if self.store.check(["abort"]):
            return f"rank 0 aborted: {self.store.get('abort').decode()}"
        silent = self._silent_ranks() if self.armed else []
        if 0 in silent:
            return f"rank 0 stopped responding (no heartbeat for {self.stale_after:.0f} s)"
        return None

    def _check_rank0(self) -> str | None:
        dead = {r: f"rank {r} (pid {p.pid}) {describe_exit(p.exitcode)}"
                for r, p in self.procs.items() if p.exitcode is not None}
        silent = {r: f"rank {r} stopped responding (no heartbeat for "
                     f"{self.stale_after:.0f} s)" for r in self._silent_ranks()} \
            if self.armed else {}
        errors = self._reported_errors()
        if not (dead or silent or errors):
            return None
        now = time.monotonic()
        if self._first_evidence is None:
            self._first_evidence = now
        complete = dead or silent
        if not complete and now - self._first_evidence < self.stale_after + self.period:
            return None  # an error report alone: give the cause (a silent rank) time to show
        if now - self._first_evidence < SETTLE_SECONDS:
            return None
        # The rank that failed first left no error of its own; its peers report lost links.
        primary = [m for r, m in sorted({**silent, **dead}.items()) if r not in errors]
        if primary:
            return "; ".join(primary)
        return "; ".join(f"rank {r} failed: {m}" for r, m in sorted(errors.items()))

    def _silent_ranks(self) -> list[int]:
        now, silent = time.monotonic(), []
        for r, (count, since) in self._seen.items():
            current = self.store.add(f"hb/{r}", 0)
            if current != count:
                self._seen[r] = (current, now)
            elif now - since > self.stale_after:
                silent.append(r)
        return silent

    def _reported_errors(self) -> dict[int, str]:
        if self.store.add("num_errors", 0) == 0:
            return {}
        keys = [f"error/{r}" for r in range(self.world_size)]
        return {r: self.store.get(k).decode() for r, k in enumerate(keys)
                if self.store.check([k])}
