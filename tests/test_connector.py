"""The connection engine against real loopback listeners: open, refused, timeouts, hold."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from netprobe.connector import ConnectJob, ConnectorStats, run_connects
from netprobe.results import ConnectState
from tests.conftest import HAS_IPV6
from tests.helpers import LONG, ServerThread


def _job(port: int, key: object = None) -> ConnectJob:
    return ConnectJob(key if key is not None else port, socket.AF_INET, ("127.0.0.1", port))


def test_open_refused_and_filtered(
    server: ServerThread, closed_port: int, full_queue_port: int
) -> None:
    jobs = [_job(server.port), _job(closed_port), _job(full_queue_port)]
    start = time.monotonic()
    results = {r.job.key: r for r in run_connects(jobs, concurrency=10, timeout_s=0.3)}
    assert results[server.port].state is ConnectState.OPEN
    assert results[closed_port].state is ConnectState.REFUSED
    assert results[closed_port].errno_name == "ECONNREFUSED"
    assert results[full_queue_port].state is ConnectState.TIMEOUT
    assert results[full_queue_port].elapsed_s >= 0.29
    assert time.monotonic() - start < LONG


def test_many_jobs_constant_concurrency(closed_port: int) -> None:
    stats = ConnectorStats()
    n = 2000
    results = list(
        run_connects(
            (_job(closed_port, key=i) for i in range(n)), concurrency=50, timeout_s=2, stats=stats
        )
    )
    assert sorted(r.job.key for r in results) == list(range(n))
    assert all(r.state is ConnectState.REFUSED for r in results)
    assert stats.started == n


def test_rate_cap_spaces_attempts(closed_port: int) -> None:
    start = time.monotonic()
    results = list(run_connects([_job(closed_port)] * 6, concurrency=10, timeout_s=1, rate=20))
    assert len(results) == 6
    assert time.monotonic() - start >= 5 / 20 * 0.9


def test_hold_keeps_connections_and_sees_reset() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(LONG)
    port = listener.getsockname()[1]

    def reset_one() -> None:
        # While the connector holds, the server accepts one connection and resets it.
        conn, _ = listener.accept()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    thread = threading.Thread(target=reset_one)
    thread.start()
    try:
        jobs = [_job(port, key=i) for i in range(3)]
        results = list(run_connects(jobs, concurrency=3, timeout_s=1, hold_s=0.5))
        thread.join(LONG)
        assert not thread.is_alive()
        assert len(results) == 3
        assert sorted(r.ended_by or "" for r in results) == ["hold", "hold", "reset"]
        assert [r.state for r in results if r.ended_by == "reset"] == [ConnectState.RESET]
        held = [r for r in results if r.ended_by == "hold"]
        assert all(r.held_s >= 0.45 for r in held)
    finally:
        listener.close()


def test_source_addresses_are_used(server: ServerThread) -> None:
    jobs = [
        ConnectJob(src, socket.AF_INET, ("127.0.0.1", server.port), source=src)
        for src in ("127.0.0.2", "127.0.0.3")
    ]
    results = list(run_connects(jobs, concurrency=2, timeout_s=1))
    assert {r.state for r in results} == {ConnectState.OPEN}


def test_stop_at_ends_the_run(full_queue_port: int) -> None:
    start = time.monotonic()
    results = list(
        run_connects(
            (_job(full_queue_port, key=i) for i in range(10**9)),
            concurrency=5,
            timeout_s=10,
            stop_at=start + 0.3,
        )
    )
    assert time.monotonic() - start < 2
    assert len(results) == 5
    assert all(r.ended_by == "stop" for r in results)


def test_refused_sockets_are_reused_without_changing_verdicts(closed_port: int) -> None:
    servers = [ServerThread() for _ in range(3)]
    try:
        ports = [closed_port, servers[0].port, closed_port, closed_port, servers[1].port]
        ports += [servers[2].port, closed_port]
        jobs = [_job(port, key=(i, port)) for i, port in enumerate(ports * 15)]
        open_ports = {s.port for s in servers}
        for concurrency in (1, 50):
            results = list(run_connects(jobs, concurrency=concurrency, timeout_s=LONG))
            assert sorted(r.job.key for r in results) == sorted(j.key for j in jobs)
            for result in results:
                want = (
                    ConnectState.OPEN if result.job.key[1] in open_ports else ConnectState.REFUSED
                )
                assert result.state is want, result
    finally:
        for srv in servers:
            srv.stop()


def test_on_refused_takes_the_refusals_and_only_them(
    server: ServerThread, closed_port: int, full_queue_port: int
) -> None:
    ports = [closed_port, server.port, closed_port, full_queue_port, closed_port]
    jobs = [_job(port, key=(i, port)) for i, port in enumerate(ports * 8)]
    refused: list[ConnectJob] = []
    for concurrency in (1, 50):  # the inline path and the epoll path
        refused.clear()
        results = list(
            run_connects(jobs, concurrency=concurrency, timeout_s=0.1, on_refused=refused.append)
        )
        assert sorted(j.key for j in refused) == sorted(
            j.key for j in jobs if j.key[1] == closed_port
        )
        assert sorted(r.job.key for r in results) == sorted(
            j.key for j in jobs if j.key[1] != closed_port
        )
        for result in results:
            want = ConnectState.OPEN if result.job.key[1] == server.port else ConnectState.TIMEOUT
            assert result.state is want, result
    with pytest.raises(ValueError, match="workers"):
        list(run_connects(jobs, concurrency=1, timeout_s=1, workers=2, on_refused=print))


def test_refusal_streaks_hand_back_what_they_cannot_finish(
    server: ServerThread, closed_port: int
) -> None:
    # Runs of refusals (reused sockets, see _refusal_streak) broken by an open port, a job of
    # another family and one with a source address: each must still get its own verdict.
    closed6: int | None = None
    holder6: socket.socket | None = None
    if HAS_IPV6:
        holder6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        holder6.bind(("::1", 0))  # bound, never listening: closed
        closed6 = holder6.getsockname()[1]
    try:
        jobs: list[ConnectJob] = []
        for i in range(60):
            kind = i % 6
            if kind == 1:
                jobs.append(_job(server.port, key=(i, "open")))
            elif kind == 3 and closed6 is not None:
                jobs.append(ConnectJob((i, "closed"), socket.AF_INET6, ("::1", closed6, 0, 0)))
            elif kind == 4:
                jobs.append(
                    ConnectJob(
                        (i, "closed"), socket.AF_INET, ("127.0.0.1", closed_port), "127.0.0.1"
                    )
                )
            else:
                jobs.append(_job(closed_port, key=(i, "closed")))
        for concurrency in (1, 50):
            refused: list[ConnectJob] = []
            stats = ConnectorStats()
            results = list(
                run_connects(
                    jobs,
                    concurrency=concurrency,
                    timeout_s=LONG,
                    on_refused=refused.append,
                    stats=stats,
                )
            )
            assert sorted(j.key for j in refused) == sorted(
                j.key for j in jobs if j.key[1] == "closed"
            )
            assert sorted(r.job.key for r in results) == sorted(
                j.key for j in jobs if j.key[1] == "open"
            )
            assert all(r.state is ConnectState.OPEN for r in results)
            assert stats.started == len(jobs)
    finally:
        if holder6 is not None:
            holder6.close()


def test_a_refusal_streak_ends_at_the_stop_time(closed_port: int) -> None:
    endless = (_job(closed_port, key=i) for i in itertools.count())
    refused = 0

    def count(_job: ConnectJob) -> None:
        nonlocal refused
        refused += 1

    stats = ConnectorStats()
    start = time.monotonic()
    results = list(
        run_connects(
            endless,
            concurrency=10,
            timeout_s=1,
            stop_at=start + 0.3,
            on_refused=count,
            stats=stats,
        )
    )
    assert results == []
    assert refused > 0
    assert stats.started == refused
    assert time.monotonic() - start < LONG


def test_workers_split_the_jobs_and_merge_every_result(closed_port: int) -> None:
    # A bare listener (no accept thread), so this process stays single-threaded and forks.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    open_port = listener.getsockname()[1]
    forks = threading.active_count() == 1  # threaded callers fall back to one process
    try:
        for sequence in (True, False):
            ports = [open_port if i % 7 == 0 else closed_port for i in range(300)]
            listed = [_job(port, key=i) for i, port in enumerate(ports)]
            jobs = listed if sequence else (job for job in listed)
            stats = ConnectorStats()
            results = list(
                run_connects(jobs, concurrency=20, timeout_s=LONG, workers=2, stats=stats)
            )
            assert sorted(r.job.key for r in results) == list(range(300))
            for result in results:
                want = (
                    ConnectState.OPEN
                    if ports[result.job.key] == open_port
                    else ConnectState.REFUSED
                )
                assert result.state is want
            assert stats.extra["workers"] == (2 if forks else 1)
    finally:
        listener.close()


class _DyingJobs(Sequence[ConnectJob]):
    """Jobs whose worker process is killed (as by the OOM killer) when it fetches job `fatal`."""

    def __init__(self, listed: list[ConnectJob], fatal: int) -> None:
        self.listed, self.fatal, self.parent = listed, fatal, os.getpid()

    def __len__(self) -> int:
        return len(self.listed)

    def __getitem__(self, index: Any) -> Any:
        if index == self.fatal and os.getpid() != self.parent:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.listed[index]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="workers need fork")
def test_a_dead_workers_jobs_are_reported_not_dropped(closed_port: int) -> None:
    assert threading.active_count() == 1, "a threaded test process would not fork"
    listed = [_job(closed_port, key=i) for i in range(200)]
    for jobs in (_DyingJobs(listed, fatal=51), (j for j in _DyingJobs(listed, fatal=-1))):
        results = list(run_connects(jobs, concurrency=20, timeout_s=LONG, workers=2))
        if isinstance(jobs, _DyingJobs):
            assert sorted(r.job.key for r in results) == list(range(200))
            lost = {r.job.key for r in results if r.state is ConnectState.ERROR}
            assert all(r.errno_name == "ECHILD" for r in results if r.job.key in lost)
            # The worker had jobs 1, 3, ... and died fetching 51: from there on all are lost.
            assert set(range(51, 200, 2)) <= lost <= set(range(1, 200, 2))
        else:
            assert sorted(r.job.key for r in results) == list(range(200))
            assert all(r.state is ConnectState.REFUSED for r in results)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="workers need fork")
@pytest.mark.parametrize("hanging", ["ours", "the worker's"])
def test_a_stop_time_with_workers_neither_invents_nor_drops_results(
    closed_port: int, full_queue_port: int, hanging: str
) -> None:
    # One share's connects hang, the other's are refused at once: the fast process walks far
    # ahead of the slow one before the stop time ends both.
    assert threading.active_count() == 1, "a threaded test process would not fork"
    slow = 0 if hanging == "ours" else 1
    ports = [full_queue_port if i % 2 == slow else closed_port for i in range(400)]
    listed = [_job(port, key=i) for i, port in enumerate(ports)]
    results = list(
        run_connects(
            (job for job in listed),
            concurrency=20,
            timeout_s=LONG,
            workers=2,
            stop_at=time.monotonic() + 0.5,
        )
    )
    keys = [r.job.key for r in results]
    assert len(keys) == len(set(keys))
    # Every refused job is reported (the worker's answers for jobs we had not walked too)...
    assert {k for k in range(400) if k % 2 != slow} <= set(keys)
    # ...and the hanging share's jobs never started are not made up as errors.
    assert all(r.state is not ConnectState.ERROR for r in results)
    assert all(
        r.state is ConnectState.TIMEOUT and r.ended_by == "stop"
        for r in results
        if r.job.key % 2 == slow
    )


def test_unix_sockets_open_refused_and_missing(tmp_path: Path) -> None:
    live, stale = str(tmp_path / "live.sock"), str(tmp_path / "stale.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(live)
    listener.listen(16)
    gone = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    gone.bind(stale)  # a socket file nobody listens on: ECONNREFUSED
    try:
        paths = [live, stale, str(tmp_path / "missing.sock")] * 3
        jobs = [ConnectJob((i, path), socket.AF_UNIX, path) for i, path in enumerate(paths)]
        results = {r.job.key: r for r in run_connects(jobs, concurrency=4, timeout_s=LONG)}
        assert len(results) == len(jobs)
        for (_i, path), result in results.items():
            if path == live:
                assert result.state is ConnectState.OPEN
            elif path == stale:
                assert result.errno_name == "ECONNREFUSED"
            else:
                assert result.errno_name == "ENOENT"
    finally:
        gone.close()
        listener.close()


@pytest.mark.parametrize(("ending", "want"), [("fin", "eof"), ("rst", "reset")])
def test_hold_sees_the_end_after_a_banner(ending: str, want: str) -> None:
    # A server that greets (ssh, smtp) and then closes: the banner must be read, or the
    # level-triggered socket keeps waking the loop and the close is never seen.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(LONG)
    port = listener.getsockname()[1]

    def greet_and_close() -> None:
        conn, _ = listener.accept()
        conn.sendall(b"220 banner\r\n")
        time.sleep(0.05)
        if ending == "rst":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    thread = threading.Thread(target=greet_and_close)
    thread.start()
    try:
        results = list(run_connects([_job(port)], concurrency=1, timeout_s=1, hold_s=3))
        thread.join(LONG)
        assert [r.ended_by for r in results] == [want]
        assert results[0].held_s < 2.5  # ended by the peer, not by our 3 s hold
    finally:
        listener.close()


def test_a_rate_cap_ends_with_the_last_attempt(closed_port: int) -> None:
    # Regression: the loop learned that no job was left only when the next rate slot opened,
    # so a run waited one more interval after its last attempt (5 s here; with a rate of
    # 1e-300, forever).
    for jobs in ([_job(closed_port)], (job for job in [_job(closed_port)])):
        start = time.monotonic()
        results = list(run_connects(jobs, concurrency=10, timeout_s=1, rate=0.2))
        took = time.monotonic() - start
        assert [r.state for r in results] == [ConnectState.REFUSED]
        assert took < 2.5, f"one attempt took {took:.2f} s at rate 0.2"


def test_a_rate_cap_spaces_attempts_and_ends_with_the_last(closed_port: int) -> None:
    # The job fetched early to know one is left still waits for its slot.
    jobs = (_job(closed_port, key=i) for i in range(2))
    start = time.monotonic()
    results = list(run_connects(jobs, concurrency=10, timeout_s=1, rate=1.0))
    took = time.monotonic() - start
    assert [r.job.key for r in results] == [0, 1]
    # Starts at 0 and 1 s; the old loop also waited out the slot at 2 s.
    assert 1.0 * 0.9 <= took < 1.6, f"2 attempts at rate 1 took {took:.2f} s"


def test_worker_processes_end_with_their_last_attempt_under_a_rate(closed_port: int) -> None:
    # Each process paces its share (rate / workers) and must end with its own last attempt.
    # Without fork (a threaded caller) both jobs run here: 0 and 2.5 s at rate 0.4.
    for sequence in (True, False):
        listed = [_job(closed_port, key=i) for i in range(2)]
        jobs = listed if sequence else (job for job in listed)
        start = time.monotonic()
        results = list(run_connects(jobs, concurrency=10, timeout_s=1, rate=0.4, workers=2))
        took = time.monotonic() - start
        assert sorted(r.job.key for r in results) == [0, 1]
        assert took < 4.0, f"2 attempts over 2 workers took {took:.2f} s at rate 0.4"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="workers need fork")
def test_a_reaped_worker_is_never_signalled(
    closed_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reaped when its pipe ends, a worker's pid is free for any other process: the SIGKILL
    # meant for a worker still running must not go to it.
    assert threading.active_count() == 1, "a threaded test process would not fork"
    kills: list[tuple[int, int]] = []
    real_kill = os.kill

    def kill(pid: int, signum: int) -> None:
        kills.append((pid, signum))
        real_kill(pid, signum)

    monkeypatch.setattr(os, "kill", kill)
    listed = [_job(closed_port, key=i) for i in range(40)]
    results = list(run_connects(listed, concurrency=8, timeout_s=LONG, workers=2))
    assert len(results) == 40
    assert kills == []


def test_an_open_port_after_a_refusal_streak_counts_its_own_handshake(
    server: ServerThread, closed_port: int
) -> None:
    # The streak connects the job that breaks it, then hands it back: its latency used to
    # start only then, after the handshake, and came out as a few microseconds (the close and
    # the report). Medians of interleaved runs against the same port checked alone.
    import statistics

    after_streak: list[float] = []
    alone: list[float] = []
    for _ in range(25):
        jobs = [_job(closed_port, "c1"), _job(closed_port, "c2"), _job(server.port, "open")]
        (result,) = run_connects(jobs, concurrency=1, timeout_s=LONG, on_refused=lambda _j: None)
        after_streak.append(result.elapsed_s)
        (result,) = run_connects([_job(server.port)], concurrency=1, timeout_s=LONG)
        alone.append(result.elapsed_s)
    assert statistics.median(after_streak) > 0.3 * statistics.median(alone), (after_streak, alone)
