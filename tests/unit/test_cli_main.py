"""The command line's own behaviour that needs no server: version, help, the bench's stage
options, the migration summary, the steps' output and what ``flightlog dev`` ends with."""

from __future__ import annotations

import io
import shlex
import time
from datetime import UTC, datetime

import orjson
import pytest
from rich.console import Console
from typer.testing import CliRunner

from cli.bench.runner import STAGES, select_stages
from cli.main import app, command_lines, migration_summary, next_steps, package_version
from cli.progress import Steps
from libs.lifecycle import OutcomeKind, apply
from services.ingest.validation import normalise_item

runner = CliRunner()


def test_version_prints_the_package_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"flightlog {package_version()}"
    assert package_version()[0].isdigit()


def test_top_level_help_lists_every_command_with_its_first_line() -> None:
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    lines = command_lines()
    words = {w for w, _ in lines}
    assert {"dev", "bench", "down", "stack up", "db migrate", "topics create", "apps create"} <= words
    assert {"accounts create", "dlq list", "dlq replay", "services status", "shards list"} <= words
    for w, doc in lines:
        assert doc, f"{w} has no docstring"
        assert f"{w}  " in result.output and doc in result.output


def test_bench_help_lists_the_stages() -> None:
    result = runner.invoke(app, ["bench", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    for stage in STAGES:
        assert stage.name in result.output


def test_select_stages_keeps_run_order_and_names_the_unknown() -> None:
    assert [s.name for s in select_stages(["transform-memory", " raw", ""])] == ["raw", "transform-memory"]
    with pytest.raises(ValueError, match="no stage nope: the stages are raw, pipeline"):
        select_stages(["raw", "nope"])


def test_bench_refuses_an_unknown_stage_and_a_partial_write_md_before_starting_anything() -> None:
    # both refusals come before the set-up, which would start the stack
    result = runner.invoke(app, ["bench", "--stages", "nope"])
    assert result.exit_code == 2 and "no stage nope" in result.output
    result = runner.invoke(app, ["bench", "--stages", "raw", "--write-md"])
    assert result.exit_code == 2 and "every stage" in result.output


def test_migration_summary_is_one_line_per_cluster() -> None:
    where = "cluster c1 (127.0.0.1:3307)"
    assert migration_summary(where, [[]] * 8) == f"{where}: 8 shards, up to date"
    assert (
        migration_summary(where, [[1, 2, 3]] * 8)
        == f"{where}: 8 shards, 3 migrations applied (0001, 0002, 0003)"
    )
    assert (
        migration_summary(where, [[10], []]) == f"{where}: 2 shards, 1 migration applied (0010) to 1 of them"
    )
    assert migration_summary("global schema g (h:1)", [[4, 9]], shards=False) == (
        "global schema g (h:1): 2 migrations applied (0004, 0009)"
    )


def _steps(announce_after_s: float = 3600.0) -> tuple[Steps, io.StringIO]:
    """Steps printing to a string; quick steps are never announced, however loaded the machine."""
    out = io.StringIO()
    return Steps(Console(file=out, force_terminal=False, width=200), announce_after_s=announce_after_s), out


def test_a_quick_step_prints_only_its_outcome() -> None:
    steps, out = _steps()
    with steps("cluster c1: migrating 8 shards") as line:
        line.text = "cluster c1: 8 shards, up to date"
    assert out.getvalue().startswith("✓ cluster c1: 8 shards, up to date (")
    assert out.getvalue().count("\n") == 1


def test_a_slow_step_is_announced_and_a_failed_one_marked() -> None:
    steps, out = _steps(announce_after_s=0.05)
    with pytest.raises(RuntimeError), steps("apt-get install mariadb-server"):
        deadline = time.monotonic() + 30  # slow: still running when the announcement comes
        while "… apt-get" not in out.getvalue():
            assert time.monotonic() < deadline, "the slow step was never announced"
            time.sleep(0.01)
        raise RuntimeError("no network")
    assert out.getvalue().splitlines() == [
        "… apt-get install mariadb-server",
        "✗ apt-get install mariadb-server",
    ]


def test_nested_steps_print_instead_of_a_second_spinner() -> None:
    steps, out = _steps()
    with steps("outer"), steps("inner"):
        pass
    assert [line.split(" (")[0] for line in out.getvalue().splitlines()] == ["✓ inner", "✓ outer"]


def _as_the_shell_runs_it(line: str, **variables: str) -> list[str]:
    for name, value in variables.items():
        line = line.replace(f"${name}", value)
    return shlex.split(line)


def test_dev_ends_with_the_next_three_commands() -> None:
    lines = next_steps(".venv/bin/flightlog", now=datetime(2026, 5, 1, 12, tzinfo=UTC))
    commands = [line.strip() for line in lines if line.startswith("  ") and not line.strip().startswith("#")]
    assert len(commands) == 3
    assert commands[0] == ".venv/bin/flightlog apps create my-app"
    assert commands[1] == ".venv/bin/flightlog accounts create --application $APP --email me@example.com"
    curl = _as_the_shell_runs_it(commands[2], KEY="k3y", ACCOUNT="844424930131969")
    assert curl[0] == "curl" and curl[-1] == "http://127.0.0.1:8081/v1/events"
    assert "Authorization: Bearer k3y" in curl


def test_the_event_in_the_curl_line_is_one_ingest_takes_and_transform_stores() -> None:
    line = next(line for line in next_steps() if "curl" in line and " -d " in line)
    curl = _as_the_shell_runs_it(line.strip(), KEY="k3y", ACCOUNT=str(3 << 48 | 1))
    (item,) = orjson.loads(curl[curl.index("-d") + 1])["events"]
    assert item["account_id"] == str(3 << 48 | 1)
    outcome = apply(None, normalise_item(item))
    assert outcome.kind is not OutcomeKind.REJECTED
    assert outcome.record is not None and outcome.record.message.subject == "hello"
