"""The limits of POST /v1/events: part of the API, served by GET /v1/events/limits."""

from __future__ import annotations

from typing import Final

__all__ = ["CONTENT_TYPE", "MAX_BODY_BYTES", "MAX_EVENTS_PER_REQUEST", "STAGE"]

MAX_EVENTS_PER_REQUEST: Final = 500
MAX_BODY_BYTES: Final = 1024 * 1024  # the whole request body, enforced by aiohttp's client_max_size
CONTENT_TYPE: Final = "application/json"
STAGE: Final = "ingest"  # the DLQ stage of items rejected here
