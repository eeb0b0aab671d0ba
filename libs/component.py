"""The shape every long-lived client and worker shares: ``start()``, idempotent ``stop()``, ``async with``."""

from __future__ import annotations

from types import TracebackType
from typing import Self

__all__ = ["Component"]


class Component:
    """Subclasses implement ``start()`` and an idempotent ``stop()``; ``async with`` calls them."""

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
