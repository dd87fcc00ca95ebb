"""Phoenix Channels protocol cases against a real server (both websocket engines)."""

from __future__ import annotations

import json
import socket

import pytest
import trio
from phx import connect

from shardchat import tokens
from shardchat.close_codes import CloseCode
from shardchat.exceptions import ConnectionClosed, HandshakeError


def raw_request(server, head: bytes) -> bytes:
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(head)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


def test_router_healthz(server):
    assert server.get("/healthz") == (200, b"ok\n")


def test_router_unknown_path_404(server):
    status, body = server.get("/nope")
    assert status == 404
    assert body == b"not found: /nope\n"


def test_router_malformed_request_400(server):
    answer = raw_request(server, b"HELLO\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert answer.endswith(b"invalid request line 'HELLO'\n")


def test_router_oversize_head_431(server):
    head = b"GET / HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n"
    answer = raw_request(server, head)
    assert answer.startswith(b"HTTP/1.1 431 ")


def test_router_plain_get_on_socket_path_400(server):
    status, body = server.get("/socket/websocket?vsn=2.0.0")
    assert status == 400
    assert b"expected a websocket upgrade" in body


def test_router_stats_json(server):
    stats = server.stats()
    assert stats["teachers"] == {"total": 0}
    assert stats["students"]["total"] == 0
    assert stats["cpu_s"]["total"] > 0
    assert len(stats["cpu_s"]["workers"]) == 2


async def test_router_forged_token_403(server):
    forged = tokens.mint(b"f" * 32, "t1", "teacher")
    with pytest.raises(HandshakeError) as info:
        async with connect(server, f"vsn=2.0.0&token={forged}"):
            pass
    assert info.value.status == 403


async def test_router_missing_token_403(server):
    with pytest.raises(HandshakeError) as info:
        async with connect(server, "vsn=2.0.0"):
            pass
    assert info.value.status == 403


async def test_router_unsupported_vsn_403(server):
    token = server.token("t1", "teacher")
    with pytest.raises(HandshakeError) as info:
        async with connect(server, f"vsn=3.0.0&token={token}"):
            pass
    assert info.value.status == 403


async def test_protocol_heartbeat(server):
    async with connect(
        server, f"vsn=2.0.0&token={server.token('t1', 'teacher')}"
    ) as client:
        reply = await client.request(None, "phoenix", "heartbeat")
    assert reply.payload == {"status": "ok", "response": {}}
    assert reply.topic == "phoenix"


async def test_protocol_join_leave_close(server):
    async with connect(
        server, f"vsn=2.0.0&token={server.token('t1', 'teacher')}"
    ) as client:
        join_ref, reply = await client.join("presence:teachers")
        assert reply.payload["status"] == "ok"
        leave = await client.request(join_ref, "presence:teachers", "phx_leave")
        assert leave.payload == {"status": "ok", "response": {}}
        closed = await client.push_event("presence:teachers", "phx_close")
        assert closed.join_ref == join_ref
        assert closed.ref == join_ref


async def test_protocol_leave_unjoined_topic_ok(server):
    async with connect(
        server, f"vsn=2.0.0&token={server.token('t1', 'teacher')}"
    ) as client:
        reply = await client.request("9", "presence:teachers", "phx_leave")
    assert reply.payload == {"status": "ok", "response": {}}


async def test_protocol_unmatched_topic(server):
    async with connect(
        server, f"vsn=2.0.0&token={server.token('t1', 'teacher')}"
    ) as client:
        reply = await client.request("1", "presence:teachers", "claim:student")
    assert reply.payload == {
        "status": "error",
        "response": {"reason": "unmatched topic"},
    }


async def test_protocol_unknown_topic_join(server):
    async with connect(
        server, f"vsn=2.0.0&token={server.token('t1', 'teacher')}"
    ) as client:
        _, reply = await client.join("lobby:1")
    assert reply.payload == {
        "status": "error",
        "response": {"reason": "unmatched topic"},
    }


async def test_protocol_second_join_closes_first(server):
    async with connect(
        server, f"vsn=2.0.0&token={server.token('t1', 'teacher')}"
    ) as client:
        first_ref, _ = await client.join("presence:teachers")
        second_ref, reply = await client.join("presence:teachers")
        assert reply.payload["status"] == "ok"
        closed = await client.push_event("presence:teachers", "phx_close")
        assert closed.join_ref == first_ref
        assert second_ref != first_ref
        # The new channel works.
        claim = await client.request(second_ref, "presence:teachers", "claim:student")
        assert claim.payload == {
            "status": "error",
            "response": {"reason": "no students waiting"},
        }


async def test_protocol_stale_join_ref_ignored(server):
    async with connect(
        server, f"vsn=2.0.0&token={server.token('t1', 'teacher')}"
    ) as client:
        join_ref, _ = await client.join("presence:teachers")
        client.send("stale", "50", "presence:teachers", "claim:student", {})
        reply = await client.request(join_ref, "presence:teachers", "claim:student")
        assert reply.ref != "50"
        assert all(message.ref != "50" for message in client.inbox)


async def test_protocol_invalid_frame_closes_1002(server):
    async with connect(
        server, f"vsn=2.0.0&token={server.token('t1', 'teacher')}"
    ) as client:
        client.connection.send("not json")
        with pytest.raises(ConnectionClosed) as info:
            await client.receive()
    assert info.value.code == CloseCode.PROTOCOL_ERROR


async def test_protocol_student_cannot_join_other_presence(server):
    async with connect(
        server, f"vsn=2.0.0&token={server.token('s1', 'student')}"
    ) as client:
        _, reply = await client.join("presence:student:s2")
        assert reply.payload == {
            "status": "error",
            "response": {"reason": "unauthorized"},
        }
        _, reply = await client.join("presence:teachers")
        assert reply.payload == {
            "status": "error",
            "response": {"reason": "unauthorized"},
        }


async def test_protocol_student_cannot_claim(server):
    async with connect(
        server, f"vsn=2.0.0&token={server.token('s1', 'student')}"
    ) as client:
        join_ref, _ = await client.join("presence:student:s1")
        reply = await client.request(join_ref, "presence:student:s1", "claim:student")
    assert reply.payload == {"status": "error", "response": {"reason": "unknown event"}}


async def test_protocol_idle_connection_closed(server_factory):
    server = server_factory("--idle-timeout", "1")
    async with connect(
        server, f"vsn=2.0.0&token={server.token('t1', 'teacher')}"
    ) as client:
        with trio.fail_after(5):
            with pytest.raises(ConnectionClosed) as info:
                await client.connection.receive()
    assert info.value.code == CloseCode.GOING_AWAY


async def test_protocol_authtoken_subprotocol(server):
    import base64

    token = server.token("t1", "teacher")
    encoded = base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")
    async with connect(
        server,
        "vsn=2.0.0",
        subprotocols=["phoenix", f"base64url.bearer.phx.{encoded}"],
    ) as client:
        assert client.connection.subprotocol == "phoenix"
        _, reply = await client.join("presence:teachers")
    assert reply.payload["status"] == "ok"


def test_stats_after_shutdown_is_clean(server):
    # The server fixture asserts a zero exit status on SIGTERM.
    assert json.loads(server.get("/stats")[1])["queue_length"] == 0


def test_router_survives_non_ascii_bearer(server):
    head = (
        "GET /socket/websocket?vsn=2.0.0 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: base64url.bearer.phx.\u00e9, phoenix\r\n\r\n"
    ).encode("utf-8")
    answer = raw_request(server, head)
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert server.get("/healthz") == (200, b"ok\n")


def test_router_survives_huge_expiry_token(server):
    import base64
    import hashlib
    import hmac
    import json as json_module

    body = json_module.dumps({"u": "s1", "r": "student", "x": 10**20}).encode()
    signature = hmac.new(server.secret, body, hashlib.sha256).digest()
    token = ".".join(
        base64.urlsafe_b64encode(part).rstrip(b"=").decode()
        for part in (body, signature)
    )
    status, body = server.get(f"/socket/websocket?vsn=2.0.0&token={token}")
    assert status in (400, 403)
    answer = raw_request(
        server,
        (
            f"GET /socket/websocket?vsn=2.0.0&token={token} HTTP/1.1\r\nHost: x\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode(),
    )
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert b"malformed token: invalid expiry" in answer
    assert server.get("/healthz") == (200, b"ok\n")
