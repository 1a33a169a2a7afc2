"""Few computing threads per process on CPU: where the server's tensor work runs, and why.

PyTorch's CPU build parallelises an op with OpenMP (libgomp), and libgomp keeps one team of worker
threads for every thread that starts a parallel op. While the workers it manages outnumber the
process's cores, it stops letting idle workers spin (100 spins instead of about 3 ms) and puts them
to sleep after every op, so every op then pays a wake-up. One such extra team is enough: at two
intra-op threads on two cores, an idle second team costs a training step about 10% (1.81 of 2 cores
busy instead of 1.98; ``python -m benchmarks.investigations.compute_thread``, docs/performance.md).

A split process has several threads that compute unless told otherwise: distributed autograd runs a
backward on its own thread pool, RPC requests arrive on a pool of 16, and the main thread does the
rest. So:

- a client computes on its main thread only: its forward, its loss and, after
  ``dist_autograd.backward`` has brought the gradient at the cut back, its own backward
  (``runtime.client``);
- the server, when its ops run on more than one intra-op thread, computes on :class:`ComputeThreads`:
  as many threads as keep libgomp's workers within the cores (one when its intra-op threads are
  more than half the cores). They run the replicas' forwards and evaluations, submitted from the RPC threads,
  and their backwards, which :func:`split_graph` hands over from distributed autograd's thread. Its
  main thread (loading, aggregation, checkpoints) is made serial (:func:`serial_here`), so that it
  starts no team of its own. At one intra-op thread there are no teams: requests compute on the
  RPC threads, concurrently, as they arrive.

On a GPU none of this applies (kernels do not use OpenMP, and CUDA streams are bound to the calling
thread): :class:`ComputeThreads` runs every job inline, as if it were not there.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import torch

from runtime.job import usable_cores


class ComputeThreads:
    """Runs submitted jobs on ``workers`` threads, each with ``threads`` intra-op threads.

    ``run(fn)`` blocks the caller until ``fn()`` has run on one of them and returns its result (or
    raises its exception). The caller's grad mode goes with the job. At most ``workers`` jobs run at
    once, so a simulated server slowdown (``simulate.server_slowdown``, sleeps in the job) holds up
    other clients' requests, as a slower server would. Disabled (``enabled=False``) it calls ``fn``
    inline, on the caller's thread.
    """

    def __init__(self, enabled: bool, threads: int, workers: int = 1):
        self.enabled = enabled
        self.threads = threads
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        if enabled:
            for i in range(workers):
                ready = threading.Event()
                worker = threading.Thread(
                    target=self._serve, args=(ready,), name=f"splitft-compute-{i}", daemon=True
                )
                worker.start()
                ready.wait()
                self._workers.append(worker)

    @property
    def workers(self) -> int:
        return len(self._workers)

    def _serve(self, ready: threading.Event) -> None:
        # The thread's one-time initialisation first: left for its first op, it would take the process
        # default then, which any later serial_here (another thread's) sets to 1.
        torch.get_num_threads()
        torch.set_num_threads(self.threads)  # this thread's count, and the default of threads started later
        ready.set()
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, grad_mode, box, done = job
            try:
                with torch.set_grad_enabled(grad_mode):
                    box["value"] = fn()
            except BaseException as e:  # handed to the caller
                box["error"] = e
            done.set()

    def inline(self) -> bool:
        """True where a job runs inline: disabled, closed, or called from one of the compute threads."""
        return (
            not self._workers
            or threading.current_thread() in self._workers
            or not self._workers[0].is_alive()
        )

    def run(self, fn: Callable[[], Any]) -> Any:
        if self.inline():
            return fn()
        box: dict[str, Any] = {}
        done = threading.Event()
        self._jobs.put((fn, torch.is_grad_enabled(), box, done))
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["value"]

    def close(self) -> None:
        for _ in self._workers:
            self._jobs.put(None)
        for worker in self._workers:
            worker.join(timeout=10)


def serial_here() -> None:
    """Makes the calling thread run every op on one core (its OpenMP and MKL thread counts are its
    own), so it never starts an OpenMP team. Call it before the thread's first parallel op; the
    process-wide default that threads started later take is set again by the next
    ``torch.set_num_threads`` (:class:`ComputeThreads` sets it when they start)."""
    torch.get_num_threads()  # the thread's one-time initialisation from the process default, done now
    torch.set_num_threads(1)


class _Split(torch.autograd.Function):
    """The boundary of :func:`split_graph`: outputs detached from the caller's graph, a backward that
    runs the inner graph's own backward on the compute thread."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, compute: ComputeThreads, fn: Callable):
        leaf = x.detach().requires_grad_()

        def job():
            with torch.enable_grad():
                return leaf, fn(leaf)

        leaf, outs = compute.run(job)
        ctx.compute, ctx.leaf, ctx.outs = compute, leaf, outs
        detached = tuple(o.detach() for o in outs)
        ctx.mark_non_differentiable(*(d for d, o in zip(detached, outs) if not o.requires_grad))
        return detached

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        pairs = [(o, g) for o, g in zip(ctx.outs, grads) if o.requires_grad and g is not None]
        leaf = ctx.leaf

        def job():
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            return leaf.grad

        grad = ctx.compute.run(job) if pairs else None
        ctx.leaf = ctx.outs = None  # the inner graph is freed with this step
        return grad, None, None


def split_graph(
    compute: ComputeThreads, fn: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], x: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """``fn(x)`` computed on ``compute``'s thread, with its backward there too.

    ``x`` must require grad (it came over the wire, and distributed autograd waits for its
    gradient). ``fn`` returns a tuple of tensors; those that require grad are differentiable here.
    Whoever runs the outer backward (distributed autograd's thread) only hands the gradients over:
    the inner backward is a local one, so it leaves the gradients of ``fn``'s parameters on their
    ``.grad``, where an optimizer takes them.
    """
    return _Split.apply(x, compute, fn)


def workers_within(cores: int, threads: int) -> int:
    """How many threads can each run ops on ``threads`` intra-op threads while libgomp's workers stay
    within ``cores``: it counts the initial thread and every team's ``threads - 1`` workers, and
    throttles their spinning above the cores."""
    return max(1, (cores - 1) // (threads - 1)) if threads > 1 else cores


def for_process(device: torch.device, threads: int, server: bool, enabled: bool = True) -> ComputeThreads:
    """Sets this process's intra-op threads and returns where its tensor work runs: for the server on
    CPU at more than one intra-op thread (``enabled``: ``runtime.compute_threads``), running compute
    threads, its main thread made serial first, before anything has started a team; otherwise
    inline, with ``threads`` for the caller."""
    if enabled and server and device.type == "cpu" and threads > 1:
        serial_here()
        return ComputeThreads(True, threads, workers_within(usable_cores(), threads))
    torch.set_num_threads(threads)
    return ComputeThreads(False, threads)
