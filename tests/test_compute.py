"""The compute threads in-process: where a replica's forward and backward run, and that moving them there
changes no number."""

from __future__ import annotations

import threading

import pytest
import torch

from models.loss import shift_targets
from runtime.compute import ComputeThreads, for_process, serial_here, workers_within
from runtime.config import load_config
from runtime.job import lora_spec, model_config
from runtime.server import Server


@pytest.fixture(autouse=True)
def _keep_thread_count():
    """Compute threads set the process-wide default intra-op count; later tests get the old one back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def in_thread(fn):
    """``fn()`` on a new thread (as an RPC or distributed-autograd thread calls it); returns its result."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=60)
    if "error" in box:
        raise box["error"]
    return box["value"]


def test_compute_thread_runs_jobs_there_with_the_callers_grad_mode():
    compute = ComputeThreads(True, threads=1)
    try:
        ident = compute.run(threading.get_ident)
        assert ident != threading.get_ident()
        assert in_thread(lambda: compute.run(threading.get_ident)) == ident  # from any thread: the same one
        assert compute.run(torch.is_grad_enabled) is True
        with torch.no_grad():
            assert compute.run(torch.is_grad_enabled) is False
        with pytest.raises(ValueError, match="boom"):
            compute.run(lambda: (_ for _ in ()).throw(ValueError("boom")))
        assert compute.run(lambda: 7) == 7  # still serving after an error
        assert compute.run(lambda: compute.run(threading.get_ident)) == ident  # nested: inline, no deadlock
    finally:
        compute.close()
    assert compute.run(threading.get_ident) == threading.get_ident()  # closed: inline
    assert ComputeThreads(False, threads=1).run(threading.get_ident) == threading.get_ident()


def test_workers_keep_openmp_within_the_cores():
    # libgomp counts the initial thread and threads - 1 workers per team
    assert workers_within(2, 2) == 1  # a process with all of 2 cores: one team
    assert workers_within(64, 8) == 9 and 1 + 9 * 7 <= 64 < 1 + 10 * 7
    assert workers_within(8, 8) == 1  # never none
    assert workers_within(4, 1) == 4  # one thread each: no teams


def test_server_process_threads_main_serial_compute_threads_parallel():
    def setup(n: int):
        compute = for_process(torch.device("cpu"), n, server=True)
        try:
            return torch.get_num_threads(), compute.run(torch.get_num_threads), compute.enabled
        finally:
            compute.close()

    assert in_thread(lambda: setup(2)) == (1, 2, True)
    assert in_thread(lambda: setup(1)) == (1, 1, False)  # one intra-op thread: no teams, inline
    client = in_thread(lambda: for_process(torch.device("cpu"), 2, server=False))
    assert not client.enabled  # a client computes on its own main thread
    off = in_thread(lambda: for_process(torch.device("cpu"), 2, server=True, enabled=False))
    assert not off.enabled


