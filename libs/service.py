"""The one runner every flightlog service starts through.

It installs uvloop, configures logging, serves ``/healthz`` and ``/readyz`` on the service's port
(beside the service's own routes, if it has any) and ``/metrics`` on its management port (with the
service's ``management_paths``: the gateway's docs and admin routes), runs the service's ``main`` and
handles SIGTERM and SIGINT the same way everywhere: set ``ctx.stopping`` so the service stops
taking input and finishes or hands back its batch, wait up to ``drain_timeout_s`` for ``main`` to
return, then cancel it, and give the resources ``close_timeout_s`` to close. A second signal
cancels at once.

The HTTP app is built the same way for every service (:func:`build_app`): the problem middleware
outermost, so every error of every route is a problem document; the readiness gate; the body's
deadline (``http_body_timeout_s``, :func:`libs.http.body_deadline`); the health routes; then
the service's ``setup_app``, which adds its routes and the cleanup contexts that open their
resources (each resource a typed ``web.AppKey``). aiohttp enters those contexts in
order before the port opens and leaves them in reverse after the last request, so a handler
never sees a resource that is not open. ``main`` runs once the port is open: the workers that
are not requests (consumers, dispatchers, trimmers) live there.

A service's own routes answer 503 until it calls ``ctx.set_ready()``.

Its connections (:func:`make_runner`) give a request's line and headers ``http_head_timeout_s``
and close idle keep-alive connections after ``http_keepalive_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import resource
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final

import prometheus_client
import prometheus_client.multiprocess
import uvloop
from aiohttp import web
from pydantic_settings import BaseSettings

from libs.config import InsecureSettings, ServiceSettings, insecure_secrets
from libs.http import Problem, ProblemAppRunner, body_deadline, problem_middleware
from libs.logs import configure_logging

__all__ = [
    "HEALTH_PATHS",
    "MANAGEMENT_PORT_OFFSET",
    "MULTIPROCESS_DIR",
    "PROBE_PATHS",
    "STOPPING",
    "ServiceContext",
    "ServiceDefinition",
    "build_app",
    "check_secrets",
    "make_runner",
    "management_port",
    "raise_open_files_limit",
    "run_service",
    "serve",
]

logger = logging.getLogger(__name__)

HEALTH_PATHS: Final = frozenset({"/healthz", "/readyz", "/metrics"})
# Answered on both ports: probes and load balancers check the public one.
PROBE_PATHS: Final = frozenset({"/healthz", "/readyz"})
# The management port's default: the service's HTTP port plus this (8080 -> 9080).
MANAGEMENT_PORT_OFFSET: Final = 1000
# prometheus_client's multiprocess mode: where every process of the service keeps its metrics
MULTIPROCESS_DIR: Final = "PROMETHEUS_MULTIPROC_DIR"
# Set on SIGTERM: long-lived responses (long polls, event streams) end when they see it.
STOPPING: Final = web.AppKey("stopping", asyncio.Event)


@dataclass(slots=True)
class ServiceContext:
    """What a running service gets from the runner."""

    name: str
    settings: ServiceSettings
    app: web.Application
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    ready: bool = False
    ready_checks: list[Callable[[], bool]] = field(default_factory=list)
    # Requests that arrive on this local port are the management port's (set by ``serve``;
    # in-process tests set it to their test server's port to reach the management routes).
    management_port: int = -1

    def set_ready(self) -> None:
        self.ready = True

    def is_ready(self) -> bool:
        return self.ready and not self.stopping.is_set() and all(c() for c in self.ready_checks)


@dataclass(frozen=True, slots=True)
class ServiceDefinition:
    """A service: its name, default port, its HTTP app's setup and its ``main`` coroutine.

    ``setup_app`` adds the service's routes, middlewares and cleanup contexts (its resources) to
    the app the runner built. ``main`` opens the service's workers, calls ``ctx.set_ready()``,
    works until ``ctx.stopping`` is set and then drains and closes before returning.
    """

    name: str
    default_port: int
    main: Callable[[ServiceContext], Coroutine[Any, Any, None]]
    setup_app: Callable[[web.Application], None] | None = None
    client_max_size: int = 1024**2
    # The garbage collector's young-generation threshold once the service is up (Python's is
    # 700). A batch in flight is thousands of containers freed by reference counting; at 700 the
    # cyclic collector ran several times per batch, promoted them, and the full collections that
    # followed took a quarter of ingest's CPU and a sixth of persist's (BENCHMARKS.md).
    gc_young_objects: int = 10_000
    # The secrets the service uses beyond the database password, as (settings class, field):
    # in production it refuses to start while one is built-in or short (run_service).
    secrets: tuple[tuple[type[BaseSettings], str], ...] = ()
    # Paths (exact, or a prefix when they end with "/") served on the management port only, besides
    # /metrics: for operators, never on the public port.
    management_paths: tuple[str, ...] = ()

    def is_management(self, path: str) -> bool:
        return path == "/metrics" or any(
            path.startswith(p) if p.endswith("/") else path == p for p in self.management_paths
        )


def _health_routes(ctx: ServiceContext) -> list[web.RouteDef]:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "service": ctx.name})

    async def readyz(_: web.Request) -> web.Response:
        ready = ctx.is_ready()
        # the pid tells apart the processes that share a port (a supervisor waits for each)
        return web.json_response(
            {"status": "ready" if ready else "not ready", "service": ctx.name, "pid": os.getpid()},
            status=200 if ready else 503,
        )

    registry = prometheus_client.REGISTRY
    if MULTIPROCESS_DIR in os.environ:
        # Several processes share the port (and this directory): a scrape reaches one of them,
        # which answers for all (counters and histograms summed, gauges per pid).
        registry = prometheus_client.CollectorRegistry()
        prometheus_client.multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]

    async def metrics(_: web.Request) -> web.Response:
        body = prometheus_client.generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})

    return [web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", metrics)]


def _ready_gate(ctx: ServiceContext) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def gate(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path not in HEALTH_PATHS and not ctx.ready:
            raise Problem(503, "Service starting", f"{ctx.name} is not ready yet", retry_after_s=1)
        return await handler(request)

    return gate


def _port_split(ctx: ServiceContext, defn: ServiceDefinition) -> Callable[..., Awaitable[web.StreamResponse]]:
    """404 for a management path on the public port and for any other path on the management
    port, as if the route did not exist there."""

    @web.middleware
    async def split(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        path = request.path
        if path not in PROBE_PATHS:
            sockname = request.transport.get_extra_info("sockname") if request.transport else None
            on_management = sockname is not None and sockname[1] == ctx.management_port
            if defn.is_management(path) != on_management:
                raise Problem(404, "Not Found", f"no resource at {path}")
        return await handler(request)

    return split


def management_port(defn: ServiceDefinition, settings: ServiceSettings) -> int:
    """The port of the management routes: ``management_port``, else the HTTP port plus
    :data:`MANAGEMENT_PORT_OFFSET`."""
    return settings.management_port or (settings.http_port or defn.default_port) + MANAGEMENT_PORT_OFFSET


def build_app(defn: ServiceDefinition, settings: ServiceSettings) -> ServiceContext:
    """The service's HTTP app, as the runner serves it (in-process tests serve it the same way)."""
    app = web.Application(client_max_size=defn.client_max_size)
    ctx = ServiceContext(defn.name, settings, app)
    app[STOPPING] = ctx.stopping
    app.middlewares.extend(
        [
            problem_middleware,
            _port_split(ctx, defn),
            _ready_gate(ctx),
            body_deadline(settings.http_body_timeout_s),
        ]
    )
    app.add_routes(_health_routes(ctx))
    if defn.setup_app is not None:
        defn.setup_app(app)
    return ctx


