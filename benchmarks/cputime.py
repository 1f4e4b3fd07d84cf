"""Read the CPU time of a process tree from /proc (Linux only).

The utime and stime fields of /proc/PID/stat cover every thread of the
process, and cutime and cstime cover its children that have exited and
been reaped. Children not yet reaped are read one by one. A process is
counted either by itself or, once reaped, in its parent's cutime and
cstime, so the difference of two readings is the CPU time the whole tree
used in between.

NOTE: a reading misses a child that is reaped between the listing of
/proc and the read of its parent, and children of a parent that ignores
SIGCHLD never reach cutime. Neither matters for the benchmark today:
kmsproxy starts no child processes, and mitmdump 11.0.2 ran as one
process (two threads) during a transfer.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

PROC = Path("/proc")

# Clock ticks per second (USER_HZ), the unit of the times in /proc/PID/stat.
# It is 100 on x86-64 Linux, so a reading has a resolution of 10 ms.
CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")

# Positions in /proc/PID/stat after the ")" that closes the command name,
# which may itself contain spaces (proc(5) numbers them from 1 with pid and
# comm first, so field 4 here is index 1).
_PPID = 1
_UTIME = 11
_STIME = 12
_CUTIME = 13
_CSTIME = 14


def _stat_fields(pid: int) -> list[str]:
    text = (PROC / str(pid) / "stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def _ticks(fields: list[str]) -> int:
    return sum(int(fields[i]) for i in (_UTIME, _STIME, _CUTIME, _CSTIME))


def descendants(pid: int) -> list[int]:
    """Return the PIDs of the processes below `pid` not yet reaped, at any depth."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        # A process may exit between the listing and the read.
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            parent = int(_stat_fields(int(entry.name))[_PPID])
            children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    pending = [pid]
    while pending:
        child_pids = children.get(pending.pop(), [])
        found += child_pids
        pending += child_pids
    return found


def tree_cpu_seconds(pid: int) -> float:
    """Return the user plus system CPU seconds of `pid` and its children.

    The total covers every thread and child process since each started,
    except the children the module's NOTE names. Raises FileNotFoundError
    if `pid` has been reaped.
    """
    ticks = _ticks(_stat_fields(pid))
    for child in descendants(pid):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            ticks += _ticks(_stat_fields(child))
    return ticks / CLOCK_TICKS_PER_SECOND
