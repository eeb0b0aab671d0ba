"""``flightlog``: the operator's command line.

Its top-level help lists every command with the first line of its docstring (see
:func:`command_lines`), so a command's docstring opens with one sentence that stands alone.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated

import orjson
import typer
from rich.console import Console
from rich.text import Text

from cli import shards as shard_commands
from cli.bench.charts import write_charts
from cli.bench.report import write_benchmarks_md
from cli.bench.runner import STAGES, run_bench, select_stages
from cli.dlq import dlq_app
from cli.progress import Step, Steps, quiet
from cli.services import SERVICE_PORTS, LocalServices, dev_env
from cli.stack import Stack, StackError
from libs.accounts import create_account, create_application
from libs.config import REPO_ROOT, AdminDatabaseSettings, DatabaseSettings, KafkaSettings, StackSettings
from libs.db import connect
from libs.db.migrate import grant_service_user, migrate_global, migrate_shard
from libs.kafka import (
    PRODUCTION_BROKERS,
    TOPICS,
    ReplicationError,
    TopicMismatch,
    create_topics,
    topic_specs,
)
from libs.logs import configure_logging
from libs.shards import ShardRouter, register_clusters

__all__ = ["app", "main"]

logger = logging.getLogger(__name__)

DESCRIPTION = (
    "The operator's command line: the local stack, schemas, topics, services, tenants and the bench."
)

# its help is set below, once every command is registered
app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
stack_app = typer.Typer(help="The local stack (no Docker engine needed).", no_args_is_help=True)
db_app = typer.Typer(help="Schemas and migrations.", no_args_is_help=True)
topics_app = typer.Typer(help="Kafka topics.", no_args_is_help=True)
shards_app = typer.Typer(help="The shard map.", no_args_is_help=True)
services_app = typer.Typer(help="The four services as local processes.", no_args_is_help=True)
apps_app = typer.Typer(help="Applications (tenants) and their API keys.", no_args_is_help=True)
accounts_app = typer.Typer(help="Accounts, placed on shards.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
app.add_typer(db_app, name="db")
app.add_typer(topics_app, name="topics")
app.add_typer(shards_app, name="shards")
app.add_typer(services_app, name="services")
app.add_typer(dlq_app, name="dlq")
app.add_typer(apps_app, name="apps")
app.add_typer(accounts_app, name="accounts")


def package_version() -> str:
    try:
        return version("flightlog")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed: pip install -e .)"


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"flightlog {package_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    pass


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


# One console for every command's steps, so a step nested in another (dev runs the others) only
# prints a line instead of starting a second spinner.
STEPS = Steps()


@stack_app.command("up")
def stack_up() -> None:
    """Start Kafka, the MariaDB clusters and Dovecot (harmless when they already run)."""
    stack = Stack()
    try:
        stack.up(STEPS)
    except StackError as exc:
        _fail(str(exc))
    stack_status()


@stack_app.command("down")
def stack_down() -> None:
    """Stop exactly the processes `stack up` started."""
    stopped = Stack().down()
    typer.echo(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


@stack_app.command("status")
def stack_status() -> None:
    """Each part with its address and whether it answers."""
    parts = Stack().status()
    for st in parts:
        state = "up" if st.running and st.answers else ("running, not answering" if st.running else "down")
        typer.echo(f"{st.name:<12} {st.address:<18} {state}")


def _parse_cluster(text: str) -> tuple[str, str, int]:
    try:
        name, address = text.split("=", 1)
        host, port = address.rsplit(":", 1)
        return name, host, int(port)
    except ValueError:
        raise typer.BadParameter(f"{text!r}: expected NAME=HOST:PORT") from None


def migration_summary(where: str, applied: Sequence[Sequence[int]], *, shards: bool = True) -> str:
    """One line for the migrations of a cluster's shards (or, ``shards=False``, of one schema):
    ``applied`` holds the versions each schema applied."""
    versions = sorted({v for one in applied for v in one})
    head = f"{where}: {len(applied)} shard{'' if len(applied) == 1 else 's'}, " if shards else f"{where}: "
    if not versions:
        return head + "up to date"
    listed = ", ".join(f"{v:04d}" for v in versions)
    text = f"{head}{len(versions)} migration{'' if len(versions) == 1 else 's'} applied ({listed})"
    changed = sum(1 for one in applied if one)
    if shards and changed != len(applied):
        text += f" to {changed} of them"
    return text


async def _migrate(
    clusters: list[tuple[str, str, int]],
    shard_count: int,
    step: Step = quiet,
    replicas: dict[str, tuple[str, int]] | None = None,
) -> None:
    # As the administrative user; each server gets the services' user with data privileges only.
    given = AdminDatabaseSettings()
    settings = given.admin()
    where = f"global schema {settings.global_db_name} ({settings.global_db_host}:{settings.global_db_port})"
    with step(f"{where}: migrating") as line:
        async with connect(settings, settings.global_db_host, settings.global_db_port) as conn:
            line.text = migration_summary(
                where, [await migrate_global(conn, settings.global_db_name)], shards=False
            )
            await grant_service_user(conn, given)
    shard_map = await register_clusters(settings, clusters, shard_count, replicas=replicas)
    for cluster in shard_map.clusters.values():
        shards = sorted(s for s, c in shard_map.shard_cluster.items() if c == cluster.cluster_id)
        where = f"cluster {cluster.name} ({cluster.primary_host}:{cluster.primary_port})"
        with step(f"{where}: migrating {len(shards)} shards") as line:
            async with connect(settings, *cluster.primary) as conn:
                applied = [await migrate_shard(conn, shard) for shard in shards]
                if (cluster.primary_host, cluster.primary_port) != (
                    settings.global_db_host,
                    settings.global_db_port,
                ):
                    await grant_service_user(conn, given)
            line.text = migration_summary(where, applied)
    typer.echo(f"shard map version {shard_map.version}: {len(shard_map.shard_cluster)} shards")


@db_app.command("migrate")
def db_migrate(
    cluster: Annotated[
        list[str] | None,
        typer.Option(help="NAME=HOST:PORT of a cluster; repeat. Default: the local stack's servers."),
    ] = None,
    shards: Annotated[int, typer.Option(help="Number of logical shards.")] = StackSettings().shard_count,
) -> None:
    """Apply the global and shard migrations; register clusters and spread new shards over them."""
    # the local stack's replicas go into the map with their primaries; given clusters have none
    stack = Stack()
    clusters = [_parse_cluster(c) for c in cluster] if cluster else stack.clusters()
    replicas = None if cluster else stack.replica_addresses()
    asyncio.run(_migrate(clusters, shards, STEPS, replicas))


@topics_app.command("create")
def topics_create() -> None:
    """Create the flightlog topics that do not exist yet; report those that differ from the settings."""
    settings = KafkaSettings()
    with STEPS(f"Kafka topics on {settings.kafka_bootstrap_servers}") as line:
        try:
            created = asyncio.run(create_topics(settings))
        except (TopicMismatch, ReplicationError) as exc:
            line.text = "topics: not created"
            _fail(str(exc))
            return
        line.text = (
            f"topics created: {', '.join(created)}"
            if created
            else f"topics: all {len(TOPICS)} already existed"
        )


@topics_app.command("list")
def topics_list() -> None:
    """The topics flightlog uses, with their partition counts (settings, else the defaults on a
    small and on a production cluster) and configs."""
    settings = KafkaSettings()
    small = topic_specs(settings, 1)
    large = topic_specs(settings, PRODUCTION_BROKERS)
    for spec, s, p in zip(TOPICS, small, large, strict=True):
        counts = f"{s.partitions}" if s.partitions == p.partitions else f"{s.partitions}/{p.partitions}"
        setting = f"FLIGHTLOG_{spec.setting.upper()}" if spec.setting else "-"
        typer.echo(f"{spec.name:<28} partitions={counts:<6} ({setting}) {spec.config}")


shards_app.command("list")(shard_commands.list_shards)
shards_app.command("failover")(shard_commands.failover)
shards_app.command("watch")(shard_commands.watch)
shards_app.command("verify")(shard_commands.verify)
shards_app.command("move")(shard_commands.move)
shards_app.command("create")(shard_commands.create)


@apps_app.command("create")
def apps_create(name: str) -> None:
    """Create an application; prints its API key once (it is stored only as a digest)."""

    async def create() -> tuple[int, str]:
        async with ShardRouter(DatabaseSettings()) as router:
            application, key = await create_application(router, name)
            return application.id, key

    app_id, key = asyncio.run(create())
    typer.echo(f"application {app_id}\napi key (shown once): {key}")


@accounts_app.command("create")
def accounts_create(
    application: Annotated[int, typer.Option(help="The owning application's id.")],
    email: Annotated[str, typer.Option(help="The account's address.")],
    shard: Annotated[int | None, typer.Option(help="Place on this shard (default: least loaded).")] = None,
    provider: Annotated[str, typer.Option(help="events or imap")] = "events",
) -> None:
    """Create an account on a shard; its id carries the shard's bits."""

    async def create() -> int:
        async with ShardRouter(DatabaseSettings()) as router:
            account = await create_account(router, application, email, provider=provider, shard=shard)
            return account.id

    account_id = asyncio.run(create())
    typer.echo(f"account {account_id} on shard {account_id >> 48}")


