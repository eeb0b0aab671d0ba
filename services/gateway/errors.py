"""Errors as RFC 9457 problem documents, for every path of the gateway.

Handlers raise :class:`ApiError` (a :class:`libs.http.Problem`); the problem middleware that the
service runner installs for every service (:func:`libs.http.problem_middleware`) turns it,
aiohttp's own HTTP errors (unknown path, wrong method, body too large), a database that cannot
be reached (503 with ``Retry-After``) and anything unexpected (500) into
``application/problem+json``.

Exceptions::

    libs.http.Problem
    └── ApiError          an answer of the gateway's API
        └── NotFound      404, the same for what is missing and what belongs to someone else
"""

from __future__ import annotations

from libs.http import Problem

__all__ = ["ApiError", "NotFound"]


class ApiError(Problem):
    """An answer other than success: status, a short title and a detail for the developer."""


class NotFound(ApiError):
    """The same answer for what does not exist and what belongs to another application."""

    def __init__(self, what: str, id_text: str) -> None:
        super().__init__(404, "Not found", f"{what} {id_text} not found")
