"""Progress for the people watching a run: durations, the per-round ETA line, a bar on terminals only.

The round line goes to the log (so it is in every log file); the bar is drawn on stderr only when
stderr is a terminal, so batch-job logs and piped output never fill with carriage returns.
"""

from __future__ import annotations

import sys
from typing import TextIO


def duration(seconds: float) -> str:
    """12.3s, 4m05s or 2h03m."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def round_line(rnd: int, rounds: int, elapsed_s: float, round_times: list[float]) -> str:
    """``round 3/5 done in 4.1s; elapsed 12.6s, ETA 8.4s``; the ETA is the mean of the last three
    rounds times the rounds left."""
    recent = round_times[-3:]
    left = rounds - rnd
    eta = left * sum(recent) / len(recent) if recent else 0.0
    last = f" in {duration(round_times[-1])}" if round_times else ""
    tail = f", ETA {duration(eta)}" if left else ", finished"
    return f"round {rnd}/{rounds} done{last}; elapsed {duration(elapsed_s)}{tail}"


class StepBar:
    """``client1 training [########------] 8/14`` redrawn in place, only when ``stream`` is a terminal."""

    WIDTH = 20

    def __init__(self, label: str, total: int, stream: TextIO | None = None):
        self.label, self.total = label, total
        self.stream = stream if stream is not None else sys.stderr
        self.on = bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, done: int) -> None:
        if not self.on:
            return
        filled = round(self.WIDTH * done / max(1, self.total))
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        end = "\n" if done >= self.total else ""
        self.stream.write(f"\r{self.label} [{bar}] {done}/{self.total}{end}")
        self.stream.flush()