def test_an_idle_compute_thread_keeps_its_count_when_another_thread_goes_serial():
    """A worker that has not run a job yet must not take the default that a later serial_here on another
    thread sets: its count is its own from the start."""
    compute = ComputeThreads(True, threads=2, workers=2)
    try:
        in_thread(serial_here)  # the process default is now 1
        gate = threading.Barrier(2, timeout=30)  # both workers run a job, at once

        def job():
            gate.wait()
            return torch.get_num_threads()

        counts = []
        threads = [threading.Thread(target=lambda: counts.append(compute.run(job))) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert counts == [2, 2]
    finally:
        compute.close()


def test_compute_threads_share_the_jobs():
    compute = ComputeThreads(True, threads=1, workers=3)
    try:
        gate = threading.Barrier(3, timeout=30)  # passes only if three jobs run at once
        idents = set()

        def job():
            gate.wait()
            idents.add(threading.get_ident())

        threads = [threading.Thread(target=compute.run, args=(job,)) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert len(idents) == 3 and threading.get_ident() not in idents
    finally:
        compute.close()


def _replica(path, compute):
    cfg = load_config(None, [f"model.path={path}", "model.dtype=float32"])
    spec = lora_spec(cfg, model_config(path))
    torch.manual_seed(0)
    server = Server(path, {1: 1}, spec, torch.device("cpu"), cfg, compute=compute)
    replica = server.replicas[1]
    for p in replica.params:  # B starts at zero: make every LoRA gradient non-trivial
        torch.nn.init.normal_(p, std=0.02)
    return replica


def _step(path, enabled: bool, sent: torch.Tensor, targets: torch.Tensor):
    """One replica step, its forward called from one thread (as RPC does) and its backward from another
    (as distributed autograd does): (loss, stats, gradient sent back, LoRA gradients, threads seen)."""
    compute = ComputeThreads(enabled, threads=1)
    try:
        replica = _replica(path, compute)
        seen = set()
        for layer in replica.stage.layers.values():
            layer.register_forward_pre_hook(lambda *_: seen.add(("forward", threading.get_ident())))
        for p in replica.params:
            p.register_hook(lambda g: seen.add(("backward", threading.get_ident())))
        x = sent.clone().requires_grad_()
        loss, stats = in_thread(lambda: replica.train_forward(x, None, targets))
        in_thread(loss.backward)
        grads = [p.grad.clone() for p in replica.params]
        replica.flush()  # the pending step is applied (on the compute thread too)
        assert all(p.grad is None for p in replica.params)
        if enabled:
            assert seen == {
                ("forward", compute.run(threading.get_ident)),
                ("backward", compute.run(threading.get_ident)),
            }
        return loss.detach(), stats, x.grad, grads
    finally:
        compute.close()


def test_replica_forward_and_backward_run_on_the_compute_thread_with_the_same_numbers(random_model):
    path = random_model("llama")
    torch.manual_seed(1)
    sent = torch.randn(2, 8, 32)
    targets = shift_targets(torch.randint(0, 64, (2, 8)))
    l0, s0, g0, p0 = _step(path, False, sent, targets)
    l1, s1, g1, p1 = _step(path, True, sent, targets)  # asserts where it ran
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)
    torch.testing.assert_close(s1, s0, rtol=0, atol=0)
    torch.testing.assert_close(g1, g0, rtol=0, atol=0)  # what goes back down the wire
    assert len(p0) == len(p1) > 0
    for a, b in zip(p0, p1):
        assert a.abs().sum() > 0
        torch.testing.assert_close(b, a, rtol=0, atol=0)


_STEPS_ON_A_THREAD = """
import resource, sys, threading, torch
from runtime.job import tune_malloc
tune_malloc(int(sys.argv[1]), int(sys.argv[2]))
torch.set_num_threads(1)
out = {}
def step():  # a training step's shape: activations of a few MiB alive together, then freed together
    xs = [torch.ones(1024, 1024 + 64 * (i % 7)) for i in range(60)]
    del xs
def work():  # on a thread of its own, as the server's compute thread
    step(); step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    out["faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
t = threading.Thread(target=work); t.start(); t.join()
print(out["faults"])
"""


def test_tuned_malloc_reuses_a_steps_memory_instead_of_faulting_it_in_again():
    """``runtime.malloc_keep_mb`` (with the arena cap): five more steps of about 300 MB of activations on a
    non-main thread page-fault almost nothing in, where glibc's defaults fault about a step's worth in again.
    A process of its own each: malloc's settings are process-wide and belong before any thread starts."""
    import subprocess
    import sys
    from pathlib import Path

    from runtime.config import RuntimeConfig

    def faults(arenas: int, keep_mb: int) -> int:
        res = subprocess.run(
            [sys.executable, "-c", _STEPS_ON_A_THREAD, str(arenas), str(keep_mb)],
            cwd=Path(__file__).resolve().parent.parent,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stderr[-2000:]
        return int(res.stdout.split()[-1])

    pages_per_step = 60 * 1024 * 1216 * 4 // 4096
    default = faults(0, 0)
    tuned = faults(RuntimeConfig.malloc_arenas, RuntimeConfig.malloc_keep_mb)  # the runtime's defaults
    assert default > pages_per_step / 2  # glibc's defaults: most of a step's pages, again
    assert tuned < min(pages_per_step, default) / 20
