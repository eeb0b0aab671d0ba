"""Raw MIME through the services as processes: POST /v1/events -> transform parses -> persist
writes the MIME columns -> the gateway serves them."""

from __future__ import annotations

import base64
from hashlib import sha256
from typing import Any

import aiohttp
import orjson
import pytest

from libs.ids import shard_of
from libs.shards import ShardRouter
from tests.e2e.client import event, post_events
from tests.e2e.conftest import Pipeline
from tests.polling import eventually

pytestmark = pytest.mark.e2e

ROOT = (
    b"From: =?utf-8?q?J=C3=BCrgen_M=C3=BCller?= <j@example.de>\r\n"
    b'To: a@example.org, "=?koi8-r?b?8NLJ18XU?=" <b@example.org>\r\n'
    b"Subject: =?iso-8859-1?q?caf=E9?= =?utf-8?b?44GT44KT44Gr44Gh44Gv?=\r\n"
    b"Message-ID: <root@mime.test>\r\n"
    b'Content-Type: multipart/mixed; boundary="XX"\r\n\r\n'
    b'--XX\r\nContent-Type: multipart/alternative; boundary="YY"\r\n\r\n'
    b"--YY\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello  w\xc3\xb6rld,\r\n  see attached.\r\n"
    b"--YY\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>Hello <b>w\xc3\xb6rld</b></p>\r\n--YY--\r\n"
    b"--XX\r\nContent-Type: application/pdf\r\n"
    b'Content-Disposition: attachment; filename="=?utf-8?q?r=C3=A9sum=C3=A9.pdf?="\r\n'
    b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(bytes(range(256)) * 40) + b"\r\n"
    b"--XX\r\nContent-Type: image/png\r\nContent-ID: <logo@x>\r\nContent-Disposition: inline\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=\r\n--XX--\r\n"
)
REPLY = (
    b"From: a@example.org\r\nTo: j@example.de\r\nSubject: Re: =?utf-8?q?caf=C3=A9?=\r\n"
    b"Message-ID: <reply@mime.test>\r\nIn-Reply-To: <root@mime.test>\r\nReferences: <root@mime.test>\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n\r\n<div>Thanks &amp; <i>bye</i></div>\r\n"
)
BROKEN = (
    b"Subject: =?utf-8?q?half=\r\nFrom: <@>\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
    b"--b\r\nContent-Type: text/plain; charset=no-such-charset\r\n\r\nstill readable\r\n"
)


def synced(account_id: int, key: str, raw: bytes, step: int, **content: Any) -> dict[str, Any]:
    return event(
        account_id, key, "synced", step=step, source="imap",
        content={"raw_mime": base64.b64encode(raw).decode(), **content},
        flags={"unread": True, "folder": "INBOX"},
    )  # fmt: skip


async def mime_rows(router: ShardRouter, account_id: int) -> dict[str, dict[str, Any]]:
    shard = shard_of(account_id)
    pool = await router.pool(shard)
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "SELECT message_key, id, subject, sender, snippet, channel, thread_key, size_bytes, attachments,"
            f" parse_warnings FROM {router.table(shard, 'messages')} WHERE account_id = %s",
            (account_id,),
        )
        rows = await cur.fetchall()
        await conn.commit()
    cols = ("id", "subject", "sender", "snippet", "channel", "thread_key", "size_bytes", "attachments",
            "parse_warnings")  # fmt: skip
    return {bytes(r[0]).decode(): dict(zip(cols, r[1:], strict=True)) for r in rows}


async def test_raw_mime_is_parsed_stored_and_served(
    pipeline: Pipeline, router: ShardRouter, tenant_factory: Any
) -> None:
    tenant = await tenant_factory([router.shard_map.shards[0]])
    account = tenant.accounts[0].id
    auth = {"Authorization": f"Bearer {tenant.api_key}"}
    async with aiohttp.ClientSession() as http:
        status, body = await post_events(
            http, pipeline.url("ingest"), tenant.api_key,
            [
                synced(account, "root", ROOT, 0, size_bytes=len(ROOT)),
                synced(account, "reply", REPLY, 1),
                synced(account, "broken", BROKEN, 2),
            ],
        )  # fmt: skip
        assert status == 202, body
        # raw_mime that is not base64 is refused at ingest, with the field named.
        status, body = await post_events(
            http, pipeline.url("ingest"), tenant.api_key,
            [event(account, "bad", "synced", content={"raw_mime": "not base64!"})],
        )  # fmt: skip
        assert status == 422, body
        assert [e["field"] for e in body["errors"]] == ["content.raw_mime"]

        async def landed() -> bool:
            return set(await mime_rows(router, account)) == {"root", "reply", "broken"}

        await eventually(landed, 60, "the parsed messages' rows")
        rows = await mime_rows(router, account)
        root = rows["root"]
        assert root["subject"] == "caféこんにちは" and root["sender"] == "j@example.de"
        assert root["snippet"] == "Hello wörld, see attached." and root["channel"] == "email"
        assert root["size_bytes"] == len(ROOT) and len(root["thread_key"]) == 32
        assert rows["reply"]["thread_key"] == root["thread_key"]
        assert rows["reply"]["snippet"] == "Thanks & bye"  # from the HTML: it has no text part
        assert [a["filename"] for a in orjson.loads(root["attachments"])] == ["résumé.pdf", None]
        assert root["parse_warnings"] is None and orjson.loads(rows["broken"]["parse_warnings"])

        url = f"{pipeline.url('gateway')}/v1/messages/{root['id']}"
        async with http.get(url, headers=auth) as resp:
            assert resp.status == 200, await resp.text()
            msg = await resp.json()
        assert msg["id"] == str(root["id"]) and msg["account_id"] == str(account)
        assert msg["subject"] == "caféこんにちは" and msg["from"] == "j@example.de"
        assert msg["to"] == ["a@example.org", "b@example.org"]
        assert msg["snippet"] == "Hello wörld, see attached." and msg["body_text"].startswith("Hello  wörld")
        assert "<b>wörld</b>" in msg["body_html"]
        assert msg["thread_key"] == root["thread_key"] and msg["size_bytes"] == len(ROOT)
        assert msg["attachments"] == [
            {"filename": "résumé.pdf", "content_type": "application/pdf", "size_bytes": 256 * 40,
             "content_id": None, "inline": False, "sha256": sha256(bytes(range(256)) * 40).hexdigest()},
            {"filename": None, "content_type": "image/png", "size_bytes": 8, "content_id": "logo@x",
             "inline": True, "sha256": sha256(base64.b64decode("iVBORw0KGgo=")).hexdigest()},
        ]  # fmt: skip
        assert msg["participants"]["from"] == [{"name": "Jürgen Müller", "email": "j@example.de"}]
        assert msg["participants"]["to"] == [
            {"name": None, "email": "a@example.org"}, {"name": "Привет", "email": "b@example.org"}
        ]  # fmt: skip
        assert msg["message_id"] == "<root@mime.test>" and msg["in_reply_to"] is None
        assert msg["parse_warnings"] == [] and msg["status"] == "received" and msg["source"] == "imap"

        async with http.get(
            f"{pipeline.url('gateway')}/v1/accounts/{account}/messages", headers=auth
        ) as resp:
            assert resp.status == 200
            page = {m["message_key"]: m for m in (await resp.json())["data"]}
        assert page["root"]["attachments"] == msg["attachments"]
        assert page["broken"]["parse_warnings"] and page["broken"]["subject"] is not None
        assert page["reply"]["thread_key"] == msg["thread_key"]
