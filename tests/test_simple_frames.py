"""The wsproto engine's own parser for single-frame text messages."""

import os
import socket
import struct

import pytest
from wsproto import ConnectionType
from wsproto.connection import Connection as ProtocolConnection

from shardchat.engines.wsproto_engine import WsprotoConnection
from shardchat.websocket import HandshakeRequest


def masked_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    mask = os.urandom(4)
    first = (0x80 if fin else 0) | opcode
    size = len(payload)
    if size < 126:
        header = bytes((first, 0x80 | size))
    elif size < 65536:
        header = struct.pack("!BBH", first, 0x80 | 126, size)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, size)
    body = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
    return header + mask + body


def text(message: str, fin: bool = True) -> bytes:
    return masked_frame(0x1, message.encode(), fin)


@pytest.fixture
def connection():
    ours, theirs = socket.socketpair()
    request = HandshakeRequest("/", {}, (), ())
    conn = WsprotoConnection(
        ours,
        ProtocolConnection(ConnectionType.SERVER),
        client=False,
        request=request,
        subprotocol=None,
        remote_address="test",
        close_timeout=1.0,
        max_message_size=1 << 20,
        send_buffer_limit=1 << 20,
    )
    yield conn
    ours.close()
    theirs.close()


def messages(conn) -> list:
    return list(conn._messages)


def test_simple_frames_split_at_every_byte(connection):
    stream = text("hello") + text("x" * 200) + text("ünïcödé ✓")
    for index in range(len(stream)):
        connection.feed(stream[index : index + 1])
    assert messages(connection) == ["hello", "x" * 200, "ünïcödé ✓"]
    assert connection._simple_frames


def test_simple_frames_many_in_one_read(connection):
    connection.feed(b"".join(text(f"m{index}") for index in range(50)))
    assert messages(connection) == [f"m{index}" for index in range(50)]


def test_simple_frames_empty_message(connection):
    connection.feed(text(""))
    assert messages(connection) == [""]


def test_simple_frames_hand_over_at_fragment(connection):
    stream = (
        text("before")
        + text("frag-", fin=False)
        + masked_frame(0x9, b"ping")
        + masked_frame(0x0, b"ment")
        + text("after")
    )
    connection.feed(stream)
    assert messages(connection) == ["before", "frag-ment", "after"]
    assert not connection._simple_frames


def test_simple_frames_hand_over_at_binary(connection):
    connection.feed(text("a") + masked_frame(0x2, b"\x00\x01") + text("b"))
    assert messages(connection) == ["a", b"\x00\x01", "b"]


def test_simple_frames_large_frame_goes_to_wsproto(connection):
    big = "y" * 70000
    connection.feed(text("a") + text(big))
    assert messages(connection) == ["a", big]
    assert not connection._simple_frames


def test_simple_frames_invalid_utf8_closes_1007(connection):
    connection.feed(text("ok") + masked_frame(0x1, b"\xff\xfe"))
    assert messages(connection) == ["ok"]
    assert connection._close_code == 1007


def test_simple_frames_unmasked_closes_1002(connection):
    connection.feed(bytes((0x81, 2)) + b"hi")
    assert messages(connection) == []
    assert connection._close_code == 1002


def test_masked_encoder_round_trips_through_wsproto():
    from wsproto.events import TextMessage

    from shardchat.engines.wsproto_engine import encode_masked_text_frame

    server = ProtocolConnection(ConnectionType.SERVER)
    texts = ["", "hi", "ü" * 100, "x" * 70000]
    for item in texts:
        server.receive_data(encode_masked_text_frame(item))
    received = [
        event.data for event in server.events() if isinstance(event, TextMessage)
    ]
    assert received == texts


def test_masked_encoder_uses_fresh_keys():
    from shardchat.engines.wsproto_engine import encode_masked_text_frame

    keys = {encode_masked_text_frame("same")[2:6] for _ in range(20)}
    assert len(keys) > 1
