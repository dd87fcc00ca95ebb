"""Compatibility with older Phoenix clients and the 2015 reference clients."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from shardchat import websocket
from shardchat.exceptions import HandshakeError


async def receive_json(connection) -> dict:
    return json.loads(await connection.receive())


async def test_serializer_v1_without_vsn(server_factory):
    server = server_factory()
    token = server.token("t1", "teacher")
    async with websocket.connect(
        server.host, server.port, f"/socket/websocket?token={token}"
    ) as connection:
        connection.send(
            json.dumps(
                {
                    "topic": "presence:teachers",
                    "event": "phx_join",
                    "payload": {},
                    "ref": "1",
                    "join_ref": "1",
                }
            )
        )
        reply = await receive_json(connection)
    assert reply == {
        "topic": "presence:teachers",
        "event": "phx_reply",
        "payload": {"status": "ok", "response": {}},
        "ref": "1",
        "join_ref": "1",
    }


async def test_serializer_v1_explicit_vsn(server_factory):
    server = server_factory()
    token = server.token("t1", "teacher")
    async with websocket.connect(
        server.host, server.port, f"/socket/websocket?vsn=1.0.0&token={token}"
    ) as connection:
        connection.send(
            json.dumps(
                {"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": "7"}
            )
        )
        reply = await receive_json(connection)
    assert reply["event"] == "phx_reply"
    assert reply["ref"] == "7"
    assert reply["payload"] == {"status": "ok", "response": {}}


async def test_socket_path_option(server_factory):
    server = server_factory("--socket-path", "/ws")
    token = server.token("t1", "teacher")
    async with websocket.connect(
        server.host, server.port, f"/ws?vsn=2.0.0&token={token}"
    ) as connection:
        connection.send('["1","1","presence:teachers","phx_join",{}]')
        reply = json.loads(await connection.receive())
    assert reply[4] == {"status": "ok", "response": {}}
    async with websocket.connect(
        server.host, server.port, f"/ws/websocket?vsn=2.0.0&token={token}"
    ) as connection:
        connection.send('[null,"2","phoenix","heartbeat",{}]')
        reply = json.loads(await connection.receive())
    assert reply[4] == {"status": "ok", "response": {}}
    with pytest.raises(HandshakeError) as info:
        async with websocket.connect(
            server.host, server.port, f"/socket/websocket?vsn=2.0.0&token={token}"
        ):
            pass
    assert info.value.status == 404


def test_insecure_mode_refused_on_public_host(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "shardchat",
            "serve",
            "--insecure-join-identity",
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "--insecure-join-identity is refused with --host 0.0.0.0" in result.stderr


async def test_insecure_mode_identity_from_join(server_factory):
    server = server_factory("--insecure-join-identity")
    assert "INSECURE: --insecure-join-identity is on" in server.log_text()
    async with (
        websocket.connect(
            server.host, server.port, "/socket/websocket?vsn=2.0.0"
        ) as teacher,
        websocket.connect(
            server.host, server.port, "/socket/websocket?vsn=2.0.0"
        ) as student,
    ):
        student.send(
            '["1","1","presence:student:s1","phx_join",{"userId":"s1","role":"student"}]'
        )
        assert json.loads(await student.receive())[4]["status"] == "ok"
        student.send('["1","2","presence:student:s1","student:ready",{}]')
        assert json.loads(await student.receive())[4]["status"] == "ok"
        teacher.send(
            '["1","1","presence:teachers","phx_join",{"userId":"t1","role":"teacher"}]'
        )
        assert json.loads(await teacher.receive())[4]["status"] == "ok"
        teacher.send('["1","2","presence:teachers","claim:student",{}]')
        while True:
            frame = json.loads(await teacher.receive())
            if frame[3] == "phx_reply" and frame[1] == "2":
                break
        chat = frame[4]["response"]["chat"]
        assert chat["student_id"] == "s1"
        topic = f"chats:{chat['id']}"
        teacher.send(
            json.dumps(
                ["3", "3", topic, "phx_join", {"userId": "t1", "role": "teacher"}]
            )
        )
        while True:
            frame = json.loads(await teacher.receive())
            if frame[3] == "phx_reply" and frame[1] == "3":
                break
        assert frame[4] == {"status": "ok", "response": {}}
        # The first join fixed the connection's identity, so a payload naming
        # another user changes nothing: the student still joins as s1.
        student.send(
            json.dumps(
                ["4", "4", topic, "phx_join", {"userId": "s9", "role": "student"}]
            )
        )
        while True:
            frame = json.loads(await student.receive())
            if frame[3] == "phx_reply" and frame[1] == "4":
                break
        assert frame[4] == {"status": "ok", "response": {}}
