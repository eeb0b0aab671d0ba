"""ingest's own settings (``FLIGHTLOG_INGEST_*``), read once at start-up."""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.ingest.constants import MAX_EVENTS_PER_REQUEST

__all__ = ["IngestSettings"]


class IngestSettings(BaseSettings):
    """Per-account rate limits and Kafka patience.

    The rate limit is per ingest replica: with N replicas behind a load balancer an account may
    reach up to N times the rate.
    """

    model_config = SettingsConfigDict(env_prefix="FLIGHTLOG_", extra="ignore", frozen=True)

    ingest_rate_per_account_s: float = Field(default=1000.0, gt=0)
    ingest_burst_per_account: int = Field(default=2000, gt=0)
    ingest_rate_tracked_accounts_max: int = Field(default=100_000, gt=0)
    ingest_produce_timeout_s: float = Field(default=10.0, gt=0)
    ingest_drain_timeout_s: float = Field(default=15.0, gt=0)

    @model_validator(mode="after")
    def _burst_fits_a_batch(self) -> Self:
        # A full batch for one account must be affordable, or waiting would never help.
        if self.ingest_burst_per_account < MAX_EVENTS_PER_REQUEST:
            raise ValueError(
                f"FLIGHTLOG_INGEST_BURST_PER_ACCOUNT must be at least {MAX_EVENTS_PER_REQUEST}"
                " (the largest batch)"
            )
        return self
