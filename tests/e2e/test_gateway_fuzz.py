"""Property-based fuzzing of the running gateway against its own /openapi.json (schemathesis).

Every operation gets a bounded number of positive and negative cases, authenticated with a real
tenant's key (the operator's key on admin paths). Path ids are drawn both at random and from the
tenant's real accounts and messages, so success answers are checked against the schema too.
Checks: no 5xx, every status, content type, header and body as documented, and negative data
refused with a 4xx.

Keys are set through schemathesis's auth hook, so a negative case that drops or mangles the
Authorization header is sent as generated (and must get 401), not with the key put back.

Each run draws new cases and prints its seed; ``FLIGHTLOG_FUZZ_SEED=<seed>`` repeats them.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import random
from typing import Any
from urllib.request import urlopen

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.result import Ok

from cli.services import management_address
from libs.shards import ShardRouter
from services.gateway.admin import ADMIN_PREFIX
from tests.e2e.gateway_helpers import gateway, message_ids, record, seed, thread_ids, varied

__all__ = ["gateway"]

pytestmark = pytest.mark.e2e

EXAMPLES_PER_OPERATION = 25
DOVECOT_PLAIN_PORT = 1144
ADMIN_KEY = "flightlog-dev-admin-key"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def fuzzable(spec: dict[str, Any], ids: dict[str, list[str]], mode: GenerationMode) -> dict[str, Any]:
    """The served document, narrowed where fuzzing it whole would only wait: the endless SSE
    stream is left to its own tests, and real ids join the random ones.

    Positive cases also cap long-poll timeouts and point the IMAP accounts they create at the
    local plain-text Dovecot, where random credentials fail at once, not at random hosts that
    would be retried for ever. Negative cases must not see those narrowings: a value outside
    them (a timeout of 1 s, another port) is valid for the API, and accepting it is no fault.
    Their long polls go without ``timeout`` (the shortest default wait), and the bodies they
    send are invalid, so no account is created."""
    spec = copy.deepcopy(spec)
    del spec["paths"]["/v1/accounts/{account_id}/delta/stream"]
    positive = mode is GenerationMode.POSITIVE
    for ops in spec["paths"].values():
        for op in ops.values():
            params = [p for p in op.get("parameters", []) if positive or p["name"] != "timeout"]
            for param in params:
                if param["name"] == "timeout":
                    param["schema"]["maximum"] = 0.2
                # An erasure gets an account of its own: erasing the others would leave the
                # operations fuzzed after it nothing but 404s.
                name = "erasable_account_id" if op.get("operationId") == "eraseAccount" else param["name"]
                if param["in"] == "path" and name in ids:
                    param["schema"] = {"anyOf": [{"enum": ids[name]}, param["schema"]]}
            if "parameters" in op:
                op["parameters"] = params
    if positive:
        imap = spec["components"]["schemas"]["NewImapAccount"]
        imap["properties"] |= {
            "host": {"type": "string", "enum": ["127.0.0.1"]},
            "port": {"type": "integer", "enum": [DOVECOT_PLAIN_PORT]},
            "tls_mode": {"type": "string", "enum": ["none"]},
        }
        imap["required"] = [*imap["required"], "port", "tls_mode"]
    return spec


def load_spec(base_url: str) -> dict[str, Any]:
    with urlopen(f"{management_address(base_url)}/openapi.json", timeout=5) as resp:
        spec: dict[str, Any] = json.load(resp)
    return spec


def fuzz_seed() -> int:
    """``FLIGHTLOG_FUZZ_SEED``, a seed to repeat; else a new one."""
    given_seed = os.environ.get("FLIGHTLOG_FUZZ_SEED")
    return int(given_seed) if given_seed else random.SystemRandom().randrange(2**32)


@schemathesis.check
def negative_data_refused(ctx: Any, response: Any, case: schemathesis.Case[Any]) -> bool | None:
    """schemathesis's negative-data check, with 413 counted as a refusal: a body over the size
    limit is refused before its schema is looked at (a random run sent 430 KB of bad webhook)."""
    if response.status_code == 413:
        return None
    result: bool | None = negative_data_rejection(ctx, response, case)
    return result


def fuzz_operation(
    base_url: str,
    operation: schemathesis.APIOperation[Any, Any, Any, Any],
    mode: GenerationMode,
    run_seed: int,
) -> None:
    checks = [*CHECKS, negative_data_refused] if mode is GenerationMode.NEGATIVE else CHECKS

    @hypothesis.seed(run_seed)
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case: schemathesis.Case[Any]) -> None:
        case.call_and_validate(base_url=base_url, checks=checks, timeout=10)

    check()


def run_fuzz(
    base_url: str, served: dict[str, Any], ids: dict[str, list[str]], app_key: str, run_seed: int
) -> list[str]:
    failures: list[str] = []
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        schema = schemathesis.openapi.from_dict(fuzzable(served, ids, mode))

        # refresh_interval=None: the key depends on the operation, so it is not cached across them
        @schema.auth(refresh_interval=None)
        class Keys:
            """The operator's key on admin paths, the tenant's elsewhere; schemathesis leaves it
            out of the negative cases that remove or mutate the Authorization header."""

            def get(self, case: schemathesis.Case[Any], ctx: Any) -> str:
                return ADMIN_KEY if case.operation.path.startswith(ADMIN_PREFIX) else app_key

            def set(self, case: schemathesis.Case[Any], data: str, ctx: Any) -> None:
                case.headers["Authorization"] = f"Bearer {data}"

        for result in schema.get_all_operations():
            assert isinstance(result, Ok), result
            operation = result.ok()
            # the admin operations are served on the management port
            admin = operation.path.startswith(ADMIN_PREFIX)
            try:
                fuzz_operation(management_address(base_url) if admin else base_url, operation, mode, run_seed)
            except Exception as exc:
                failures.append(f"{operation.method.upper()} {operation.path} ({mode.value}): {exc}")
    return failures


async def test_fuzz_against_openapi(gateway: str, tenant_factory: Any, router: ShardRouter) -> None:
    tenant = await tenant_factory([1, 2, 3])
    account = tenant.accounts[0].id
    await seed(router, varied(account, 20))
    await seed(router, [record(account, f"t{i}", thread_key=f"fuzz-thread-{i % 3}") for i in range(6)])
    mids = list((await message_ids(router, account)).values())
    served = await asyncio.to_thread(load_spec, gateway)
    ids = {
        "account_id": [str(a.id) for a in tenant.accounts[:2]],
        "erasable_account_id": [str(tenant.accounts[2].id)],
        "message_id": [str(m) for m in mids[:10]],
        "thread_id": [str(t) for t in await thread_ids(router, account)],
    }
    run_seed = fuzz_seed()
    print(f"\nfuzz seed {run_seed} (FLIGHTLOG_FUZZ_SEED={run_seed} repeats these cases)")
    failures = await asyncio.to_thread(run_fuzz, gateway, served, ids, tenant.api_key, run_seed)
    assert not failures, f"FLIGHTLOG_FUZZ_SEED={run_seed} repeats this run\n\n" + "\n\n".join(failures)
