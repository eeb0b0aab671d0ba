"""``flightlog``: the operator's command line.

flightlog stack up|down|status     the local Kafka, MariaDB clusters and Dovecot
flightlog db migrate               global schema, shard map and shard schemas
flightlog topics create|list       Kafka topics with their partitions and configs
flightlog shards list              the shard map
flightlog services up|down|status  the four services as local processes
flightlog dev                      all of the above, in order: what `make dev` runs
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Annotated

import typer

from cli.dlq import dlq_app
from cli.services import LocalServices, dev_env
from cli.stack import Stack, StackError
from libs.accounts import create_account, create_application
from libs.config import DatabaseSettings, KafkaSettings, StackSettings
from libs.db import connect
from libs.db.migrate import migrate_global, migrate_shard
from libs.kafka import TOPICS, create_topics
from libs.logs import configure_logging
from libs.shards import ShardRouter, load_shard_map, register_clusters

__all__ = ["app", "main"]

logger = logging.getLogger(__name__)

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
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


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


@stack_app.command("up")
def stack_up() -> None:
    """Start Kafka, the MariaDB clusters and Dovecot (harmless when they already run)."""
    stack = Stack()
    try:
        stack.up()
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


async def _migrate(clusters: list[tuple[str, str, int]], shard_count: int) -> None:
    settings = DatabaseSettings()
    async with connect(settings, settings.global_db_host, settings.global_db_port) as conn:
        await migrate_global(conn, settings.global_db_name)
    shard_map = await register_clusters(settings, clusters, shard_count)
    for cluster in shard_map.clusters.values():
        shards = [s for s, c in shard_map.shard_cluster.items() if c == cluster.cluster_id]
        async with connect(settings, *cluster.primary) as conn:
            for shard in sorted(shards):
                await migrate_shard(conn, shard)
        typer.echo(
            f"cluster {cluster.name} ({cluster.primary_host}:{cluster.primary_port}): "
            f"{len(shards)} shards migrated"
        )
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
    clusters = [_parse_cluster(c) for c in cluster] if cluster else Stack().clusters()
    asyncio.run(_migrate(clusters, shards))


@topics_app.command("create")
def topics_create() -> None:
    """Create the flightlog topics that do not exist yet."""
    created = asyncio.run(create_topics(KafkaSettings()))
    typer.echo(f"created: {', '.join(created) if created else 'all topics already existed'}")


@topics_app.command("list")
def topics_list() -> None:
    """The topics flightlog uses, with their partition counts and configs."""
    for spec in TOPICS:
        typer.echo(f"{spec.name:<28} partitions={spec.partitions} {spec.config}")


async def _shard_map_text() -> list[str]:
    settings = DatabaseSettings()
    async with connect(settings, settings.global_db_host, settings.global_db_port) as conn:
        m = await load_shard_map(conn, settings.global_db_name)
    lines = [f"shard map version {m.version}"]
    for shard in m.shards:
        c = m.cluster_of(shard)
        ro = " (read-only)" if shard in m.readonly else ""
        lines.append(f"shard {shard:>5}  cluster {c.name}  {c.primary_host}:{c.primary_port}{ro}")
    return lines


@shards_app.command("list")
def shards_list() -> None:
    """Every logical shard with its cluster and address."""
    for line in asyncio.run(_shard_map_text()):
        typer.echo(line)


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
        LocalServices(env=dev_env()).up()
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
    for name, address, state in LocalServices().status():
        typer.echo(f"{name:<12} {address:<24} {state}")


@app.command("dev")
def dev() -> None:
    """Bring up the stack, apply schemas, create topics and start every service."""
    stack_up()
    db_migrate(cluster=None, shards=StackSettings().shard_count)
    topics_create()
    services_up()
    typer.secho(
        "\nflightlog is running. Gateway: http://127.0.0.1:8080  Ingest: http://127.0.0.1:8081",
        fg=typer.colors.GREEN,
    )
    typer.echo("Stop everything with: make down")


@app.command("bench")
def bench(
    quick: Annotated[bool, typer.Option(help="Shorter runs (a smoke test of the benchmark).")] = False,
    write_md: Annotated[
        bool, typer.Option("--write-md", help="Rewrite BENCHMARKS.md with this run.")
    ] = False,
    json_path: Annotated[str, typer.Option("--json", help="Where to write the JSON report.")] = (
        "bench-results/latest.json"
    ),
    profile: Annotated[
        bool, typer.Option(help="Sample the pipeline services with py-spy during the overload stage.")
    ] = True,
) -> None:
    """Measure every stage beside the raw limits of this machine, in one run (starts what it needs)."""
    from pathlib import Path

    from cli.bench import run_bench, write_benchmarks_md
    from libs.config import REPO_ROOT

    dev()
    out = Path(json_path)
    report = asyncio.run(
        run_bench(
            lambda line: typer.echo(line, err=True),
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
    if write_md:
        command = "flightlog bench --write-md" + (" --quick" if quick else "")
        write_benchmarks_md(report, command, REPO_ROOT / "BENCHMARKS.md")
        typer.echo("BENCHMARKS.md rewritten")


@app.command("down")
def down() -> None:
    """Stop the services, then the stack."""
    services_down()
    stack_down()


def main() -> None:
    configure_logging("console", "INFO")
    try:
        app()
    except StackError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
