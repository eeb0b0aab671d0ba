"""The limits of POST /v1/events: part of the API, served by GET /v1/events/limits."""

from __future__ import annotations

from typing import Final

__all__ = ["CONTENT_TYPE", "GC_YOUNG_OBJECTS", "MAX_BODY_BYTES", "MAX_EVENTS_PER_REQUEST", "STAGE"]

MAX_EVENTS_PER_REQUEST: Final = 500
MAX_BODY_BYTES: Final = 1024 * 1024  # the whole request body, enforced by aiohttp's client_max_size
CONTENT_TYPE: Final = "application/json"
STAGE: Final = "ingest"  # the DLQ stage of items rejected here
# The young generation's threshold of the garbage collector in the ingest process (Python's is
# 700): a batch in flight is some 3,000 containers that live until it is answered, so at 700 the
# collector ran several times per request and promoted them, and the full collections it then
# made took a quarter of the CPU (python -m cli.ingest_cpu: 16 -> 12.5 us per event at 10,000).
GC_YOUNG_OBJECTS: Final = 10_000
