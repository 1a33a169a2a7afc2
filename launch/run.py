"""The front door: checks a run once, then starts it with torchrun's own launcher, in this process.

    python -m launch.run CONFIG [key=value ...] --nproc-per-node N [torchrun options]
    splitft-run torchrun_configs/demo.yaml train.rounds=3 --nproc-per-node 5

The same job as ``torchrun --nproc-per-node N [torchrun options] -m launch.train CONFIG [key=value ...]``
(which keeps working), with two differences:

- Before any worker starts, this process checks the config against the launch (world size
  ``nnodes x nproc-per-node``), the model folder (``builtin:tiny`` is built here, once), the LoRA
  targets, the output folder (single-node launches; on several nodes rank 0 checks it) and the data
  (read and partitioned as client 1 would). A bad input is one line and exit code 2, and no process
  group is started. The output folder's lock (``runtime/outdir.py``) is only looked at here: held by a
  running job, the launch is refused; free, it is left free, because the job's rank 0 (a process
  of its own) takes it and holds it for its life, and a lock held here would make that rank 0 find
  the folder taken. Two front doors racing for one folder are told apart by their rank 0s: the
  second one's rank 0 finds the lock held and its job fails with that one line. Results to move
  aside (``runtime.overwrite=true``) are moved by rank 0 too, not here.
- When the job fails, it prints the root cause once, as one line: the first failed rank's message
  (from its torchelastic error file) and its exit code, instead of torchrun's failure banner. The
  exit code is the rank's when it is one of the project's (2: fix the input; 75: stopped by a
  signal, relaunch to continue; 76: a peer was lost, relaunch to continue; 77: the job stalled or a rank
  never joined, relaunch to continue), else 1. A stop signal
  to this process (SIGTERM, SIGUSR1 from Slurm) is passed on to the workers by torchrun and ends
  it with 75. A restart (``--max-restarts``) is one line with the failure that caused it.

Every torchrun option is passed through by its full name (``--nnodes=2 --rdzv-backend=c10d
--rdzv-endpoint=HOST:PORT --max-restarts=3 ...``); ``LOGLEVEL=INFO`` shows torchrun's own log unfiltered.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from runtime.faults import EXIT_PEER_LOST, EXIT_PREEMPTED, EXIT_STALLED, EXIT_USER_ERROR, STOP_SIGNALS

PROG = "launch.run"
ENTRY = "launch.train"
PROJECT_EXIT_CODES = (EXIT_USER_ERROR, EXIT_PREEMPTED, EXIT_PEER_LOST, EXIT_STALLED)
# launch.train reads it: under the front door a rank's user error goes to its error file only, and this
# process says it (once, whichever rank failed first)
FRONT_DOOR_ENV = "SPLITFT_FRONT_DOOR"
# The front door always runs ``-m launch.train``.
NOT_HERE = ("-m", "--module", "--no-python", "--no_python", "--run-path", "--run_path")
# torchrun log lines that the root-cause line replaces (per-rank failure reports, the agent stopping workers)
NOISE = ("failed (exitcode", "Sending process", "Closing process", "Received ", "config has no run_id")


def say(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def usage_error(message: str) -> SystemExit:
    """A wrong command line: one line and exit 2, like argparse's own errors."""
    say(message)
    return SystemExit(EXIT_USER_ERROR)


def split_argv(argv: list[str], parser: argparse.ArgumentParser) -> tuple[list[str], list[str]]:
    """(torchrun options, launch.train arguments): an option is a token starting with '-' that names
    one of torchrun's options (full name); it takes the next token as its value unless it is a flag
    or is written ``--opt=value``."""
    actions = parser._option_string_actions  # argparse's table of option strings
    options: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if not token.startswith("-") or token == "-":
            rest.append(token)
            continue
        name = token.split("=", 1)[0]
        if name in NOT_HERE:
            raise usage_error(f"{name} is not an option here: the front door always runs -m {ENTRY}")
        if name not in actions:
            raise usage_error(
                f"unknown option {name}: torchrun's options are passed by their full name "
                "(python -m torch.distributed.run --help lists them)"
            )
        options.append(token)
        if "=" not in token and actions[name].nargs != 0:
            if i >= len(argv):
                raise usage_error(f"{name} needs a value")
            options.append(argv[i])
            i += 1
    return options, rest


def launch_size(args: argparse.Namespace) -> tuple[int, int]:
    """(processes per node, most nodes) of the launch; the config is checked against their product."""
    from torch.distributed.run import determine_local_world_size, parse_min_max_nnodes

    _, max_nodes = parse_min_max_nnodes(args.nnodes)
    return determine_local_world_size(args.nproc_per_node), max_nodes


def check(train_args: list[str], world_size: int, single_node: bool) -> None:
    """launch.train's own checks, once, here; a bad input ends this process with one line and exit 2."""
    from launch import train
    from runtime.job import client_data
    from runtime.outdir import OutputDirError

    try:
        cfg = train.parse(train_args)
        model_path = train.check(cfg, world_size, output_dir=single_node)
    except OutputDirError as e:
        raise train.user_error("output_dir", e, True) from None
    except train.INPUT_ERRORS as e:
        raise train.user_error("config", e, True) from None
    try:
        client_data(cfg, model_path, 0, cfg.n_clients(world_size))
    except train.INPUT_ERRORS as e:
        raise train.user_error("data", e, True) from None


