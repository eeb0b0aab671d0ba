"""Errors as RFC 9457 problem documents, for every path of the gateway.

Handlers raise :class:`ApiError` (a :class:`libs.http.Problem`); :func:`libs.http.problem_middleware`
turns it, aiohttp's own HTTP errors (unknown path, wrong method, body too large), a database that
cannot be reached (503 with ``Retry-After``) and anything unexpected (500) into
``application/problem+json``: the same middleware for every service.
"""

from __future__ import annotations

from typing import Any

from libs.http import Problem, problem_middleware

__all__ = ["ApiError", "NotFound", "problem_middleware"]


class ApiError(Problem):
    """An answer other than success: status, a short title and a detail for the developer."""

    def __init__(
        self, status: int, title: str, detail: str, *, retry_after_s: int | None = None, **extra: Any
    ) -> None:
        super().__init__(status, title, detail, retry_after_s=retry_after_s, **extra)


class NotFound(ApiError):
    """The same answer for what does not exist and what belongs to another application."""

    def __init__(self, what: str, id_text: str) -> None:
        super().__init__(404, "Not found", f"{what} {id_text} not found")
