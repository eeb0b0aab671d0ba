"""The gateway's OpenAPI document: generated from its routes, valid OpenAPI 3.1, and exactly the
routes it serves (no route without an Operation, no operation without a route)."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from openapi_spec_validator import validate
from pydantic import BaseModel

from libs.openapi import Answer, ApiRoutes, Operation, Param, UndocumentedRoute, route_operations
from services.gateway.openapi import DOC_PATHS, RUNNER_PATHS, docs_html, gateway_document
from services.gateway.service import setup_app


def gateway_app() -> web.Application:
    app = web.Application()
    setup_app(app)
    return app


def operations(spec: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}


async def ok(_: web.Request) -> web.Response:
    return web.Response()


class Thing(BaseModel):
    name: str


THING = Operation("getThing", "things", "A thing", (Answer(200, "the thing", Thing),))


def test_the_document_lists_exactly_the_served_routes() -> None:
    app = gateway_app()
    spec = gateway_document(app)
    served = set(route_operations(app, (*DOC_PATHS, *RUNNER_PATHS)))
    assert len(served) == 43
    assert operations(spec) == served
    for path in DOC_PATHS:
        assert any(r.resource is not None and r.resource.canonical == path for r in app.router.routes())


def test_the_document_is_valid_openapi_3_1() -> None:
    spec = gateway_document(gateway_app())
    assert spec["openapi"] == "3.1.0"
    validate(spec)


def test_every_operation_answers_problems_and_names_its_path_parameters() -> None:
    spec = gateway_document(gateway_app())
    ids = set()
    for path, ops in spec["paths"].items():
        for op in ops.values():
            ids.add(op["operationId"])
            assert {"400", "401", "503"} <= set(op["responses"]), (path, op["operationId"])
            named = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert {"{" + n + "}" for n in named} == {s for s in path.split("/") if s.startswith("{")}
            if "requestBody" in op:
                assert {"413", "422"} <= set(op["responses"])
    assert len(ids) == 43  # unique


def test_request_bodies_are_the_models_the_handlers_validate_with() -> None:
    spec = gateway_document(gateway_app())
    schemas = spec["components"]["schemas"]
    assert schemas["NewImapAccount"]["required"] == ["email", "host", "username"]
    for name in ("NewImapAccount", "ImapCredentials"):  # a password or an OAuth2 grant
        assert schemas[name]["oneOf"] == [{"required": ["password"]}, {"required": ["oauth"]}]
    assert schemas["NewImapAccount"]["additionalProperties"] is False
    assert schemas["MessagePatch"]["minProperties"] == 1
    assert schemas["Message"]["properties"]["from"]["anyOf"][0] == {"type": "string"}


def test_a_route_without_an_operation_is_refused() -> None:
    app = gateway_app()
    app.router.add_get("/v1/undocumented", ok)
    with pytest.raises(UndocumentedRoute, match="GET /v1/undocumented"):
        gateway_document(app)


def test_path_parameters_must_match_the_path() -> None:
    app = web.Application()
    api = ApiRoutes()
    api.get("/things/{thing_id}", THING)(ok)
    api.register(app)
    with pytest.raises(UndocumentedRoute, match="getThing"):
        gateway_document(app)

    app = web.Application()
    api = ApiRoutes()
    named = Operation(
        "getThing", "things", "A thing", THING.answers, params=(Param("thing_id", {}, "it", where="path"),)
    )
    api.get("/things/{thing_id}", named)(ok)
    api.register(app)
    spec = gateway_document(app)
    assert spec["paths"]["/things/{thing_id}"]["get"]["responses"]["200"]["content"] == {
        "application/json": {"schema": {"$ref": "#/components/schemas/Thing"}}
    }


def test_the_docs_page_shows_every_path_and_no_outside_script() -> None:
    spec = gateway_document(gateway_app())
    page = docs_html(spec)
    for path in spec["paths"]:
        assert path in page
    assert "<script src" not in page and "https://" not in page
