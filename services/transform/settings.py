"""transform's settings: the common service settings plus its topics, group and batch limits."""

from __future__ import annotations

from pydantic import Field

from libs.config import ServiceSettings
from libs.kafka import ERASURES, INFLIGHT, POSTFLIGHT, TRANSFORM_STATE

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
    # The broker answers a fetch once it has this many bytes for us, or after the wait: bigger
    # batches, so fewer transactions (each costs a few ms of CPU in round trips), at the cost of
    # up to the wait in latency. The defaults answer at once (aiokafka's); 1048576 bytes and 50 ms
    # made batches 3.5x larger and cut transform's CPU per event by 28-38 % at 5,000 events/s of
    # evenly paced input (cli.transform_cpu: 55.8 -> 49.9 us/event at 7,000, 101.7 -> 81.7 at
    # 2,000). In the pipeline bench, whose load comes in bursts on a 100 ms clock, the batches are
    # large already: at 2,000 events/s they left the transactions as many (151 vs 150) and added
    # 30 ms to the p50 latency (68 vs 38 ms); at 7,000, transform's CPU per event moved within the
    # runs' spread (42.1 vs 43.4-44.3 us). So they stay opt-in, for smoother input.
    transform_fetch_min_bytes: int = Field(default=1, ge=1)
    transform_fetch_max_wait_ms: int = Field(default=500, ge=0)
    transform_session_timeout_ms: int = 10_000
    transform_transaction_timeout_ms: int = 60_000
    transform_error_backoff_s: float = 1.0
    # Raw MIME is parsed in worker processes, each message within a time limit (a message over it
    # is kept with the warning parse_timeout), each worker within an address-space limit. Two
    # workers parsed 3,000 generated messages 2-3 times faster than one on the 2-core bench machine
    # at the same CPU per message (690 vs 730 us): an initial IMAP sync is bound by this parse.
    transform_parse_workers: int = Field(default=2, ge=1)
    transform_parse_timeout_s: float = Field(default=2.0, gt=0)
    # Below the consumer's max.poll.interval (300 s): the rest of a batch is read again after it.
    transform_parse_batch_budget_s: float = Field(default=20.0, gt=0)
    transform_parse_memory_limit_bytes: int = Field(default=1 << 30, ge=64 << 20)
    # How long a final message's state is kept (duplicates and late events within it are told
    # apart from new ones), and a message's that is not final and untouched (an outbound message
    # waiting for its delivery report); then the state is tombstoned (services.transform.worker).
    transform_final_state_ttl_s: float = Field(default=3600.0, ge=0)
    transform_pending_state_ttl_s: float = Field(default=7 * 86400.0, ge=0)
    transform_state_sweep_interval_s: float = Field(default=5.0, gt=0)
    # Erased accounts (libs.erasure), read at start and at every sweep: their states are
    # tombstoned and their records in flight dropped.
    transform_erasures_topic: str = ERASURES

    @property
    def transactional_id(self) -> str:
        """``<group>-<instance id>``: the same for every start of one instance, unique per instance.

        Kafka fences a zombie producer only when its successor initialises the *same*
        transactional id: the epoch bump aborts the zombie's open transaction and refuses its
        next one. An id that changed on restart (a Deployment pod's host name) left a hung
        predecessor free to commit a batch whose partitions had moved on, so the instance id
        must be stable: ``transform-N`` of the Kubernetes StatefulSet, a fixed name in
        docker-compose.yml, the host name of a local process. The group prefix keeps two
        pipelines sharing one Kafka cluster (tests beside ``make dev``) from fencing each other;
        with the default group the id is ``flightlog-transform-<instance id>`` as before.
        """
        return f"{self.transform_group_id}-{self.instance_id}"
