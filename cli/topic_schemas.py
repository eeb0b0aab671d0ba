"""docs/schemas/*.json: the JSON Schemas of the topics internal consumers read, from the models.

::

    python -m cli.topic_schemas            # write docs/schemas/{inflight,postflight,changes}.json
    python -m cli.topic_schemas --check    # exit 1 if a file is not what the models say

Each schema describes a record's JSON value as its producer writes it, by alias (``content.from``):
an inflight record is the posted event as ``Event`` accepted it (ingest forwards the posted JSON
with ``event_id``, ``received_at`` and ``schema_version`` stamped), so its schema is the model's
validation schema; postflight and changes records are the models' serialization (``exclude_none``:
a field with a non-null default is always there, a null one is left out). The models refuse unknown
fields, but the published contract does not (``additionalProperties`` is dropped): a producer may
add an optional field within a ``schema_version`` and a consumer must ignore fields it does not
know (docs/topics.md, "Compatibility"). ``tests/unit/test_topic_schemas.py`` fails when a file is
stale, so the contract cannot drift from the code.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode
from pydantic_core import core_schema

from libs.events import SCHEMA_VERSION, ChangeRecord, Event, PostflightRecord
from libs.kafka import CHANGES, INFLIGHT, POSTFLIGHT

__all__ = ["SCHEMA_DIR", "TOPIC_SCHEMAS", "TopicSchema", "main", "render", "schema_of"]

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
SCHEMA_DIR: Final = REPO_ROOT / "docs" / "schemas"
DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"


@dataclass(frozen=True, slots=True)
class TopicSchema:
    topic: str
    model: type[BaseModel]
    key: str  # what the record's Kafka key is
    mode: JsonSchemaMode  # what the producer writes: what the model accepts, or what it dumps

    @property
    def file_name(self) -> str:
        return f"{self.topic.removeprefix('flightlog.')}.json"


TOPIC_SCHEMAS: Final = (
    TopicSchema(INFLIGHT, Event, "<account_id>:<message_key> (UTF-8)", "validation"),
    TopicSchema(POSTFLIGHT, PostflightRecord, "<account_id>:<message_key> (UTF-8)", "serialization"),
    TopicSchema(CHANGES, ChangeRecord, "<account_id> (UTF-8)", "serialization"),
)


class _ProducedJsonSchema(GenerateJsonSchema):
    """Serialization schemas of records dumped with ``exclude_none``: a field whose default is not
    None is always written, so it is required; one that defaults to None may be absent."""

    def field_is_required(
        self,
        field: core_schema.ModelField | core_schema.DataclassField | core_schema.TypedDictField,
        total: bool,
    ) -> bool:
        if self.mode != "serialization" or field["type"] == "typed-dict-field":
            return super().field_is_required(field, total)
        inner = field["schema"]
        return inner["type"] != "default" or inner.get("default", True) is not None


def _open(node: Any) -> Any:
    """``node`` without ``additionalProperties: false`` anywhere (the contract tolerates new fields)."""
    if isinstance(node, dict):
        return {k: _open(v) for k, v in node.items() if not (k == "additionalProperties" and v is False)}
    if isinstance(node, list):
        return [_open(v) for v in node]
    return node


def schema_of(spec: TopicSchema) -> dict[str, Any]:
    body = _open(
        spec.model.model_json_schema(by_alias=True, mode=spec.mode, schema_generator=_ProducedJsonSchema)
    )
    # Every producer writes it (ingest stamps it on what was posted): a consumer may rely on it.
    body["required"] = ["schema_version", *(f for f in body["required"] if f != "schema_version")]
    return {
        "$schema": DIALECT,
        "$id": f"https://flightlog.invalid/schemas/{spec.file_name}",
        "title": f"{spec.topic} record (schema_version {SCHEMA_VERSION})",
        "description": (
            f"The JSON value of a {spec.topic} record; Kafka key: {spec.key}. "
            "Generated from "
            f"{spec.model.__module__}.{spec.model.__qualname__} by `python -m cli.topic_schemas`; "
            "compatibility rules in docs/topics.md."
        ),
        **{k: v for k, v in body.items() if k not in ("title", "description")},
    }


def render(spec: TopicSchema) -> str:
    return json.dumps(schema_of(spec), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cli.topic_schemas", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a file is stale; write nothing")
    parser.add_argument("--output", type=Path, default=SCHEMA_DIR, help="directory of the schema files")
    args = parser.parse_args(argv)
    stale = []
    for spec in TOPIC_SCHEMAS:
        path: Path = args.output / spec.file_name
        text = render(spec)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print(
            f"out of date: {', '.join(stale)}; run `python -m cli.topic_schemas` and commit", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
