"""Every limit of the public API, in one place (the OpenAPI document quotes these)."""

from __future__ import annotations

from typing import Final

MAX_BODY_BYTES: Final = 64 * 1024
MAX_QUERY_STRING_LENGTH: Final = 4096
MAX_PARAM_LENGTH: Final = 512
MAX_ADDRESS_LENGTH: Final = 320
MAX_FOLDER_LENGTH: Final = 255
MAX_CHANNEL_LENGTH: Final = 32

DEFAULT_PAGE_SIZE: Final = 50
MAX_PAGE_SIZE: Final = 200
DEFAULT_DELTA_PAGE_SIZE: Final = 100
MAX_DELTA_PAGE_SIZE: Final = 500
MAX_ACCOUNTS_PAGE_SIZE: Final = 500
# A thread's participants are read from its latest messages, this many at most, and list this
# many people at most (services.gateway.threads): both bound a read that a long thread would not.
THREAD_PARTICIPANT_MESSAGES: Final = 20
MAX_THREAD_PARTICIPANTS: Final = 100

MAX_LONG_POLL_S: Final = 30
MIN_SSE_HEARTBEAT_S: Final = 1
MAX_SSE_HEARTBEAT_S: Final = 60
# Retry-After of a stream or long-poll refused for its application's limit: a slot may free at
# any moment (a long-poll lasts MAX_LONG_POLL_S at most), so soon, but not in a tight loop.
BUSY_RETRY_AFTER_S: Final = 5

MAX_ACTIVE_KEYS: Final = 20

# Message retention an application or account may set: from an hour (the retention job's passes
# are minutes apart) to a century; none keeps messages for ever.
MIN_RETENTION_S: Final = 3600
MAX_RETENTION_S: Final = 100 * 365 * 86400
