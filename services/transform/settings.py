"""transform's settings: the common service settings plus its topics, group and batch limits."""

from __future__ import annotations

from libs.config import ServiceSettings
from libs.kafka import INFLIGHT, POSTFLIGHT, TRANSFORM_STATE

__all__ = ["GROUP_ID", "TransformSettings"]

GROUP_ID = "flightlog-transform"


class TransformSettings(ServiceSettings):
    """``FLIGHTLOG_TRANSFORM_*``; topics and group are overridable so tests can run beside ``make dev``."""

    transform_group_id: str = GROUP_ID
    transform_inflight_topic: str = INFLIGHT
    transform_postflight_topic: str = POSTFLIGHT
    transform_state_topic: str = TRANSFORM_STATE
    transform_max_batch_records: int = 1000
    transform_poll_timeout_ms: int = 100
    transform_session_timeout_ms: int = 10_000
    transform_transaction_timeout_ms: int = 60_000
    transform_error_backoff_s: float = 1.0

    @property
    def transactional_id(self) -> str:
        return f"flightlog-transform-{self.instance_id}"
