"""Strict query-string parsing: unknown, repeated, too long or malformed parameters are a 400."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from aiohttp import web

from services.gateway.constants import MAX_PARAM_LENGTH
from services.gateway.errors import ApiError

__all__ = ["Query"]


def _bad(detail: str) -> ApiError:
    return ApiError(400, "Invalid parameter", detail)


class Query:
    """The query parameters of one request, checked against the names the operation takes."""

    def __init__(self, request: web.Request, allowed: Iterable[str]) -> None:
        self._query = request.query
        allowed = set(allowed)
        for name in self._query:
            if name not in allowed:
                known = ", ".join(sorted(allowed)) or "none"
                raise _bad(f"unknown parameter {name[:40]!r} (this operation takes: {known})")
            if len(self._query.getall(name)) > 1:
                raise _bad(f"{name} is given more than once")

    def text(self, name: str, *, max_length: int = MAX_PARAM_LENGTH, min_length: int = 1) -> str | None:
        value = self._query.get(name)
        if value is None:
            return None
        if not min_length <= len(value) <= max_length:
            raise _bad(f"{name} must be {min_length} to {max_length} characters long")
        return value

    def choice(self, name: str, options: Sequence[str]) -> str | None:
        value = self._query.get(name)
        if value is not None and value not in options:
            raise _bad(f"{name} must be one of {', '.join(options)}")
        return value

    def boolean(self, name: str) -> bool | None:
        value = self._query.get(name)
        if value is None:
            return None
        if value not in ("true", "false"):
            raise _bad(f"{name} must be true or false")
        return value == "true"

    def integer(self, name: str, default: int, minimum: int, maximum: int) -> int:
        value = self._query.get(name)
        if value is None:
            return default
        if (
            not value.isascii()
            or not value.isdigit()
            or len(value) > 12
            or not minimum <= int(value) <= maximum
        ):
            raise _bad(f"{name} must be an integer from {minimum} to {maximum}")
        return int(value)

    def number(self, name: str, default: float, minimum: float, maximum: float) -> float:
        value = self._query.get(name)
        if value is None:
            return default
        try:
            parsed = float(value) if len(value) <= 32 else None
        except ValueError:
            parsed = None
        if parsed is None or not minimum <= parsed <= maximum:
            raise _bad(f"{name} must be a number from {minimum:g} to {maximum:g}")
        return parsed
