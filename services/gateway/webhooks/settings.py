"""Settings of webhook subscriptions and their dispatcher (``FLIGHTLOG_WEBHOOKS_*``)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from libs.config import ServiceSettings

__all__ = ["WebhookSettings"]


class WebhookSettings(ServiceSettings):
    """The webhook API's limits and the dispatcher's delivery policy (read by the gateway).

    ``webhooks_request_timeout_s`` bounds one delivery attempt; ``webhooks_retry_max_delay_s`` caps
    the backoff between attempts; ``webhooks_consumer_group`` is the dispatcher's group on
    flightlog.changes; ``webhooks_max_endpoints_per_application`` and
    ``webhooks_replay_max_deliveries`` cap the API (endpoints per application, deliveries one replay
    may queue); ``webhooks_response_excerpt_bytes`` is how much of a receiver's answer the delivery
    log keeps.
    """

    # false: the gateway serves the API only, the dispatcher runs as
    # `python -m services.gateway.webhooks` (either way, one instance delivers at a time)
    webhooks_dispatcher_in_gateway: bool = True
    # Targets resolving to loopback, private, link-local or reserved addresses are refused
    # (server-side request forgery) unless the operator allows them, as the tests do.
    webhooks_allow_private_targets: bool = False
    # Fernet keys encrypting endpoint secrets at rest, comma-separated: the first encrypts, all
    # decrypt, so a key rotates by putting the new one first. The default is for development only.
    webhooks_secret_key: str = "diPQwX1kAOUrsxjI_qasspPqoxQQO9KgwwwqZTGQ0Tg="
    webhooks_secret_grace_s: float = 24 * 3600.0  # the old secret's life after a rotation
    webhooks_request_timeout_s: float = 15.0
    webhooks_retry_base_s: float = 5.0  # first retry delay; doubled per attempt, with jitter
    webhooks_retry_max_delay_s: float = 4 * 3600.0
    webhooks_retry_window_s: float = 28 * 3600.0  # then the delivery fails and the endpoint is disabled
    # A delivery refused permanently (4xx but 408 and 429) by an endpoint with ordering
    # skip_refused is tried this many times in a row, then marked failed and its lane goes on;
    # the same count of 410 Gone in a row disables the endpoint.
    webhooks_refused_max_attempts: Annotated[int, Field(ge=1)] = 3
    webhooks_refused_retry_base_s: float = 2.0  # delay after the first refusal, doubled per refusal
    webhooks_max_in_flight_per_endpoint: int = 16  # concurrent requests to one endpoint (across accounts)
    webhooks_rescan_interval_s: float = 2.0  # how often pending work written elsewhere is picked up
    webhooks_consumer_group: str = "flightlog-webhooks"
    webhooks_max_endpoints_per_application: int = 50
    webhooks_replay_max_deliveries: int = 10_000
    webhooks_response_excerpt_bytes: int = 1024
    webhooks_log_retention_s: float = 30 * 24 * 3600.0  # finished deliveries and their attempts