@services_app.command("up")
def services_up() -> None:
    """Start ingest, transform, persist and gateway in the background (logs in the state folder).

    A development stack: webhook targets on loopback and private addresses are allowed."""
    try:
        LocalServices(env=dev_env()).up(STEPS)
    except StackError as exc:
        _fail(str(exc))
    services_status()


@services_app.command("down")
def services_down() -> None:
    """Stop the services (SIGTERM: they drain, then exit)."""
    stopped = LocalServices().down()
    typer.echo(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


@services_app.command("status")
def services_status() -> None:
    """Each service with its address and whether it is ready."""
    for name, address, state in LocalServices().status():
        typer.echo(f"{name:<12} {address:<24} {state}")


def _flightlog_command() -> str:
    """How the user runs this command: ``flightlog`` when it is on the PATH, else the virtualenv's
    script that ``make dev`` installs (the Makefile calls it by path)."""
    if shutil.which("flightlog"):
        return "flightlog"
    script = REPO_ROOT / ".venv" / "bin" / "flightlog"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def next_steps(flightlog: str = "flightlog", now: datetime | None = None) -> list[str]:
    """What a new user types after ``flightlog dev``: an application and its API key, an account,
    an event. The shell variables ($APP, $KEY, $ACCOUNT, as in the README) hold what the command
    before printed."""
    ingest = f"http://127.0.0.1:{SERVICE_PORTS['ingest']}"
    gateway = f"http://127.0.0.1:{SERVICE_PORTS['gateway']}"
    event = {
        "account_id": "ACCOUNT",
        "message_key": "hello-1",
        "type": "message.delivered",
        "occurred_at": (now or datetime.now(UTC)).isoformat(timespec="seconds"),
        "direction": "outbound",
        "content": {
            "from": "me@example.com",
            "to": ["you@example.com"],
            "subject": "hello",
            "body_text": "hello from flightlog",
            "channel": "email",
        },
    }
    # single-quoted JSON, closed around $ACCOUNT so the shell fills in the id
    body = orjson.dumps({"events": [event]}).decode().replace('"ACCOUNT"', "\"'$ACCOUNT'\"")
    return [
        "Next:",
        f"  {flightlog} apps create my-app",
        "      # prints the application's id and its API key, once: APP=<id> KEY=<key>",
        f"  {flightlog} accounts create --application $APP --email me@example.com",
        "      # prints the account's id: ACCOUNT=<id>",
        f"  curl -H \"Authorization: Bearer $KEY\" -H 'Content-Type: application/json' -d '{body}'"
        f" {ingest}/v1/events",
        "      # 202 once Kafka has it; read it back with",
        f'      # curl -H "Authorization: Bearer $KEY" {gateway}/v1/accounts/$ACCOUNT/messages',
    ]


@app.command("dev")
def dev() -> None:
    """Bring up the stack, apply schemas, create topics and start every service."""
    _set_up(services=True)
    typer.secho(
        f"\nflightlog is running. Gateway: http://127.0.0.1:{SERVICE_PORTS['gateway']}"
        f"  Ingest: http://127.0.0.1:{SERVICE_PORTS['ingest']}",
        fg=typer.colors.GREEN,
    )
    for line in next_steps(_flightlog_command()):
        typer.echo(line)
    typer.echo("Stop everything with: make down")


def _set_up(*, services: bool) -> None:
    stack_up()
    db_migrate(cluster=None, shards=StackSettings().shard_count)
    topics_create()
    if services:
        services_up()


BENCH_DOC = "Measure every stage beside the raw limits of this machine, in one run (starts what it needs)."


def _bench_help() -> str:
    """The command's line, then its stages: a paragraph of its own keeps one line per stage."""
    width = max(len(s.name) for s in STAGES)
    stages = "\n".join(f"{s.name.ljust(width)}  {s.summary}" for s in STAGES)
    return f"{BENCH_DOC}\n\nStages, in the order they run (--stages takes their names):\n{stages}"


@app.command("bench", help=_bench_help())
def bench(
    quick: Annotated[bool, typer.Option(help="Shorter runs (a smoke test of the benchmark).")] = False,
    write_md: Annotated[
        bool, typer.Option("--write-md", help="Rewrite BENCHMARKS.md and its charts with this run.")
    ] = False,
    json_path: Annotated[
        str, typer.Option("--json", help="Where to write the JSON report (the charts go beside it).")
    ] = "bench-results/latest.json",
    profile: Annotated[
        bool, typer.Option(help="Sample the pipeline services with py-spy during the overload stage.")
    ] = True,
    stages: Annotated[
        str | None,
        typer.Option(help="Comma-separated stages to run, e.g. transform-memory,gateway (default: all)."),
    ] = None,
) -> None:
    try:
        chosen = select_stages(stages.split(",")) if stages is not None else list(STAGES)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--stages") from None
    if write_md and len(chosen) != len(STAGES):
        # BENCHMARKS.md is one run of every stage; a part of one would drop the others' figures
        raise typer.BadParameter("rewrites the whole file: run every stage with it", param_hint="--write-md")
    # the stages that measure the running services need them; the others start what they measure
    needs_services = any(s.needs == "services" for s in chosen)
    # Services the bench started are stopped at its end: left running, they would hold the change
    # relay's and the webhook dispatcher's leader locks and their consumer groups, which the next
    # thing run here (the tests) must win.
    started = needs_services and not any(svc.running() for svc in LocalServices().services.values())
    _set_up(services=needs_services)
    try:
        # every stage opens shard routers: their "shard map version N" lines would split the progress
        logging.getLogger("libs.shards").setLevel(logging.WARNING)
        out = Path(json_path)
        # progress on stderr, the report on stdout; one console, so the lines a stage prints while
        # its step's spinner runs go above the spinner
        steps = Steps(Console(stderr=True, highlight=False, soft_wrap=True))
        report = asyncio.run(
            run_bench(
                lambda line: steps.console.print(Text(line)),
                step=steps,
                stages=chosen,
                quick=quick,
                profile_dir=out.parent / "profiles" if profile else None,
            )
        )
        typer.echo("\n" + report.table())
        for line in report.profiles:
            typer.echo(f"profile: {line}")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report.to_json())
        typer.echo(f"\nJSON: {out}")
        for chart in write_charts(report, out.parent):
            typer.echo(f"chart: {chart}")
        if write_md:
            command = "flightlog bench --write-md" + (" --quick" if quick else "")
            write_charts(report, REPO_ROOT)  # beside BENCHMARKS.md, which links them
            write_benchmarks_md(report, command, REPO_ROOT / "BENCHMARKS.md")
            typer.echo("BENCHMARKS.md rewritten")
    finally:
        if started:
            services_down()


