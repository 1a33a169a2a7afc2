"""The one log format of every process: a rank prefix on each line, transformers kept quiet."""

from __future__ import annotations

import logging


def setup_logging(rank: int) -> None:
    """INFO lines stamped to the millisecond and prefixed ``[rank R server|clientR]``; replaces any
    handler set before (``force``). Silences transformers' progress bars and its info/warning logs."""
    role = "server" if rank == 0 else f"client{rank}"
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s.%(msecs)03d [rank {rank} {role}] %(message)s",
        datefmt="%H:%M:%S",
        # milliseconds: recovery timings (benchmarks/recovery.py) are read from these stamps
        force=True,
    )
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
