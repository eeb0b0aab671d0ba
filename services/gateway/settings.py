"""The gateway's settings (``FLIGHTLOG_*`` environment variables, defaults written down here)."""

from __future__ import annotations

from pydantic import Field

from libs.config import ServiceSettings
from libs.kafka import CHANGES, ERASURES

__all__ = ["GatewaySettings"]


class GatewaySettings(ServiceSettings):
    """Everything the gateway reads beyond what every service reads.

    ``gateway_token_secret`` keys the MAC of cursors and page tokens: every gateway replica needs
    the same value, and changing it invalidates every cursor handed out (clients get a 400).

    PATCH and DELETE of a message are lifecycle events through the pipeline (the transform owns
    message versions): the answer waits up to ``gateway_write_wait_s`` for the new version to be
    stored (200), then answers 202 (accepted, still on its way).
    """

    gateway_token_secret: str = "flightlog-dev-token-secret"
    # API keys and account owners are answered from bounded caches (libs.accounts.AccountDirectory):
    # an answer is kept this long, so another gateway process may still accept a revoked key for
    # this long (the process that revoked it refuses it at once).
    gateway_key_cache_ttl_s: float = Field(default=5.0, ge=0)
    # Known keys, and separately known accounts, kept at most (least recently used go first).
    gateway_cache_max_entries: int = Field(default=50_000, ge=1)
    # Unknown keys, and separately unknown accounts, kept at most: a client sending random keys
    # churns only these.
    gateway_cache_max_misses: int = Field(default=10_000, ge=1)
    gateway_max_body_bytes: int = 64 * 1024
    # Where the change notifier learns of changes (services/gateway/notifier.py); delta streams
    # and long-polls read the database only when it wakes them.
    gateway_changes_topic: str = CHANGES
    # The notifier's safety check reads each watched shard's newest change id this often and wakes
    # the shard's streams when a change committed one check ago has still not come through the
    # topic: the longest a lost notification delays a stream is twice this.
    gateway_delta_recheck_s: float = Field(default=5.0, gt=0, le=300)
    # Open delta streams (SSE) per application in each gateway process; one more answers 429 with
    # Retry-After. A slot is given back when the stream ends, its client gone included. An idle
    # stream costs a socket and no query; the default leaves room for the bench's 1,000 streams
    # of one application (flightlog bench --stages streams) on one process.
    gateway_max_streams_per_application: int = Field(default=2000, ge=1)
    # Waiting long-polls (delta with timeout > 0) per application in each gateway process; one
    # more answers 429 with Retry-After. A slot is given back when the poll answers or its client goes.
    gateway_max_long_polls_per_application: int = Field(default=1000, ge=1)
    gateway_sse_heartbeat_s: float = 15.0
    gateway_sse_max_duration_s: float = 3600.0  # then the stream ends; the client resumes
    # The delta log keeps at least this long; older change rows are trimmed (0 keeps them forever).
    gateway_changes_retention_s: float = 7 * 24 * 3600.0
    gateway_trim_interval_s: float = 600.0
    # Message retention (services.gateway.retention): one leader erases the messages older than
    # their application's or account's retention, a pass over every shard each interval (0: no
    # job in this process), in batches of at most batch_rows messages (one transaction each,
    # holding the shard's change-order lock that long), pause_s apart: at most
    # batch_rows / pause_s messages a second, so persist's writes keep their rate.
    gateway_message_retention_interval_s: float = Field(default=300.0, ge=0)
    gateway_message_retention_batch_rows: int = Field(default=200, ge=1, le=5000)
    gateway_message_retention_pause_s: float = Field(default=0.1, ge=0)
    # Account erasures: the topic transform learns of them from (libs.erasure).
    gateway_erasures_topic: str = ERASURES
    gateway_write_wait_s: float = Field(default=5.0, ge=0, le=30)
    gateway_write_poll_interval_s: float = Field(default=0.05, gt=0, le=1)
    gateway_produce_timeout_s: float = Field(default=10.0, gt=0)  # Kafka's acks=all for one event
    # Message lists read from the shard's replica (get by id, the delta feed and writes stay on
    # the primary, where a client reads its own writes). Off by default: a list right after a
    # write may miss it for the replica's milliseconds of apply lag.
    gateway_replica_reads: bool = False
