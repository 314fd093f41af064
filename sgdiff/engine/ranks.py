"""Where this process stands in a multi-process run, from the environment (cheap: no torch import)."""

from __future__ import annotations

import os

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def under_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def is_writer_rank() -> bool:
    """False on the ranks of a torchrun run other than 0 (they stay quiet and write nothing)."""
    return not under_torchrun() or os.environ["RANK"] == "0"
