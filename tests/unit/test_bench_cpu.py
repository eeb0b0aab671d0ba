"""The bench's CPU accounting from /proc (cli.bench.cpu): stat lines, process trees, the machine's
busy time, and what a group spent between two samples, on recorded samples and a fake /proc."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cli.bench.cpu import (
    CpuSample,
    ProcStat,
    machine_busy_ticks,
    parse_stat,
    read_stats,
    sample,
    tree_ticks,
    usage,
)


def _stat(pid: int, comm: str, ppid: int, utime: int, stime: int, cutime: int = 0, cstime: int = 0) -> str:
    # a real line's shape: 52 fields, the command name in parentheses
    after = ["S", str(ppid), str(pid), str(pid), "0", "-1", "4194560", "9776", "0", "0", "0"]
    after += [str(utime), str(stime), str(cutime), str(cstime), "20", "0", "1", "0", "1151301"]
    return f"{pid} ({comm}) " + " ".join(after + ["0"] * 32) + "\n"


RECORDED = (
    "32681 (bash) S 32680 32681 32681 0 -1 4194560 9776 156820 0 24 2 6 655 83 20 0 1 0 1151301 "
    "5259264 987 18446744073709551615 94876053049344 94876053838749 140725415818608 0 0 0 65536 4 "
    "1132560123 1 0 0 17 1 0 0 0 0 0 94876054072048 94876054120292 94876361744384 140725415820125 "
    "140725415820140 140725415820140 140725415821290 0\n"
)
PROC_STAT = (
    "cpu  909933 0 136126 1238585 10021 0 18269 1050 0 0\n"
    "cpu0 454966 0 68063 619292 5010 0 9134 525 0 0\n"
    "intr 1 2 3\n"
)


def test_parse_a_recorded_stat_line() -> None:
    # utime 2, stime 6, cutime 655, cstime 83
    assert parse_stat(RECORDED) == ProcStat(32681, 32680, 2 + 6 + 655 + 83)


def test_a_command_name_with_spaces_and_parentheses_does_not_shift_the_fields() -> None:
    line = _stat(7, "python (worker) 2)", 1, utime=30, stime=12, cutime=5, cstime=1)
    assert parse_stat(line) == ProcStat(7, 1, 48)


def test_a_line_that_is_not_a_stat_line_is_refused() -> None:
    with pytest.raises(ValueError):
        parse_stat("no parenthesis here")
    with pytest.raises(ValueError):
        parse_stat("12 (short) S 1 2 3")


@given(st.text(min_size=0, max_size=30), st.integers(0, 10**9), st.integers(0, 10**9))
def test_any_command_name_parses(comm: str, utime: int, stime: int) -> None:
    line = _stat(99, comm.replace("\n", " "), 3, utime, stime)
    assert parse_stat(line) == ProcStat(99, 3, utime + stime)


STATS = {
    1: ProcStat(1, 0, 1_000),  # init: never counted
    10: ProcStat(10, 1, 100),  # the bench
    11: ProcStat(11, 10, 50),  # a service the bench started: a group of its own
    12: ProcStat(12, 11, 7),  # that service's worker
    13: ProcStat(13, 10, 3),  # a helper of the bench's own
    20: ProcStat(20, 1, 400),  # Kafka
}


def test_a_tree_counts_descendants_but_not_other_groups_roots() -> None:
    roots = frozenset({10, 11, 20})
    assert tree_ticks(STATS, 10, roots) == 100 + 3
    assert tree_ticks(STATS, 11, roots) == 50 + 7
    assert tree_ticks(STATS, 20, roots) == 400
    assert tree_ticks(STATS, 10) == 100 + 50 + 7 + 3  # with nothing to stop at: the whole tree
    assert tree_ticks(STATS, 99, roots) is None


def test_machine_busy_ticks_leave_idle_and_iowait_out() -> None:
    assert machine_busy_ticks(PROC_STAT) == 909933 + 0 + 136126 + 0 + 18269 + 1050
    assert machine_busy_ticks("cpu  5 0 5 100\n") == 10  # an old kernel's four fields
    with pytest.raises(ValueError):
        machine_busy_ticks("intr 1 2 3\n")


def test_usage_between_two_samples() -> None:
    before = CpuSample(100.0, {"ingest": 1_000, "transform": 500, "Kafka": 2_000}, 10_000)
    after = CpuSample(110.0, {"ingest": 1_250, "transform": 600, "persist": 10}, 10_600)
    used = usage(before, after, ticks_per_s=100)
    # persist was not running at the first sample and Kafka not at the second: neither counts
    assert used.seconds == {"ingest": 2.5, "transform": 1.0}
    assert used.wall_s == 10.0
    assert used.machine_s == 6.0
    assert used.rest_s == pytest.approx(2.5)
    assert used.per_event_us(50_000) == {"ingest": 50.0, "transform": 20.0}
    assert used.cores() == {"ingest": 0.25, "transform": 0.1}
    with pytest.raises(ValueError):
        used.per_event_us(0)


def test_a_restarted_process_counts_as_nothing_rather_than_negative_time() -> None:
    before = CpuSample(0.0, {"transform": 5_000}, 0)
    after = CpuSample(1.0, {"transform": 20}, 50)  # a new process, counting from zero
    assert usage(before, after, ticks_per_s=100).seconds == {"transform": 0.0}


def _fake_proc(root: Path, lines: dict[int, str], proc_stat: str = PROC_STAT) -> Path:
    for pid, line in lines.items():
        (root / str(pid)).mkdir(parents=True)
        (root / str(pid) / "stat").write_text(line)
    (root / "self").mkdir()  # not a pid: skipped
    (root / "77").mkdir()  # a process that exited while /proc was read: no stat file
    (root / "stat").write_text(proc_stat)
    return root


def test_sample_reads_groups_from_a_fake_proc(tmp_path: Path) -> None:
    proc = _fake_proc(
        tmp_path,
        {
            10: _stat(10, "python", 1, 80, 20),
            11: _stat(11, "python -m services.transform", 10, 40, 10),
            12: _stat(12, "python", 11, 5, 2),
            21: _stat(21, "python -m services.transform", 10, 3, 0),
            20: _stat(20, "java", 1, 300, 100),
        },
    )
    assert set(read_stats(proc)) == {10, 11, 12, 20, 21}
    got = sample({"bench": [10], "transform": [11, 21], "Kafka": [20], "gone": [999], "none": []}, proc)
    # two transforms are one group; a group with a process not running, or none, is left out
    assert got.ticks == {"bench": 100, "transform": 57 + 3, "Kafka": 400}
    assert got.machine_ticks == machine_busy_ticks(PROC_STAT)


def test_sample_of_this_process_on_the_real_proc() -> None:
    first = sample({"me": [os.getpid()]})
    sum(i * i for i in range(200_000))  # some CPU time of our own
    second = sample({"me": [os.getpid()]})
    used = usage(first, second)
    assert set(used.seconds) == {"me"}
    assert used.seconds["me"] >= 0 and used.wall_s > 0


async def test_the_idle_stage_reads_a_core_share_through_the_same_accounting() -> None:
    from cli.bench.idle import _core_share

    share = await _core_share(os.getpid(), 0.05)
    assert 0.0 <= share <= (os.cpu_count() or 1)
    with pytest.raises(RuntimeError, match="stopped"):
        await _core_share(2**22 + 1, 0.0)  # above the kernel's default pid_max: never running
