"""Start-up of every shardchat child process: logging, signals, parent watch."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

LOG_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"

# prctl option from <linux/prctl.h>.
_PR_SET_PDEATHSIG = 1


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr)


def prepare_child(parent_pid: int) -> None:
    """Tie a child's life to its supervisor.

    The child receives SIGTERM if the supervisor dies, even by SIGKILL, so no
    child outlives it. SIGINT is ignored because a Ctrl-C in a terminal reaches
    the whole process group, and the supervisor must stop the children in order.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    # The supervisor may have died before prctl took effect.
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)


def cpu_seconds(pid: int) -> float | None:
    """Return user plus system CPU seconds of ``pid`` from /proc, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            fields = file.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    # Fields 14 and 15 (utime, stime) sit at 11 and 12 after the command name.
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")
