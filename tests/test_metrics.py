"""What metrics.jsonl's server usage figures measure: cores kept busy by this process and by the host."""

from __future__ import annotations

import time

from runtime.metrics import CpuUsage


def test_cpu_usage_tells_computing_from_waiting():
    usage = CpuUsage()
    time.sleep(0.3)  # a server waiting for its clients
    waiting = usage.stop()
    usage = CpuUsage()
    end = time.perf_counter() + 0.3
    while time.perf_counter() < end:  # one thread computing
        pass
    busy = usage.stop()
    # a loaded machine may give the busy thread only part of a core, but far more than a sleeping one
    idle, used = waiting["train_cores_used"], busy["train_cores_used"]
    assert idle < 0.1 and max(0.15, 3 * idle) < used <= 1.1
    assert busy["host_cores"] >= 1 and 0 < busy["host_cores_busy"] <= busy["host_cores"]
