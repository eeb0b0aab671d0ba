"""CPU time of the processes a bench stage loads, from ``/proc``: how many CPU seconds (user +
system) each group of processes spent over a window, so a stage can report it per event.

A group is a name and the pids of its processes (two transforms are one group); each pid counts
with its descendants (transform's MIME parse workers), except a descendant that is itself a group's
process (the bench starts the services it measures, so they are its children) or its subtree. A
descendant that exits and is reaped moves its time to its parent's ``cutime``/``cstime``, which
count too, so a worker recycled within the window loses nothing. The machine's own busy time
(``/proc/stat``) is sampled beside them: what no group accounts for is the rest of the machine,
other work on it.

Parsing is pure (:func:`parse_stat`, :func:`tree_ticks`, :func:`machine_busy_ticks`, :func:`usage`)
and tested on recorded samples; :func:`sample` reads ``/proc``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = [
    "CLOCK_TICKS_PER_S",
    "LOAD_GENERATOR",
    "CpuSample",
    "CpuUsage",
    "ProcStat",
    "machine_busy_ticks",
    "parse_stat",
    "read_stats",
    "sample",
    "stack_groups",
    "tree_ticks",
    "usage",
]

CLOCK_TICKS_PER_S: Final = os.sysconf("SC_CLK_TCK")  # the unit of /proc's CPU times (USER_HZ)
PROC: Final = Path("/proc")
LOAD_GENERATOR: Final = "load generator (bench)"  # the bench's own process, as a group


@dataclass(frozen=True, slots=True)
class ProcStat:
    pid: int
    ppid: int
    ticks: int  # utime + stime + cutime + cstime, in clock ticks


def parse_stat(text: str) -> ProcStat:
    """One ``/proc/<pid>/stat`` line. The command name (field 2) is in parentheses and may hold
    spaces and parentheses itself, so the fields after it are found from its last ``)``."""
    head, sep, rest = text.rpartition(")")
    if not sep:
        raise ValueError(f"not a /proc/<pid>/stat line: {text[:80]!r}")
    fields = rest.split()
    # fields[0] is field 3 (state): ppid is field 4, utime..cstime are fields 14..17
    if len(fields) < 15:
        raise ValueError(f"a /proc/<pid>/stat line with {len(fields) + 2} fields: {text[:80]!r}")
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    return ProcStat(int(head.split("(", 1)[0]), int(fields[1]), utime + stime + cutime + cstime)


def read_stats(proc: Path = PROC) -> dict[int, ProcStat]:
    """Every process's stat; a process that exits while being read is left out."""
    stats = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = parse_stat((entry / "stat").read_text())
        except (OSError, ValueError):
            continue
        stats[stat.pid] = stat
    return stats


def tree_ticks(stats: Mapping[int, ProcStat], root: int, stop: frozenset[int] = frozenset()) -> int | None:
    """The ticks of ``root`` and its descendants, not entering the subtree of a pid in ``stop``;
    None when ``root`` is not running."""
    if root not in stats:
        return None
    children: dict[int, list[int]] = {}
    for s in stats.values():
        children.setdefault(s.ppid, []).append(s.pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += stats[pid].ticks
        todo.extend(c for c in children.get(pid, ()) if c not in stop and c != root)
    return total


def machine_busy_ticks(proc_stat: str) -> int:
    """The busy ticks of all CPUs from ``/proc/stat``'s ``cpu`` line: everything but idle and
    iowait (guest time is already in user)."""
    for line in proc_stat.splitlines():
        if line.startswith("cpu "):
            values = [int(v) for v in line.split()[1:]]
            user, nice, system, _idle, _iowait, irq, softirq, steal = (values + [0] * 8)[:8]
            return user + nice + system + irq + softirq + steal
    raise ValueError("no cpu line in /proc/stat")


@dataclass(frozen=True, slots=True)
class CpuSample:
    at_s: float  # time.monotonic()
    ticks: dict[str, int]  # per group whose processes were all running
    machine_ticks: int


def sample(groups: Mapping[str, Sequence[int]], proc: Path = PROC) -> CpuSample:
    """Each group's ticks now; a group with a process that is not running is left out."""
    stats = read_stats(proc)
    roots = frozenset(pid for pids in groups.values() for pid in pids)
    ticks = {}
    for name, pids in groups.items():
        counted = [tree_ticks(stats, pid, roots) for pid in pids]
        if pids and all(t is not None for t in counted):
            ticks[name] = sum(t for t in counted if t is not None)
    return CpuSample(time.monotonic(), ticks, machine_busy_ticks((proc / "stat").read_text()))


@dataclass(frozen=True, slots=True)
class CpuUsage:
    """What each group spent between two samples, in CPU seconds, and the machine beside it."""

    wall_s: float
    seconds: dict[str, float]  # the groups running at both samples, in the order sampled
    machine_s: float  # every process on the machine

    @property
    def rest_s(self) -> float:
        """The machine's CPU time outside the groups: other work, never below zero."""
        return max(0.0, self.machine_s - sum(self.seconds.values()))

    def per_event_us(self, events: int) -> dict[str, float]:
        if events <= 0:
            raise ValueError(f"{events} events")
        return {name: s / events * 1e6 for name, s in self.seconds.items()}

    def cores(self) -> dict[str, float]:
        """Each group's average number of cores busy over the window."""
        return {name: s / self.wall_s for name, s in self.seconds.items()} if self.wall_s > 0 else {}


def usage(before: CpuSample, after: CpuSample, ticks_per_s: int = CLOCK_TICKS_PER_S) -> CpuUsage:
    """CPU seconds per group from ``before`` to ``after``. A group missing from either sample
    (a process restarted or stopped between them) is left out rather than counted from a new
    process's zero."""
    seconds = {
        name: max(0, after.ticks[name] - t) / ticks_per_s
        for name, t in before.ticks.items()
        if name in after.ticks
    }
    return CpuUsage(
        after.at_s - before.at_s, seconds, max(0, after.machine_ticks - before.machine_ticks) / ticks_per_s
    )


def stack_groups() -> dict[str, list[int]]:
    """The stack's servers as groups (Kafka, the MariaDB primaries, their replicas) and the bench's
    own process as the load generator; a group with no running process is left out."""
    from cli.stack import Stack  # the stack module is heavy; /proc parsing is not

    stack = Stack()
    groups = {
        "Kafka": [p for p in (stack.kafka.proc.pid(),) if p is not None],
        "MariaDB primaries": [p for m in stack.mariadb if (p := m.proc.pid()) is not None],
        "MariaDB replicas": [p for m in stack.replicas if (p := m.proc.pid()) is not None],
        LOAD_GENERATOR: [os.getpid()],
    }
    return {name: pids for name, pids in groups.items() if pids}
