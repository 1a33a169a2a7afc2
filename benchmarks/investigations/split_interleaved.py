"""Split over unsplit throughput, with both runs alive at once and taking turns on the cores.

    .venv/bin/python -m benchmarks.investigations.split_interleaved   # about 7 minutes a repeat, 6 repeats

writes benchmarks/investigations/results/split_interleaved.json.

``benchmarks.split_overhead`` runs the unsplit and the split job one after the other, minutes apart,
and this machine's speed drifts by 5-10% over minutes: as much as the gap being measured. Here the
unsplit job (``launch.train_local``) and the one-client split job (torchrun, 2 processes; same model,
data and settings as ``split_overhead``) start together, and the benchmark lets one of them run for
``WINDOW_S`` seconds while every process of the other is stopped (SIGSTOP; SIGCONT to resume), in
turn. Each job has a clock that advances only while it runs. A round's time is that clock between the
job's metrics lines (polled every 20 ms, and once more right after each stop), so it holds the
round's steps, its evaluation and, split, its collectives, exactly as the job's own ``round_time_s``
does when it runs alone. Round ``r`` of both jobs falls in the same minutes, so a drift of the
machine's speed falls on both alike: the ratio of round ``r``'s tokens/s is a paired measurement.

Reported per repeat: the rounds' tokens/s of each job (rounds 2..ROUNDS; round 1 holds the start-up),
the ratio of each round pair, their geometric mean with a 95% interval (Student's t over the log
ratios), and the same over all repeats together.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from benchmarks.split_overhead import BATCH, HIDDEN, LAYERS, SEQ, overrides, torchrun, write_text_data
from benchmarks.stats import interval
from tests.random_models import save_random_model

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "benchmarks" / "investigations" / "results"
ROUNDS, REPEATS, WINDOW_S, POLL_S = 12, 6, 5.0, 0.02


class Job:
    """A launched run whose processes can be stopped and resumed together; its clock runs only while
    it does, and ``marks`` holds the clock at each metrics line."""

    def __init__(self, name: str, cmd: list[str], out: Path):
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
        self.name, self.out = name, out
        self.log = open(out.with_suffix(".log"), "w")  # noqa: SIM115 - closed in finish()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.clock, self.since, self.marks = 0.0, None, []

    def processes(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def signal(self, sig: int) -> None:
        for _ in range(2):  # a second pass catches a process forked during the first
            for p in self.processes():
                try:
                    p.send_signal(sig)
                except psutil.NoSuchProcess:
                    pass

    def now(self) -> float:
        return self.clock + (time.perf_counter() - self.since if self.since is not None else 0.0)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)
        self.since = time.perf_counter()

    def pause(self) -> None:
        self.signal(signal.SIGSTOP)
        self.clock, self.since = self.now(), None
        self.poll()

    def poll(self) -> None:
        path = self.out / "metrics.jsonl"
        lines = path.read_text().count("\n") if path.exists() else 0
        self.marks += [self.now()] * (lines - len(self.marks))

    def done(self) -> bool:
        return self.proc.poll() is not None

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait()
        self.log.close()

    def finish(self) -> list[dict]:
        code = self.proc.wait(timeout=60)  # every job has ended when interleave() returns
        self.log.close()
        if code != 0:
            tail = self.out.with_suffix(".log").read_text()[-3000:]
            raise RuntimeError(f"the {self.name} job failed ({code}):\n{tail}")
        self.poll()
        return [json.loads(line) for line in (self.out / "metrics.jsonl").read_text().splitlines()]


def interleave(jobs: list[Job]) -> None:
    """Runs one job at a time for WINDOW_S, the others stopped, until all have ended."""
    for job in jobs[1:]:
        job.pause()
    jobs[0].resume()
    turn = 0
    while not all(j.done() for j in jobs):
        job = jobs[turn % len(jobs)]
        if not job.done():
            if job.since is None:
                job.resume()
            end = time.perf_counter() + WINDOW_S
            while time.perf_counter() < end and not job.done():
                time.sleep(POLL_S)
                job.poll()
            if job.done():  # its last line, at the clock of its end, which then stands still
                job.poll()
                job.clock, job.since = job.now(), None
            elif any(not j.done() for j in jobs if j is not job):
                job.pause()
        turn += 1


def round_rates(jobs: list[Job]) -> dict[str, list[float]]:
    """Each ended job's tokens/s in rounds 2.. on its own running clock: round r's input tokens (as the
    job's own tokens_per_s counts them) over the clock between its metrics lines r-1 and r."""
    rates = {}
    for job in jobs:
        recs, marks = job.finish(), job.marks
        tokens = [r["tokens_per_s"] * r["round_time_s"] for r in recs]
        rates[job.name] = [tokens[r] / (marks[r] - marks[r - 1]) for r in range(1, len(recs))]
    return rates


def one_repeat(tmp: Path, model: Path, data: Path, i: int) -> dict:
    rounds = {"train.rounds": str(ROUNDS)}
    local = Job(
        "unsplit",
        [sys.executable, "-m", "launch.train_local", *overrides(model, data, tmp / f"local{i}", **rounds)],
        tmp / f"local{i}",
    )
    split = Job(
        "split",
        torchrun(2, overrides(model, data, tmp / f"split{i}", **{"split.cut_layers": "4"}, **rounds)),
        tmp / f"split{i}",
    )
    jobs = [local, split] if i % 2 == 0 else [split, local]
    try:
        interleave(jobs)
    except BaseException:  # interrupted: no job is left behind, stopped or running
        for job in jobs:
            job.kill()
        raise
    tps = round_rates(jobs)
    ratios = [s / u for s, u in zip(tps["split"], tps["unsplit"])]
    return {
        "first": jobs[0].name,
        "unsplit_tokens_per_s": tps["unsplit"],
        "split_tokens_per_s": tps["split"],
        "ratio_by_round": ratios,
        **interval(ratios),
    }


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="splitft-interleaved-"))
    model = save_random_model("llama", tmp / "model", n_layers=LAYERS, hidden=HIDDEN, heads=8, max_len=SEQ)
    data = tmp / "train.txt"
    write_text_data(data, 400)
    repeats = []
    for i in range(REPEATS):
        repeats.append(one_repeat(tmp, model, data, i))
        print(json.dumps(repeats[-1]), flush=True)
        result = write(repeats)  # after every repeat: a cut-off run keeps what it measured
    print(json.dumps(result["all_rounds"], indent=2))


def write(repeats: list[dict]) -> dict:
    result = {
        "command": " ".join(
            [".venv/bin/python -m benchmarks.investigations.split_interleaved", *sys.argv[1:]]
        ),
        "machine": f"{platform.machine()}, {psutil.cpu_count()} cores, {platform.python_version()}",
        "model": f"random Llama, {LAYERS} layers, hidden {HIDDEN}, seq {SEQ}, batch {BATCH}, float32, CPU",
        "method": f"both jobs alive, {WINDOW_S:g} s turns (SIGSTOP/SIGCONT), rounds 2..{ROUNDS} paired",
        "repeats_done": f"{len(repeats)} of {REPEATS}",
        "repeats": repeats,
        "all_rounds": interval([r for rep in repeats for r in rep["ratio_by_round"]]),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "_" for c in "__".join(sys.argv[1:]))
    name = f"split_interleaved__{slug}.json" if slug else "split_interleaved.json"
    (OUT / name).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
