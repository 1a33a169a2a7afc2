"""Liveness that means progress, in-process: the heartbeat's stall watch names the rank whose main thread
made no progress, and the start-up rendezvous (``runtime.dist.join``) names a rank that never arrived
and is not confused by an earlier attempt that lost a rank. Real TCPStores; the torchrun runs that
hang a rank and restart are in tests/test_recovery.py.
"""

from __future__ import annotations

import re
import threading
import time

import pytest
import torch.distributed as tdist

from runtime import dist, faults
from runtime.config import ConfigError, load_config


@pytest.fixture
def store(monkeypatch):
    server = tdist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "liveness-test")
    return server


def test_the_rank_that_has_not_reached_the_collective_is_named_with_where_it_was():
    stuck, waiting = faults.Progress(), faults.Progress()
    for p in (stuck, waiting):
        p.begin_round(2)
        p.mark("training")
    stuck.mark(step=3)
    with waiting.collective("a gather (Settled)"):
        states = {0: waiting.snapshot(), 1: stuck.snapshot(), 2: waiting.snapshot()}
    assert faults.behind(states) == [1]
    line = faults.stall_message(states, 31.4, 30)
    assert "rank 1 (client1) at round 2, training, step 3, outside any collective" in line
    assert "the others wait: round 2, training, waiting in a gather (Settled) (collective #1)" in line
    assert "no rank made progress for 31s (runtime.stall_timeout_s=30)" in line


def test_a_stuck_rank_is_named_once_no_rank_moves_for_the_stall_timeout(store):
    """Rank 1's main thread stopped at a step; rank 0 waits in a collective and keeps nothing moving. The
    watch stays quiet while any rank moves, and names rank 1 (not the waiting server) after the timeout."""
    records = [faults.Progress(), faults.Progress()]
    beats = [
        faults.Heartbeat(r, 2, "t", peer_timeout_s=60, stall_timeout_s=0.6, record=records[r])
        for r in range(2)
    ]
    for rec in records:
        rec.begin_round(1)
    records[1].mark("training", step=2)
    t0 = time.monotonic()
    with records[0].collective("a gather (NoneType)"):
        while time.monotonic() - t0 < 0.9:  # rank 1 moves for a while: no stall, however long it takes
            records[1].mark()
            for hb in beats:
                hb.beat()
                assert hb.stalled() is None
            time.sleep(0.1)
        deadline = time.monotonic() + 5
        verdict = None
        while verdict is None and time.monotonic() < deadline:
            for hb in beats:
                hb.beat()
            verdict = beats[0].stalled()
            time.sleep(0.1)
    assert verdict is not None
    assert "furthest behind: rank 1 (client1) at round 1, training, step 2, outside any collective" in verdict
    time.sleep(0.2)
    beats[1].beat()
    assert "furthest behind: rank 1 (client1) at round 1, training, step 2" in (beats[1].stalled() or "")
    for hb in beats:
        hb.close()


def _join_all(store: tdist.Store, ranks: list[int], world_size: int, timeout_s: float) -> dict[int, object]:
    """``dist.join`` on one thread per rank; each rank's token or exception."""
    out: dict[int, object] = {}

    def one(r: int) -> None:
        client = tdist.TCPStore("127.0.0.1", store.port, is_master=False)
        try:
            out[r] = dist.join(client, r, world_size, timeout_s)
        except dist.NotJoined as e:
            out[r] = e

    threads = [threading.Thread(target=one, args=(r,)) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout_s + 30)
    return out


def test_a_rank_that_never_arrives_is_named_and_the_next_attempt_starts_clean(store):
    """Attempt 1 loses rank 2 before it arrives: rank 0 names it within the join timeout, rank 1 gives up
    too. Attempt 2 (every rank) agrees on one fresh token, whatever attempt 1 left in the store; counting
    arrivals would have put its first arrivals in attempt 1's group."""
    first = _join_all(store, [0, 1], 3, timeout_s=1.0)
    assert isinstance(first[0], dist.NotJoined)
    assert "rank 2 (client2) did not arrive within runtime.join_timeout_s=1s" in str(first[0])
    assert isinstance(first[1], dist.NotJoined)
    second = _join_all(store, [2, 1, 0], 3, timeout_s=20.0)  # the late rank of the last attempt first
    tokens = {r: second[r] for r in range(3)}
    assert all(isinstance(t, str) for t in tokens.values()), tokens
    assert len(set(tokens.values())) == 1
    third = _join_all(store, [0, 1, 2], 3, timeout_s=20.0)
    assert len({third[r] for r in range(3)}) == 1 and third[0] != tokens[0]  # a new attempt, a new token


def test_a_hang_fault_blocks_only_the_main_thread_and_only_where_asked(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    injector = faults.FaultInjector(1, "hang@1:2")
    injector.round = 1
    injector.hit("hang")  # round 1: passes
    injector.round = 2
    # the block itself (a loop that ends the process with its torchrun agent) runs under torchrun in
    # test_recovery; here it waits on an event, so the blocked thread does not outlive the test
    released = threading.Event()
    monkeypatch.setattr(faults, "_block", released.wait)
    blocked = threading.Thread(target=injector.hit, args=("hang",), daemon=True)
    blocked.start()
    blocked.join(timeout=0.5)
    assert blocked.is_alive()  # still blocked
    released.set()
    blocked.join(timeout=5)
    assert not blocked.is_alive()
    assert faults.FaultInjector(2, "startup@2").target == ("startup", 2, 0, None)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert faults.FaultInjector(1, "hang@1:2").target is None  # a restarted attempt runs through


@pytest.mark.parametrize("field", ["runtime.stall_timeout_s", "runtime.join_timeout_s"])
@pytest.mark.parametrize("value", ["0", "-5", ".inf", ".nan"])
def test_a_timeout_at_its_extremes_is_refused_in_one_line(field, value):
    with pytest.raises(ConfigError, match=rf"^{re.escape(field)}=\S+: must be a finite number"):
        load_config(None, [f"{field}={value}"])


def test_a_full_disk_and_an_out_of_memory_are_named_as_failures_a_restart_would_repeat():
    """What ``launch.train`` turns into exit 2 and the marker that stops later attempts: a full disk
    anywhere in the error's chain, a MemoryError, or the server's out-of-memory seen over RPC (named as
    rank 0's); an ordinary error is not one of them."""
    import errno

    from runtime.faults import unrecoverable

    place = lambda r: f"cut {r}"
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("writing round 3's checkpoint failed") from inner
    except RuntimeError as e:
        disk = unrecoverable(e, 2, place)
    assert disk is not None and disk.kind == "disk"
    assert "the disk is full on rank 2 (client2)" in str(disk) and "runtime.keep_checkpoints" in str(disk)
    memory = unrecoverable(MemoryError("cannot allocate"), 1, place)
    assert memory.kind == "memory" and "out of memory on rank 1 (cut 1)" in str(memory)
    assert "lower its cut" in str(memory)
    remote = unrecoverable(RuntimeError("On WorkerInfo(id=0, name=server): OutOfMemoryError: ..."), 3, place)
    assert "out of memory on rank 0 (cut 0)" in str(remote) and "raise the cuts" in str(remote)
    assert unrecoverable(ValueError("a bug"), 1, place) is None
