"""Progress lines: durations, the per-round ETA, and a step bar drawn only on a terminal."""

from __future__ import annotations

import io

from runtime.progress import StepBar, duration, round_line


def test_duration():
    assert [duration(s) for s in (0.04, 12.34, 65, 3599, 3600 * 2 + 185)] == [
        "0.0s",
        "12.3s",
        "1m05s",
        "59m59s",
        "2h03m",
    ]


def test_round_line_gives_elapsed_and_eta_from_the_last_three_rounds():
    line = round_line(4, 10, 130.0, [50.0, 20.0, 30.0, 40.0])
    assert line == "round 4/10 done in 40.0s; elapsed 2m10s, ETA 3m00s"  # 6 rounds left x 30 s
    assert round_line(10, 10, 300.0, [30.0]).endswith("elapsed 5m00s, finished")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_step_bar_only_on_a_terminal():
    piped = io.StringIO()
    bar = StepBar("client1 training", 4, piped)
    for step in range(1, 5):
        bar.update(step)
    assert piped.getvalue() == ""
    tty = _Terminal()
    bar = StepBar("client1 training", 4, tty)
    bar.update(2)
    bar.update(4)
    assert tty.getvalue() == (
        "\rclient1 training [##########----------] 2/4\rclient1 training [####################] 4/4\n"
    )