class TorchrunLog(logging.Filter):
    """Passes torchrun's warnings and errors through but drops the per-rank failure lines that the root
    cause replaces; a restart becomes one line with the failure that caused it (from the error files)."""

    def __init__(self, log_dir: str):
        super().__init__()
        self.log_dir = log_dir
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "attempts left" in message:
            cause = self.new_failure()
            left = re.search(r"(\d+)/(\d+) attempts left", message)
            restarts = f" ({left.group(1)} of --max-restarts={left.group(2)} left)" if left else ""
            say(f"a worker failed; restarting the workers{restarts}" + (f": {cause}" if cause else ""))
            return False
        return record.levelno >= logging.WARNING and not message.startswith(NOISE)

    def new_failure(self) -> str | None:
        """The earliest message among the error files that appeared since the last call."""
        found = []
        for path in glob.glob(os.path.join(self.log_dir, "*", "attempt_*", "*", "error.json")):
            if path in self.seen:
                continue
            self.seen.add(path)
            try:
                data = json.loads(Path(path).read_text())
            except (OSError, ValueError):
                continue
            message = data.get("message")
            timestamp = (
                int(message.get("extraInfo", {}).get("timestamp", 0)) if isinstance(message, dict) else 0
            )
            found.append((timestamp, one_line(message)))
        return min(found)[1] if found else None


def quiet_torchrun(log_dir: str) -> None:
    """Routes the torchrun loggers through ``TorchrunLog`` (unless LOGLEVEL asks for torchrun's own log)."""
    if "LOGLEVEL" in os.environ:
        return
    import torch.distributed.elastic.agent.server.api  # noqa: F401  (creates its logger)

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("torchrun: %(message)s"))
    handler.addFilter(TorchrunLog(log_dir))
    for name in ("torch.distributed.elastic", "torch.distributed.launcher", "torch.distributed.run"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.propagate = False
    # the restart line is logged at INFO
    logging.getLogger("torch.distributed.elastic.agent.server.api").setLevel(logging.INFO)


def one_line(message) -> str:
    if isinstance(message, dict):
        message = message.get("message", "")
    lines = [line.strip() for line in str(message or "").splitlines() if line.strip()]
    return lines[0] if lines else ""


def root_cause(failures: dict) -> tuple[int, int, str]:
    """(rank, exit code, message) of the failure that came first. A rank that stopped because a peer
    went away or because it was told to stop is a consequence: it is the root cause only if no other
    rank failed."""

    def order(item):
        rank, failure = item
        return (failure.exitcode in (EXIT_PEER_LOST, EXIT_PREEMPTED), failure.timestamp, rank)

    rank, failure = min(failures.items(), key=order)
    message = one_line(failure.message) if failure.error_file_data.get("message") != "<NONE>" else ""
    if not message:
        if failure.exitcode < 0:
            message = f"killed by {failure.signal_name()}"
        elif failure.exitcode == EXIT_PEER_LOST:
            message = "a peer stopped answering (named in the log above): relaunch to continue"
        elif failure.exitcode == EXIT_PREEMPTED:
            message = "stopped by a signal (the last complete round is checkpointed): relaunch to continue"
        else:
            message = "no error file (see the rank's output above)"
    return rank, failure.exitcode, message


def exit_code(code: int) -> int:
    return code if code in PROJECT_EXIT_CODES else 1


def launch(args: argparse.Namespace) -> int:
    """Runs the job with torchrun's ``run``; returns this process's exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import run

    try:
        run(args)
    except ChildFailedError as e:
        rank, code, message = root_cause(e.failures)
        say(f"rank {rank} failed with exit code {code}: {message}")
        return exit_code(code)
    except SignalException as e:
        sig = signal.Signals(e.sigval)
        stop = sig in STOP_SIGNALS
        say(
            f"stopped by {sig.name}"
            + ("; the last complete round's checkpoint is kept: relaunch to continue" if stop else "")
        )
        return EXIT_PREEMPTED if stop else 128 + sig.value
    except RendezvousError as e:
        say(f"rendezvous failed: {type(e).__name__}: {e}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.run import get_args_parser

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    parser = get_args_parser()
    options, train_args = split_argv(argv, parser)
    if not train_args:
        raise usage_error(f"give a config: {PROG} CONFIG [key=value ...] --nproc-per-node N")
    args = parser.parse_args([*options, "-m", ENTRY, *train_args])
    nproc, nodes = launch_size(args)
    check(train_args, nproc * nodes, single_node=nodes == 1)

    own_log_dir = args.log_dir is None
    if own_log_dir:  # where the workers' error files go (torchrun makes one too; this one is removed)
        args.log_dir = tempfile.mkdtemp(prefix="splitft-run-")
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", FRONT_DOOR_ENV)}  # the workers' only
    if nproc > 1:  # torchrun's default, without its banner
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ[FRONT_DOOR_ENV] = "1"
    quiet_torchrun(args.log_dir)
    try:
        code = launch(args)
    finally:
        if own_log_dir:
            shutil.rmtree(args.log_dir, ignore_errors=True)
        for k, v in saved.items():  # main() may be called in a process that goes on (the tests)
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    raise SystemExit(code)


if __name__ == "__main__":
    main()