@app.command("down")
def down() -> None:
    """Stop the services, then the stack."""
    services_down()
    stack_down()


def command_lines(typer_app: typer.Typer = app, prefix: str = "") -> list[tuple[str, str]]:
    """Every command under ``typer_app`` as (its words, the first line of its docstring)."""
    lines: list[tuple[str, str]] = []
    for info in typer_app.registered_groups:
        if info.typer_instance is not None and info.name is not None:
            lines += command_lines(info.typer_instance, f"{prefix}{info.name} ")
    for command in typer_app.registered_commands:
        doc = (command.help or (command.callback.__doc__ if command.callback else None) or "").strip()
        name = command.name or (command.callback.__name__ if command.callback else "")
        lines.append((f"{prefix}{name}", doc.splitlines()[0] if doc else ""))
    return sorted(lines)


def _top_level_help() -> str:
    lines = command_lines()
    width = max(len(words) for words, _ in lines)
    # typer joins the lines of the first paragraph only: the list is a paragraph of its own
    return "\n\n".join([DESCRIPTION, "\n".join(f"{w.ljust(width)}  {doc}" for w, doc in lines)])


app.info.help = _top_level_help()


def main() -> None:
    configure_logging("console", "INFO")
    # The migrations and topics are summarised by the steps above: one line per cluster instead
    # of one per shard and migration. Warnings still show.
    for name in ("libs.db.migrate", "libs.kafka"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        app()
    except StackError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
