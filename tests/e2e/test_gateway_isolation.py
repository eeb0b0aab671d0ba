"""Application A's key against application B's accounts and messages: 404 everywhere, exactly like
an id that does not exist, for B's real ids and for ids guessed from them."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from libs.ids import LOCAL_BITS, MAX_LOCAL, local_of, make_id
from libs.shards import ShardRouter
from tests.e2e import checks
from tests.e2e.gateway_helpers import bearer, gateway, message_ids, record, seed

__all__ = ["gateway"]

pytestmark = pytest.mark.e2e


def guesses(id_: int, own_shard: int) -> list[int]:
    """The real id, its neighbours and the same counter under other shard bits."""
    local = local_of(id_)
    return [id_, id_ + 1, id_ - 1, make_id(own_shard, local), make_id(0, local), make_id(2**16 - 1, local)]


async def answer(
    http: aiohttp.ClientSession, method: str, url: str, key: str
) -> tuple[int, str, dict[str, Any]]:
    kwargs: dict[str, Any] = {"json": {"unread": False}} if method == "PATCH" else {}
    async with http.request(method, url, headers=bearer(key), **kwargs) as resp:
        return resp.status, resp.content_type, await resp.json(content_type=None)


def normalised(body: dict[str, Any], id_: int) -> dict[str, Any]:
    return {**body, "detail": body["detail"].replace(str(id_), "<id>")}


async def test_foreign_ids_answer_like_missing_ones(
    gateway: str, http: aiohttp.ClientSession, tenant_factory: Any, router: ShardRouter
) -> None:
    b = await tenant_factory([13, 13])
    a = await tenant_factory([14])
    a_shard = a.accounts[0].id >> LOCAL_BITS
    await seed(router, [record(acc.id, f"secret{i}") for acc in b.accounts for i in range(3)])
    b_messages = [mid for acc in b.accounts for mid in (await message_ids(router, acc.id)).values()]
    before = {acc.id: await checks.messages(router, acc.id) for acc in b.accounts}
    a_owns = {acc.id for acc in a.accounts}
    a_owns |= {mid for acc in a.accounts for mid in (await message_ids(router, acc.id)).values()}
    missing_account = make_id(13, MAX_LOCAL)
    missing_message = make_id(13, MAX_LOCAL - 1)

    account_paths = ["", "/messages", "/delta", "/delta/latest_cursor", "/delta/stream"]
    for path in account_paths:
        status, ctype, reference = await answer(
            http, "GET", f"{gateway}/v1/accounts/{missing_account}{path}", a.api_key
        )
        assert status == 404 and ctype == "application/problem+json"
        for acc in b.accounts:
            for guess in guesses(acc.id, a_shard):
                if guess in a_owns:  # the same counter on A's shard may be A's own account
                    continue
                status, ctype, body = await answer(
                    http, "GET", f"{gateway}/v1/accounts/{guess}{path}", a.api_key
                )
                assert status == 404 and ctype == "application/problem+json", (path, guess)
                assert normalised(body, guess) == normalised(reference, missing_account), (path, guess)

    for method in ("GET", "PATCH", "DELETE"):
        status, _, reference = await answer(
            http, method, f"{gateway}/v1/messages/{missing_message}", a.api_key
        )
        assert status == 404
        for mid in b_messages:
            for guess in guesses(mid, a_shard):
                if guess in a_owns:
                    continue
                status, _, body = await answer(http, method, f"{gateway}/v1/messages/{guess}", a.api_key)
                assert status == 404, (method, guess)
                assert normalised(body, guess) == normalised(reference, missing_message), (method, guess)

    # B's data is untouched, B still sees it, and A's listing does not show B's accounts.
    assert {acc.id: await checks.messages(router, acc.id) for acc in b.accounts} == before
    for mid in b_messages:
        assert (await answer(http, "GET", f"{gateway}/v1/messages/{mid}", b.api_key))[0] == 200
    _, _, listed = await answer(http, "GET", f"{gateway}/v1/accounts", a.api_key)
    assert [x["id"] for x in listed["data"]] == [str(a.accounts[0].id)]


async def test_a_cursor_never_opens_another_account(
    gateway: str, http: aiohttp.ClientSession, tenant_factory: Any, router: ShardRouter
) -> None:
    b = await tenant_factory([15])
    a = await tenant_factory([15])
    await seed(router, [record(b.accounts[0].id, "x"), record(a.accounts[0].id, "y")])
    async with http.get(f"{gateway}/v1/accounts/{a.accounts[0].id}/delta", headers=bearer(a.api_key)) as resp:
        a_cursor = (await resp.json())["next_cursor"]
    async with http.get(
        f"{gateway}/v1/accounts/{b.accounts[0].id}/delta",
        params={"cursor": a_cursor},
        headers=bearer(a.api_key),
    ) as resp:
        assert resp.status == 404  # ownership is checked before the cursor is even read
    async with http.get(
        f"{gateway}/v1/accounts/{b.accounts[0].id}/delta",
        params={"cursor": a_cursor},
        headers=bearer(b.api_key),
    ) as resp:
        assert resp.status == 400  # B's own key: the cursor is another account's
    async with http.get(
        f"{gateway}/v1/accounts/{a.accounts[0].id}/messages", params={"limit": "1"}, headers=bearer(b.api_key)
    ) as resp:
        assert resp.status == 404
