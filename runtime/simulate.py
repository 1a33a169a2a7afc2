"""Simulated heterogeneity that acts on the running process, so that the probe *measures* it.

A run can emulate a slower device, a thinner link or a smaller memory on one machine:

* ``Throttle(factor)`` hooks a decoder layer so its forward and its backward each take
  ``factor`` times their real wall time (it sleeps ``(factor - 1) * elapsed`` after each);
  ``set(factor)`` changes it between rounds (a ``simulate.slowdown`` schedule);
* ``Link(bandwidth_mbps)`` sleeps as long as sending ``nbytes`` over such a link would take (its
  ``bandwidth_mbps`` may change between rounds too);
* ``apply_memory_limit(limit_gb, device)`` caps the process's data segment (CPU, ``RLIMIT_DATA``)
  or the caching allocator's share of the GPU (CUDA); ``MemoryLimit`` lowers it to the limit of the
  client a worker is running and puts the worker's own back afterwards (clients sharing workers).

None of these tell anyone the numbers: ``runtime.probe`` times layers and sends and reads the
limits back, exactly as it would on really heterogeneous hardware.
"""

from __future__ import annotations

import re
import resource
import threading
import time
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def vmdata_bytes() -> int:
    """The process's current data segment (``VmData`` of ``/proc/self/status``), what ``RLIMIT_DATA`` caps."""
    with open("/proc/self/status") as f:
        match = re.search(r"^VmData:\s+(\d+)\s+kB", f.read(), re.M)
    return int(match.group(1)) * 1024 if match else 0


def _sync(t: torch.Tensor) -> None:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


class _BackwardEnd(torch.autograd.Function):
    """Identity on the layer input; its backward runs last in the layer's backward: it sleeps there."""

    @staticmethod
    def forward(ctx: Any, state: dict, factor: float, x: torch.Tensor, dummy: torch.Tensor | None):
        ctx.state, ctx.factor = state, factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        start = ctx.state.pop("backward_start", None)
        if start is not None:
            _sync(grad)
            time.sleep(max(0.0, (ctx.factor - 1) * (time.perf_counter() - start)))
        return None, None, grad if ctx.needs_input_grad[2] else None, None


class _BackwardStart(torch.autograd.Function):
    """Identity on the layer output; its backward runs first in the layer's backward: it starts the clock."""

    @staticmethod
    def forward(ctx: Any, state: dict, x: torch.Tensor):
        ctx.state = state
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        _sync(grad)
        ctx.state["backward_start"] = time.perf_counter()
        return None, grad


class Throttle:
    """Makes a decoder layer ``factor`` times slower, forward and backward, by sleeping after each.

    ``attach(layer)`` registers forward pre/post hooks. The forward is timed and followed by a
    sleep of ``(factor - 1) * elapsed``. When grad is enabled, the layer input and output are
    wrapped in identity autograd functions that mark the end and the start of the layer's
    backward, so the backward is stretched the same way. Outputs and gradients are unchanged.
    Per-call state lives on a thread-local stack, so one training thread per layer is safe.
    """

    def __init__(self, factor: float, changing: bool = False):
        self.changing = changing  # hooked even at factor 1: a schedule may raise it later
        self.set(factor)
        self._local = threading.local()

    def set(self, factor: float) -> None:
        """Changes the factor (between steps: a call in flight keeps the factor it started with)."""
        if factor < 1:
            raise ValueError(f"simulate.slowdown must be >= 1 (a throttle only slows down), got {factor}")
        self.factor = float(factor)

    def _stack(self) -> list:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict):
        factor = self.factor
        if factor == 1:
            self._stack().append(None)
            return args, kwargs
        state: dict = {}
        if args and torch.is_grad_enabled():
            x = args[0]
            # A layer input that needs no grad (after a frozen embedding) gets a dummy that does,
            # so the end marker's backward still runs.
            dummy = None if x.requires_grad else torch.zeros((), device=x.device, requires_grad=True)
            args = (_BackwardEnd.apply(state, factor, x, dummy), *args[1:])
        if args:
            _sync(args[0])
        self._stack().append((time.perf_counter(), state, factor))
        return args, kwargs

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        entry = self._stack().pop()
        if entry is None:
            return output
        start, state, factor = entry
        hidden = output[0] if isinstance(output, tuple) else output
        _sync(hidden)
        time.sleep((factor - 1) * (time.perf_counter() - start))
        if not (torch.is_grad_enabled() and hidden.requires_grad):
            return output
        hidden = _BackwardStart.apply(state, hidden)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def attach(self, module: nn.Module) -> list[RemovableHandle]:
        """Hooks ``module`` (called as ``module(hidden, **kwargs)``); remove the handles to undo."""
        if self.factor == 1 and not self.changing:
            return []
        return [
            module.register_forward_pre_hook(self._pre, with_kwargs=True),
            module.register_forward_hook(self._post, with_kwargs=True),
        ]

    @staticmethod
    def detach(handles: list[RemovableHandle]) -> None:
        for handle in handles:
            handle.remove()


