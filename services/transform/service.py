"""transform: inflight lifecycle events into postflight records, exactly once (port 8082)."""

from __future__ import annotations

from libs.service import ServiceContext, ServiceDefinition
from services.transform.settings import TransformSettings
from services.transform.worker import TransformWorker

__all__ = ["DEFINITION"]


async def main(ctx: ServiceContext) -> None:
    settings = TransformSettings()
    worker = TransformWorker.from_settings(settings)
    ctx.ready_checks.append(lambda: worker.ready)
    async with worker:
        ctx.set_ready()  # readiness also waits for the assigned partitions' states (ready_checks)
        await worker.run(ctx.stopping)


DEFINITION = ServiceDefinition(name="transform", default_port=8082, main=main)