def make_runner(app: web.Application, settings: ServiceSettings) -> ProblemAppRunner:
    """The runner of a service's app, with the settings' limits on slow and idle clients."""
    return ProblemAppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=5.0,
        head_timeout_s=settings.http_head_timeout_s,
        keepalive_timeout=settings.http_keepalive_timeout_s,
    )


async def serve(defn: ServiceDefinition, settings: ServiceSettings) -> None:
    ctx = build_app(defn, settings)
    app = ctx.app

    loop = asyncio.get_running_loop()
    gc_threshold = gc.get_threshold()  # put back on the way out (in-process tests serve too)
    runner = make_runner(app, settings)
    # The app's cleanup contexts open its resources here, before the port opens.
    setup_task = asyncio.ensure_future(runner.setup())
    main_task: asyncio.Task[None] | None = None

    def on_signal(signum: int) -> None:
        if ctx.stopping.is_set():
            logger.warning("second %s: cancelling without draining", signal.Signals(signum).name)
            (main_task or setup_task).cancel()
            return
        logger.info(
            "%s received: draining (up to %.0f s)", signal.Signals(signum).name, settings.drain_timeout_s
        )
        ctx.stopping.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    try:
        try:
            await setup_task
        except asyncio.CancelledError:
            if not setup_task.cancelled():
                raise  # cancelled from outside, not by a second signal
            logger.warning("%s stopped while opening its resources", defn.name)
            return
        port = settings.http_port or defn.default_port
        ctx.management_port = management_port(defn, settings)
        for host, site_port in ((settings.http_host, port), (settings.management_host, ctx.management_port)):
            site = web.TCPSite(
                runner, host, site_port, reuse_address=True, reuse_port=settings.http_reuse_port or None
            )
            await site.start()
        # What exists now (modules, schemas, pools, clients) stays out of every later collection.
        gc.collect()
        gc.freeze()
        gc.set_threshold(defn.gc_young_objects, *gc_threshold[1:])
        logger.info(
            "%s listening on http://%s:%d, management on http://%s:%d",
            defn.name, settings.http_host, port, settings.management_host, ctx.management_port,
        )  # fmt: skip
        main_task = asyncio.create_task(defn.main(ctx), name=f"{defn.name}-main")
        stop_wait = asyncio.create_task(ctx.stopping.wait())
        done, _ = await asyncio.wait({main_task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if main_task not in done:
            try:
                await asyncio.wait_for(asyncio.shield(main_task), settings.drain_timeout_s)
            except TimeoutError:
                logger.error("drain timed out after %.0f s; cancelling", settings.drain_timeout_s)
                main_task.cancel()
        stop_wait.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await main_task  # re-raises a crash of main, so the process exits non-zero
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        gc.unfreeze()
        gc.set_threshold(*gc_threshold)
        try:
            # A producer's stop() flushes its batches, and an idempotent producer retries them as
            # long as Kafka is away. What it still held was never acknowledged to anyone (ingest
            # answers 202 only after Kafka's ack), so giving up on it loses nothing.
            await asyncio.wait_for(runner.cleanup(), settings.close_timeout_s)
        except TimeoutError:
            logger.error(
                "closing resources timed out after %.0f s; exiting without", settings.close_timeout_s
            )
        if MULTIPROCESS_DIR in os.environ:
            prometheus_client.multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
        logger.info("%s stopped", defn.name)


def run_service(defn: ServiceDefinition) -> None:
    """Entry point for ``python -m services.<name>``: refuses to start in production with a
    built-in or short secret (exit status 2, the variables named), else serves until SIGTERM."""
    settings = ServiceSettings()
    configure_logging(settings.log_format, settings.log_level)
    try:
        check_secrets(defn, settings)
    except InsecureSettings as exc:
        logger.critical("%s", exc)
        sys.exit(2)
    raise_open_files_limit()
    uvloop.run(serve(defn, settings))


def check_secrets(defn: ServiceDefinition, settings: ServiceSettings) -> None:
    """Raise :class:`InsecureSettings` naming every built-in or short secret ``defn`` uses, unless
    ``FLIGHTLOG_ENVIRONMENT`` is ``development``."""
    if settings.environment == "development":
        return
    instances: dict[type[BaseSettings], BaseSettings] = {ServiceSettings: settings}
    secrets: list[tuple[BaseSettings, str]] = [(settings, "db_password")]
    for cls, name in defn.secrets:
        secrets.append((instances.setdefault(cls, cls()), name))
    problems = insecure_secrets(secrets)
    if problems:
        raise InsecureSettings(
            f"{defn.name} refuses to start in production: "
            + "; ".join(problems)
            + ". For a local development stack set FLIGHTLOG_ENVIRONMENT=development."
        )


def raise_open_files_limit() -> int:
    """Raise the soft limit on open files to the hard one and return it: ingest holds one IMAP
    connection per synced account, and many systems start processes at a soft limit of 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
