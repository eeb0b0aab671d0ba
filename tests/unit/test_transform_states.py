from datetime import UTC, datetime

import pytest

from libs.events import Event, EventType
from libs.lifecycle import MessageState, apply
from services.transform.worker import PartitionStates


def _state() -> MessageState:
    event = Event(
        event_id="e1",
        account_id=1 << 48 | 1,
        message_key="m",
        type=EventType.ACCEPTED,
        occurred_at=datetime(2026, 1, 1, tzinfo=UTC),
        source="test",
    )
    state = apply(None, event).state
    assert state is not None
    return state


def test_restored_state_decodes_on_first_read_only() -> None:
    state = _state()
    states = PartitionStates()
    states.put_encoded(b"k", state.model_dump_json().encode())
    assert b"k" in states and len(states) == 1
    first = states.get(b"k")
    assert first == state
    assert states.get(b"k") is first  # decoded once, then kept
    assert states[b"k"] is first


def test_missing_and_removed_keys() -> None:
    states = PartitionStates()
    assert states.get(b"nope") is None
    with pytest.raises(KeyError):
        states[b"nope"]
    states.put_encoded(b"k", b"{}")
    states.pop(b"k")
    states.pop(b"k")  # idempotent, as a tombstone for an unknown key is
    assert b"k" not in states


def test_a_corrupt_restored_state_fails_where_it_is_read() -> None:
    states = PartitionStates()
    states.put_encoded(b"k", b"not json")
    with pytest.raises(ValueError):
        states.get(b"k")