class Link:
    """A simulated link of ``bandwidth_mbps`` megabits per second (None: unlimited, no delay)."""

    def __init__(self, bandwidth_mbps: float | None):
        if bandwidth_mbps is not None and bandwidth_mbps <= 0:
            raise ValueError(f"simulate.bandwidth_mbps must be > 0 or null, got {bandwidth_mbps}")
        self.bandwidth_mbps = bandwidth_mbps

    def seconds(self, nbytes: int) -> float:
        """How long ``nbytes`` take on this link."""
        return 0.0 if self.bandwidth_mbps is None else nbytes * 8 / (self.bandwidth_mbps * 1e6)

    def delay(self, nbytes: int) -> None:
        """Sleeps as long as sending ``nbytes`` takes on this link."""
        seconds = self.seconds(nbytes)
        if seconds > 0:
            time.sleep(seconds)


def apply_memory_limit(limit_gb: float | None, device: torch.device | str) -> None:
    """Caps the memory this process may use at ``limit_gb`` GiB (None: no-op).

    CPU: sets the soft ``RLIMIT_DATA`` (allocations beyond it fail with an out-of-memory error).
    CUDA: sets the caching allocator's per-process memory fraction of the device.
    """
    if limit_gb is None:
        return
    device = torch.device(device)
    limit = int(limit_gb * 2**30)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), device)
        return
    used = vmdata_bytes()
    if used >= limit:
        raise ValueError(
            f"simulate.memory_limit_gb={limit_gb} is below this process's current memory use "
            f"({used / 2**30:.2f} GiB of data segment): raise it above {used / 2**30:.2f}"
        )
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY and limit > hard:
        raise ValueError(
            f"simulate.memory_limit_gb={limit_gb} is above this process's hard RLIMIT_DATA "
            f"({hard / 2**30:.2f} GiB)"
        )
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))


class MemoryShortfall(ValueError):
    """A client's simulated memory limit is below what its worker already uses with that client's stage."""


def memory_in_use(device: torch.device | str) -> int:
    """What the simulated limit caps that this process already uses: its data segment (CPU), or the
    device memory the caching allocator has handed out (CUDA)."""
    device = torch.device(device)
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else vmdata_bytes()


def limit_shortfall(limit_gb: float, used_bytes: int) -> str | None:
    """Why a limit of ``limit_gb`` GiB cannot hold a process already using ``used_bytes`` (None: it can)."""
    if used_bytes < int(limit_gb * 2**30):
        return None
    return f"the worker already uses {used_bytes / 2**30:.2f} GiB, at or above the limit of {limit_gb:g} GiB"


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation that a memory limit refused: Python's, the CPU allocator's or CUDA's."""
    if isinstance(e, MemoryError | torch.OutOfMemoryError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def client_memory_message(client: int, cut: int, limit_gb: float, why: str) -> str:
    """One line naming the client, its cut and its limit, and the fix."""
    return (
        f"client {client} (cut at layer {cut}) does not fit its simulated memory "
        f"(simulate.memory_limit_gb gives it {limit_gb:g} GiB): {why}; raise client {client}'s "
        f"simulate.memory_limit_gb or give it a smaller cut (split.cut_layers)"
    )


class MemoryLimit:
    """A worker's simulated memory limit as it goes from client to client: ``lower_to(limit_gb)`` puts
    the limit of the client it is about to run in force, ``restore()`` puts back the limit the worker
    process had when this was made (its own: the soft ``RLIMIT_DATA`` on CPU, which a process may lower
    and raise again up to its hard limit; the per-process memory fraction on CUDA)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.own = (
            torch.cuda.get_per_process_memory_fraction(self.device)
            if cuda
            else resource.getrlimit(resource.RLIMIT_DATA)
        )

    def lower_to(self, limit_gb: float) -> None:
        """Puts ``limit_gb`` in force; raises ``MemoryShortfall`` (and changes nothing) if the process
        already uses that much."""
        why = limit_shortfall(limit_gb, memory_in_use(self.device))
        if why is not None:
            raise MemoryShortfall(why)
        try:
            apply_memory_limit(limit_gb, self.device)
        except ValueError as e:  # above the process's hard limit
            raise MemoryShortfall(str(e)) from None

    def restore(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(self.own, self.device)
        else:
            resource.setrlimit(resource.RLIMIT_DATA, self.own)
