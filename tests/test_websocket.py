"""Tests for shardchat.websocket and both engines, over real sockets on 127.0.0.1.

Each server side runs as a worker runs it: a listening socket in the test
accepts the TCP connection, and the accepted stdlib socket goes to serve(),
sometimes with bytes already read from it. Clients are either connect() or a
raw TCP stream that writes hand-built frames.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import logging
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

import pytest
import trio
from wsproto.connection import Connection as ProtocolConnection
from wsproto.connection import ConnectionType
from wsproto.events import TextMessage

from shardchat.close_codes import CloseCode
from shardchat.engines.wsproto_engine import encode_text_frame
from shardchat.exceptions import ConnectionClosed, HandshakeError
from shardchat.websocket import (
    ENGINES,
    Connection,
    HandshakeRequest,
    connect,
    serve,
)

# Absolute limit for each test, in seconds.
DEADLINE = 10

RESOURCE = "/socket/websocket?vsn=2.0.0"
KEY = base64.b64encode(b"0123456789abcdef").decode()
# Sec-WebSocket-Accept is base64(SHA-1(key + GUID)), RFC 6455 section 1.3.
ACCEPT = base64.b64encode(
    hashlib.sha1((KEY + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
).decode()
MASK = b"\x1f\x2e\x3d\x4c"
# An application close code, from the private range 4000-4999 of RFC 6455
# section 7.4.2, which CloseCode does not list.
LESSON_OVER = 4001

TEXT = 0x1
BINARY = 0x2
CONTINUATION = 0x0
CLOSE = 0x8
PING = 0x9
PONG = 0xA

engines = pytest.mark.parametrize("engine", ENGINES)


# Frames and raw clients


def upgrade_request(target: str = RESOURCE, extra_headers: str = "") -> bytes:
    return (
        f"GET {target} HTTP/1.1\r\n"
        "Host: 127.0.0.1\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {KEY}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        f"{extra_headers}\r\n"
    ).encode()


def client_frame(
    opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True
) -> bytes:
    """Build a client frame (RFC 6455 section 5.2), masked unless masked is False."""
    first = (0x80 if fin else 0) | opcode
    mask_bit = 0x80 if masked else 0
    size = len(payload)
    if size < 126:
        header = bytes((first, mask_bit | size))
    elif size < 65536:
        header = struct.pack("!BBH", first, mask_bit | 126, size)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, size)
    if not masked:
        return header + payload
    masked_payload = bytes(byte ^ MASK[i % 4] for i, byte in enumerate(payload))
    return header + MASK + masked_payload


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack("!H", code) + reason.encode()


class Frame(NamedTuple):
    fin: bool
    opcode: int
    payload: bytes


class RawClient:
    """A TCP client that sends bytes as given and parses the server's frames."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    @classmethod
    async def open(cls, port: int) -> RawClient:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def handshake(self, request: bytes | None = None) -> bytes:
        await self.stream.send_all(request or upgrade_request())
        return await self.read_head()

    async def read_head(self) -> bytes:
        while b"\r\n\r\n" not in self.buffer:
            await self._fill()
        end = self.buffer.index(b"\r\n\r\n") + 4
        head = bytes(self.buffer[:end])
        del self.buffer[:end]
        return head

    async def read_frame(self) -> Frame:
        while True:
            frame = self._parse_frame()
            if frame is not None:
                return frame
            await self._fill()

    async def read_close(self) -> tuple[int, str]:
        """Skip frames up to the close frame and return its code and reason."""
        while True:
            frame = await self.read_frame()
            if frame.opcode == CLOSE:
                (code,) = struct.unpack("!H", frame.payload[:2])
                return code, frame.payload[2:].decode()

    async def read_to_eof(self) -> bytes:
        while True:
            try:
                await self._fill()
            except EOFError:
                break
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    async def _fill(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise EOFError("server closed the connection")
        self.buffer += data

    def _parse_frame(self) -> Frame | None:
        if len(self.buffer) < 2:
            return None
        first, second = self.buffer[0], self.buffer[1]
        size = second & 0x7F
        offset = 2
        if size == 126:
            if len(self.buffer) < 4:
                return None
            (size,) = struct.unpack("!H", self.buffer[2:4])
            offset = 4
        elif size == 127:
            if len(self.buffer) < 10:
                return None
            (size,) = struct.unpack("!Q", self.buffer[2:10])
            offset = 10
        if len(self.buffer) < offset + size:
            return None
        payload = bytes(self.buffer[offset : offset + size])
        del self.buffer[: offset + size]
        return Frame(bool(first & 0x80), first & 0x0F, payload)


# Server side


async def accept_socket(listener: socket.socket) -> socket.socket:
    while True:
        await trio.lowlevel.wait_readable(listener)
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            continue
        return sock


async def read_at_least(sock: socket.socket, size: int) -> bytes:
    sock.setblocking(False)
    data = bytearray()
    while len(data) < size:
        await trio.lowlevel.wait_readable(sock)
        data += sock.recv(65536)
    return bytes(data)


async def read_head_bytes(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    data = bytearray()
    while b"\r\n\r\n" not in data:
        await trio.lowlevel.wait_readable(sock)
        data += sock.recv(65536)
    return bytes(data)


class Server:
    """Accepts connections on 127.0.0.1 and runs serve() on each."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.port = listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        # The client port of each accepted connection, in accept order.
        self.client_ports: list[int] = []
        self.initial_data_read = trio.Event()
        self.returned = 0
        self.raw_clients: list[RawClient] = []

    async def open_client(self) -> RawClient:
        """Open a raw client that serving() closes on exit."""
        client = await RawClient.open(self.port)
        self.raw_clients.append(client)
        return client

    async def run(
        self,
        handler: Callable[[Connection], Awaitable[None]],
        count: int,
        read_initial_data: Callable[[socket.socket], Awaitable[bytes]] | None,
        options: dict[str, Any],
    ) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                sock = await accept_socket(self.listener)
                self.sockets.append(sock)
                self.client_ports.append(sock.getpeername()[1])
                initial_data = b""
                if read_initial_data is not None:
                    initial_data = await read_initial_data(sock)
                    self.initial_data_read.set()
                nursery.start_soon(self._serve, sock, initial_data, handler, options)

    async def _serve(
        self,
        sock: socket.socket,
        initial_data: bytes,
        handler: Callable[[Connection], Awaitable[None]],
        options: dict[str, Any],
    ) -> None:
        await serve(sock, initial_data, handler, **options)
        self.returned += 1


@asynccontextmanager
async def serving(
    handler: Callable[[Connection], Awaitable[None]],
    *,
    count: int = 1,
    read_initial_data: Callable[[socket.socket], Awaitable[bytes]] | None = None,
    **options: Any,
) -> AsyncIterator[Server]:
    """Serve count connections, and on exit wait until every serve() has returned."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        listener.setblocking(False)
        server = Server(listener)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    server.run, handler, count, read_initial_data, options
                )
                yield server
        finally:
            for client in server.raw_clients:
                client.stream.socket.close()


def assert_sockets_closed(server: Server) -> None:
    assert server.returned == len(server.sockets)
    for sock in server.sockets:
        assert sock.fileno() == -1


class Recorder:
    """A handler that records what it receives and, if echo is set, echoes it."""

    def __init__(self, *, echo: bool = True) -> None:
        self.echo = echo
        self.connection: Connection | None = None
        self.messages: list[str | bytes] = []
        self.error: ConnectionClosed | None = None
        self.started = trio.Event()
        self.finished = trio.Event()

    async def __call__(self, connection: Connection) -> None:
        self.connection = connection
        self.started.set()
        try:
            while True:
                message = await connection.receive()
                self.messages.append(message)
                if self.echo:
                    assert isinstance(message, str)
                    connection.send(message)
        except ConnectionClosed as exc:
            self.error = exc
            raise
        finally:
            self.finished.set()


async def echo(connection: Connection) -> None:
    while True:
        message = await connection.receive()
        assert isinstance(message, str)
        connection.send(message)


# Sans-I/O frame encoding


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
def test_encode_text_frame_decodes_in_wsproto(size: int) -> None:
    text = "é" * (size // 2) + "x" * (size % 2)
    client = ProtocolConnection(ConnectionType.CLIENT)
    client.receive_data(encode_text_frame(text))
    events = list(client.events())
    assert events == [
        TextMessage(data=text, frame_finished=True, message_finished=True)
    ]


# Opening handshake


@engines
async def test_serve_echo_round_trip(engine: str) -> None:
    with trio.fail_after(DEADLINE):
        async with serving(echo, engine=engine) as server:
            async with connect("127.0.0.1", server.port, RESOURCE) as client:
                for text in ["hello", "grüße 👋", "x" * 70000]:
                    client.send(text)
                    assert await client.receive() == text
        assert_sockets_closed(server)


@engines
async def test_serve_request_fields(engine: str) -> None:
    recorder = Recorder()
    with trio.fail_after(DEADLINE):
        async with serving(recorder, engine=engine) as server:
            async with connect(
                "127.0.0.1",
                server.port,
                "/socket/websocket?token=old&vsn=2.0.0&token=new",
                extra_headers=[("X-Tutor-Id", "t-17")],
            ) as client:
                await recorder.started.wait()
                assert recorder.connection is not None
                request = recorder.connection.request
                assert request.path == "/socket/websocket"
                assert request.query == {"token": "new", "vsn": "2.0.0"}
                assert ("x-tutor-id", "t-17") in request.headers
                assert ("host", f"127.0.0.1:{server.port}") in request.headers
                assert request.subprotocols == ()
                assert recorder.connection.subprotocol is None
                assert recorder.connection.remote_address == (
                    f"127.0.0.1:{server.client_ports[0]}"
                )
                assert client.remote_address == f"127.0.0.1:{server.port}"
        assert_sockets_closed(server)


@engines
async def test_serve_initial_data_whole_head(engine: str) -> None:
    with trio.fail_after(DEADLINE):
        async with serving(
            echo, engine=engine, read_initial_data=read_head_bytes
        ) as server:
            async with connect("127.0.0.1", server.port, RESOURCE) as client:
                client.send("after a head read by the router")
                assert await client.receive() == "after a head read by the router"
        assert_sockets_closed(server)


@engines
async def test_serve_initial_data_partial_head(engine: str) -> None:
    request = upgrade_request()

    async def read_part(sock: socket.socket) -> bytes:
        return await read_at_least(sock, 30)

    with trio.fail_after(DEADLINE):
        async with serving(echo, engine=engine, read_initial_data=read_part) as server:
            client = await server.open_client()
            await client.stream.send_all(request[:30])
            await server.initial_data_read.wait()
            # Let serve() start waiting for the rest of the head.
            await trio.sleep(0.05)
            await client.stream.send_all(request[30:])

            head = await client.read_head()
            assert head.startswith(b"HTTP/1.1 101 ")
            assert f"Sec-WebSocket-Accept: {ACCEPT}".encode() in head
            await client.stream.send_all(client_frame(TEXT, b"rest came later"))
            assert await client.read_frame() == Frame(True, TEXT, b"rest came later")
            await client.stream.aclose()
        assert_sockets_closed(server)


@engines
async def test_serve_initial_data_with_early_frame(engine: str) -> None:
    early = (
        upgrade_request() + client_frame(TEXT, b"early") + client_frame(TEXT, b"bird")
    )

    async def read_all(sock: socket.socket) -> bytes:
        return await read_at_least(sock, len(early))

    recorder = Recorder()
    with trio.fail_after(DEADLINE):
        async with serving(
            recorder, engine=engine, read_initial_data=read_all
        ) as server:
            client = await server.open_client()
            await client.stream.send_all(early)
            head = await client.read_head()
            assert head.startswith(b"HTTP/1.1 101 ")
            assert await client.read_frame() == Frame(True, TEXT, b"early")
            assert await client.read_frame() == Frame(True, TEXT, b"bird")
            await client.stream.aclose()
        assert recorder.messages == ["early", "bird"]
        assert_sockets_closed(server)


@engines
async def test_serve_receives_messages_of_one_read(engine: str) -> None:
    recorder = Recorder(echo=False)
    frames = b"".join(client_frame(TEXT, f"m{i}".encode()) for i in range(5))
    with trio.fail_after(DEADLINE):
        async with serving(recorder, engine=engine) as server:
            client = await server.open_client()
            await client.handshake()
            await client.stream.send_all(frames + client_frame(BINARY, b"\x00\xff"))
            await client.stream.send_all(
                client_frame(CLOSE, close_payload(CloseCode.NORMAL))
            )
            assert await client.read_close() == (CloseCode.NORMAL, "")
            await client.stream.aclose()
        assert recorder.messages == ["m0", "m1", "m2", "m3", "m4", b"\x00\xff"]
        assert_sockets_closed(server)


@engines
async def test_serve_selects_subprotocol(engine: str) -> None:
    offered: list[HandshakeRequest] = []

    def select_phoenix(request: HandshakeRequest) -> str | None:
        offered.append(request)
        return "phoenix" if "phoenix" in request.subprotocols else None

    recorder = Recorder()
    with trio.fail_after(DEADLINE):
        async with serving(
            recorder, engine=engine, select_subprotocol=select_phoenix
        ) as server:
            async with connect(
                "127.0.0.1",
                server.port,
                RESOURCE,
                subprotocols=["phoenix", "base64url.bearer.phx.dG9rZW4"],
            ) as client:
                assert client.subprotocol == "phoenix"
                await recorder.started.wait()
                assert recorder.connection is not None
                assert recorder.connection.subprotocol == "phoenix"
        assert offered[0].subprotocols == ("phoenix", "base64url.bearer.phx.dG9rZW4")
        assert_sockets_closed(server)


@engines
@pytest.mark.parametrize(
    ("request_bytes", "status_line"),
    [
        (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"HTTP/1.1 400 "),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", b"HTTP/1.1 400 "),
        (
            upgrade_request().replace(b"Version: 13", b"Version: 8"),
            b"HTTP/1.1 426 ",
        ),
        (b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"HTTP/1.1 400 "),
    ],
)
async def test_serve_rejects_invalid_upgrade(
    engine: str,
    request_bytes: bytes,
    status_line: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = Recorder()
    caplog.set_level(logging.DEBUG, logger="shardchat.websocket")
    with trio.fail_after(DEADLINE):
        async with serving(recorder, engine=engine) as server:
            client = await server.open_client()
            await client.stream.send_all(request_bytes)
            response = await client.read_to_eof()
            assert response.startswith(status_line)
        assert not recorder.started.is_set()
        assert_sockets_closed(server)
    rejections = [
        record.getMessage()
        for record in caplog.records
        if record.getMessage().startswith("rejected websocket handshake")
    ]
    assert len(rejections) == 1
    status = status_line.split()[1].decode()
    assert f"with status {status}" in rejections[0]


@engines
async def test_serve_rejects_oversize_head(engine: str) -> None:
    with trio.fail_after(DEADLINE):
        async with serving(echo, engine=engine) as server:
            client = await server.open_client()
            filler = "X-Filler: " + "a" * 20000 + "\r\n"
            await client.stream.send_all(upgrade_request(extra_headers=filler))
            response = await client.read_to_eof()
            assert response.startswith(b"HTTP/1.1 431 ")
        assert_sockets_closed(server)


@engines
async def test_serve_handshake_timeout(engine: str) -> None:
    with trio.fail_after(DEADLINE):
        async with serving(echo, engine=engine, handshake_timeout=0.2) as server:
            client = await server.open_client()
            await client.stream.send_all(upgrade_request()[:40])
            response = await client.read_to_eof()
            assert response.startswith(b"HTTP/1.1 408 ")
        assert_sockets_closed(server)


@engines
async def test_connect_rejected_by_select_subprotocol(engine: str) -> None:
    def reject_token(request: HandshakeRequest) -> str | None:
        raise HandshakeError(403, "invalid token")

    recorder = Recorder()
    with trio.fail_after(DEADLINE):
        async with serving(
            recorder, engine=engine, select_subprotocol=reject_token
        ) as server:
            with pytest.raises(HandshakeError) as caught:
                async with connect("127.0.0.1", server.port, RESOURCE):
                    pass
            assert caught.value.status == 403
            assert str(caught.value) == (
                f"127.0.0.1:{server.port} rejected the websocket upgrade "
                "with status 403"
            )
        assert not recorder.started.is_set()
        assert_sockets_closed(server)


@engines
async def test_serve_unoffered_subprotocol_is_server_error(
    engine: str, caplog: pytest.LogCaptureFixture
) -> None:
    def select_unknown(request: HandshakeRequest) -> str | None:
        return "mqtt"

    with trio.fail_after(DEADLINE):
        async with serving(
            echo, engine=engine, select_subprotocol=select_unknown
        ) as server:
            with pytest.raises(HandshakeError) as caught:
                async with connect(
                    "127.0.0.1", server.port, RESOURCE, subprotocols=["phoenix"]
                ):
                    pass
            assert caught.value.status == 500
        assert_sockets_closed(server)
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1
    assert (
        errors[0].getMessage().startswith("subprotocol selection failed for 127.0.0.1:")
    )
    assert errors[0].exc_info is not None
    assert str(errors[0].exc_info[1]) == (
        "selected subprotocol 'mqtt' is not one of the offered ('phoenix',)"
    )


async def test_connect_timeout() -> None:
    # A listener that is never accepted from: the kernel completes the TCP
    # connect, but no upgrade response ever comes.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        with trio.fail_after(DEADLINE), pytest.raises(TimeoutError) as caught:
            async with connect("127.0.0.1", port, RESOURCE, connect_timeout=0.2):
                pass
    assert str(caught.value) == (
        f"websocket connection to 127.0.0.1:{port} timed out after 0.2 s"
    )


async def test_connect_refused() -> None:
    unused = socket.socket()
    unused.bind(("127.0.0.1", 0))
    port = unused.getsockname()[1]
    unused.close()
    with trio.fail_after(DEADLINE):
        with pytest.raises(ConnectionRefusedError):
            async with connect("127.0.0.1", port, RESOURCE):
                pass


async def test_serve_unknown_engine() -> None:
    left, right = socket.socketpair()
    try:
        with pytest.raises(ValueError) as caught:
            await serve(left, b"", echo, engine="aiohttp")
        assert str(caught.value) == (
            "unknown websocket engine 'aiohttp', expected one of "
            "('wsproto', 'trio-websocket')"
        )
        assert left.fileno() == -1
    finally:
        right.close()


# Frames (RFC 6455 sections 5 and 8)


@engines
async def test_serve_reassembles_fragments_around_ping(engine: str) -> None:
    recorder = Recorder()
    fragments = (
        client_frame(TEXT, b"frag", fin=False)
        + client_frame(PING, b"are you there")
        + client_frame(CONTINUATION, "mént".encode(), fin=False)
        + client_frame(CONTINUATION, b"ed", fin=True)
    )
    with trio.fail_after(DEADLINE):
        async with serving(recorder, engine=engine) as server:
            client = await server.open_client()
            await client.handshake()
            await client.stream.send_all(fragments)
            assert await client.read_frame() == Frame(True, PONG, b"are you there")
            assert await client.read_frame() == Frame(True, TEXT, "fragménted".encode())
            await client.stream.aclose()
        assert recorder.messages == ["fragménted"]
        assert_sockets_closed(server)


@engines
async def test_serve_reassembles_fragments_split_across_reads(engine: str) -> None:
    recorder = Recorder()
    data = client_frame(TEXT, "Grüße".encode(), fin=False) + client_frame(
        CONTINUATION, b" aus Berlin"
    )
    with trio.fail_after(DEADLINE):
        async with serving(recorder, engine=engine) as server:
            client = await server.open_client()
            await client.handshake()
            # Cut inside a frame header and inside the two-byte "ü".
            for start, end in [(0, 1), (1, 9), (9, 17), (17, len(data))]:
                await client.stream.send_all(data[start:end])
                await trio.sleep(0.01)
            assert await client.read_frame() == Frame(
                True, TEXT, "Grüße aus Berlin".encode()
            )
            await client.stream.aclose()
        assert recorder.messages == ["Grüße aus Berlin"]
        assert_sockets_closed(server)


@pytest.mark.parametrize(
    ("engine", "peer_close"),
    [
        (
            "wsproto",
            (CloseCode.PROTOCOL_ERROR, "server received unexpected unmasked frame"),
        ),
        # trio-websocket 0.12.2 closes the TCP connection without a close frame.
        ("trio-websocket", None),
    ],
)
async def test_serve_unmasked_frame_is_protocol_error(
    engine: str, peer_close: tuple[int, str] | None
) -> None:
    recorder = Recorder()
    with trio.fail_after(DEADLINE):
        async with serving(recorder, engine=engine) as server:
            client = await server.open_client()
            await client.handshake()
            await client.stream.send_all(client_frame(TEXT, b"plain", masked=False))
            if peer_close is None:
                assert await client.read_to_eof() == b""
            else:
                assert await client.read_close() == peer_close
                assert await client.read_to_eof() == b""
            await client.stream.aclose()
        assert recorder.error is not None
        assert recorder.error.code == CloseCode.PROTOCOL_ERROR
        assert recorder.error.reason == "server received unexpected unmasked frame"
        assert_sockets_closed(server)


INVALID_UTF8_REASON = (
    "'utf-8' codec can't decode byte 0xc3 in position 2: invalid continuation byte"
)


@pytest.mark.parametrize(
    ("engine", "peer_close"),
    [
        ("wsproto", (CloseCode.INVALID_DATA, INVALID_UTF8_REASON)),
        # trio-websocket 0.12.2 closes the TCP connection without a close frame.
        ("trio-websocket", None),
    ],
)
async def test_serve_invalid_utf8_is_invalid_data(
    engine: str, peer_close: tuple[int, str] | None
) -> None:
    recorder = Recorder()
    with trio.fail_after(DEADLINE):
        async with serving(recorder, engine=engine) as server:
            client = await server.open_client()
            await client.handshake()
            await client.stream.send_all(client_frame(TEXT, b"ok\xc3\x28"))
            if peer_close is None:
                assert await client.read_to_eof() == b""
            else:
                assert await client.read_close() == peer_close
            await client.stream.aclose()
        assert recorder.error is not None
        assert recorder.error.code == CloseCode.INVALID_DATA
        assert recorder.error.reason == INVALID_UTF8_REASON
        assert_sockets_closed(server)


TOO_BIG_REASONS = {
    "wsproto": "message exceeds 64 bytes",
    "trio-websocket": "Exceeded maximum message size: 64 bytes",
}


@engines
@pytest.mark.parametrize(
    "frames",
    [
        pytest.param(client_frame(TEXT, b"x" * 65), id="one-frame"),
        pytest.param(
            client_frame(TEXT, b"x" * 40, fin=False)
            + client_frame(CONTINUATION, b"x" * 40),
            id="fragments",
        ),
    ],
)
async def test_serve_oversize_message_is_too_big(engine: str, frames: bytes) -> None:
    recorder = Recorder(echo=False)
    with trio.fail_after(DEADLINE):
        async with serving(recorder, engine=engine, max_message_size=64) as server:
            client = await server.open_client()
            await client.handshake()
            await client.stream.send_all(client_frame(TEXT, b"x" * 64) + frames)
            assert await client.read_close() == (
                CloseCode.MESSAGE_TOO_BIG,
                TOO_BIG_REASONS[engine],
            )
            await client.stream.aclose()
        assert recorder.messages == ["x" * 64]
        assert recorder.error is not None
        assert recorder.error.code == CloseCode.MESSAGE_TOO_BIG
        assert_sockets_closed(server)


async def test_serve_oversize_frame_rejected_before_complete() -> None:
    # The header announces 10 MB but only 2 KiB follow: the close must come
    # from counting the bytes that arrived, not from a whole frame.
    recorder = Recorder()
    header = struct.pack("!BBQ", 0x80 | TEXT, 0x80 | 127, 10_000_000) + MASK
    with trio.fail_after(DEADLINE):
        async with serving(recorder, max_message_size=1024) as server:
            client = await server.open_client()
            await client.handshake()
            await client.stream.send_all(header + b"\x00" * 2048)
            assert await client.read_close() == (
                CloseCode.MESSAGE_TOO_BIG,
                "message exceeds 1024 bytes",
            )
            await client.stream.aclose()
        assert recorder.error is not None
        assert recorder.error.code == CloseCode.MESSAGE_TOO_BIG
        assert_sockets_closed(server)


# Close handshake (RFC 6455 section 7)


@engines
async def test_close_from_server_with_code_and_reason(engine: str) -> None:
    outcome: dict[str, Any] = {}

    async def close_after_first(connection: Connection) -> None:
        await connection.receive()
        await connection.close(CloseCode.SERVICE_RESTART, "draining")
        with pytest.raises(ConnectionClosed) as caught:
            connection.send("too late")
        outcome["send"] = caught.value
        with pytest.raises(ConnectionClosed) as caught:
            await connection.receive()
        outcome["receive"] = caught.value
        outcome["closed"] = connection.closed

    with trio.fail_after(DEADLINE):
        async with serving(close_after_first, engine=engine) as server:
            async with connect("127.0.0.1", server.port, RESOURCE) as client:
                client.send("hello")
                with pytest.raises(ConnectionClosed) as caught:
                    await client.receive()
                assert caught.value.code == CloseCode.SERVICE_RESTART
                assert caught.value.reason == "draining"
                assert client.closed
        assert_sockets_closed(server)
    assert outcome["send"].code == CloseCode.SERVICE_RESTART
    assert outcome["receive"].code == CloseCode.SERVICE_RESTART
    assert outcome["receive"].reason == "draining"
    assert outcome["closed"] is True


@engines
async def test_close_from_client_with_code_and_reason(engine: str) -> None:
    recorder = Recorder()
    with trio.fail_after(DEADLINE):
        async with serving(recorder, engine=engine) as server:
            async with connect("127.0.0.1", server.port, RESOURCE) as client:
                client.send("bye soon")
                assert await client.receive() == "bye soon"
                await client.close(CloseCode.GOING_AWAY, "tab closed")
                assert client.closed
                with pytest.raises(ConnectionClosed) as caught:
                    client.send("after close")
                assert caught.value.code == CloseCode.GOING_AWAY
            await recorder.finished.wait()
        assert recorder.error is not None
        assert recorder.error.code == CloseCode.GOING_AWAY
        assert recorder.error.reason == "tab closed"
        assert_sockets_closed(server)


@engines
async def test_close_from_raw_client_is_echoed(engine: str) -> None:
    recorder = Recorder()
    with trio.fail_after(DEADLINE):
        async with serving(recorder, engine=engine) as server:
            client = await server.open_client()
            await client.handshake()
            await client.stream.send_all(
                client_frame(CLOSE, close_payload(LESSON_OVER, "lesson over"))
            )
            # The server echoes the code (RFC 6455 section 5.5.1) and closes
            # the TCP connection first (section 7.1.1).
            assert await client.read_close() == (LESSON_OVER, "lesson over")
            assert await client.read_to_eof() == b""
            await client.stream.aclose()
        assert recorder.error is not None
        assert recorder.error.code == LESSON_OVER
        assert recorder.error.reason == "lesson over"
        assert_sockets_closed(server)


@engines
async def test_close_is_idempotent(engine: str) -> None:
    async def close_twice(connection: Connection) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.close, CloseCode.GOING_AWAY, "first")
            # trio does not promise to start tasks in order, so the second
            # close starts once the first one has sent its frame.
            while not connection.closed:
                await trio.sleep(0)
            nursery.start_soon(connection.close, CloseCode.INTERNAL_ERROR, "second")
        await connection.close()

    with trio.fail_after(DEADLINE):
        async with serving(close_twice, engine=engine) as server:
            async with connect("127.0.0.1", server.port, RESOURCE) as client:
                with pytest.raises(ConnectionClosed) as caught:
                    await client.receive()
                assert caught.value.code == CloseCode.GOING_AWAY
                assert caught.value.reason == "first"
        assert_sockets_closed(server)


@engines
async def test_close_while_other_task_receives(engine: str) -> None:
    outcome: dict[str, Any] = {}

    async def close_from_other_task(connection: Connection) -> None:
        async def receive_until_closed() -> None:
            with pytest.raises(ConnectionClosed) as caught:
                await connection.receive()
            outcome["receive"] = caught.value

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive_until_closed)
            # Let the receiving task start waiting on the socket.
            await trio.sleep(0.05)
            started = trio.current_time()
            await connection.close(CloseCode.SERVICE_RESTART, "draining")
            outcome["close_seconds"] = trio.current_time() - started

    with trio.fail_after(DEADLINE):
        async with serving(
            close_from_other_task, engine=engine, close_timeout=3
        ) as server:
            async with connect("127.0.0.1", server.port, RESOURCE) as client:
                with pytest.raises(ConnectionClosed) as caught:
                    await client.receive()
                assert caught.value.code == CloseCode.SERVICE_RESTART
        assert_sockets_closed(server)
    assert outcome["receive"].code == CloseCode.SERVICE_RESTART
    assert outcome["receive"].reason == "draining"
    # The close handshake ended with the client's reply, not at close_timeout.
    assert outcome["close_seconds"] < 1


@engines
async def test_close_times_out_on_silent_peer(engine: str) -> None:
    # The raw client never replies to the close frame, so the server gives up
    # after close_timeout and closes the socket.
    async def close_at_once(connection: Connection) -> None:
        await connection.close(CloseCode.GOING_AWAY)

    with trio.fail_after(DEADLINE):
        async with serving(close_at_once, engine=engine, close_timeout=0.2) as server:
            client = await server.open_client()
            await client.handshake()
            started = trio.current_time()
            assert await client.read_close() == (CloseCode.GOING_AWAY, "")
            assert await client.read_to_eof() == b""
            assert trio.current_time() - started >= 0.15
            await client.stream.aclose()
        assert_sockets_closed(server)


@engines
async def test_serve_peer_vanishes_is_abnormal(engine: str) -> None:
    recorder = Recorder()
    with trio.fail_after(DEADLINE):
        async with serving(recorder, engine=engine) as server:
            client = await server.open_client()
            await client.handshake()
            await recorder.started.wait()
            await client.stream.aclose()
        assert recorder.error is not None
        assert recorder.error.code == CloseCode.ABNORMAL
        assert recorder.error.reason == ""
        assert_sockets_closed(server)


@engines
async def test_serve_handler_return_closes_normal(engine: str) -> None:
    async def leave(connection: Connection) -> None:
        connection.send("goodbye")

    with trio.fail_after(DEADLINE):
        async with serving(leave, engine=engine) as server:
            async with connect("127.0.0.1", server.port, RESOURCE) as client:
                assert await client.receive() == "goodbye"
                with pytest.raises(ConnectionClosed) as caught:
                    await client.receive()
                assert caught.value.code == CloseCode.NORMAL
                assert caught.value.reason == ""
        assert_sockets_closed(server)


@pytest.mark.parametrize(
    ("engine", "peer_close"),
    [
        ("wsproto", (CloseCode.GOING_AWAY, "")),
        # trio-websocket cannot send without awaiting, which cancellation forbids.
        ("trio-websocket", None),
    ],
)
async def test_serve_cancelled_closes_socket(
    engine: str, peer_close: tuple[int, str] | None
) -> None:
    recorder = Recorder()
    with socket.socket() as listener, trio.fail_after(DEADLINE):
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)
        client = await RawClient.open(listener.getsockname()[1])
        try:
            async with trio.open_nursery() as nursery:
                sock = await accept_socket(listener)
                nursery.start_soon(
                    functools.partial(serve, sock, b"", recorder, engine=engine)
                )
                await client.handshake()
                await recorder.started.wait()
                nursery.cancel_scope.cancel()
            assert sock.fileno() == -1
            if peer_close is None:
                assert await client.read_to_eof() == b""
            else:
                assert await client.read_close() == peer_close
        finally:
            client.stream.socket.close()


# Handler failures


@engines
async def test_serve_handler_error_closes_1011(
    engine: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def fail_on_boom(connection: Connection) -> None:
        while True:
            message = await connection.receive()
            if message == "boom":
                raise RuntimeError("handler bug")
            assert isinstance(message, str)
            connection.send(message)

    with trio.fail_after(DEADLINE):
        async with serving(fail_on_boom, engine=engine, count=2) as server:
            async with connect("127.0.0.1", server.port, RESOURCE) as healthy:
                async with connect("127.0.0.1", server.port, RESOURCE) as failing:
                    failing.send("boom")
                    with pytest.raises(ConnectionClosed) as caught:
                        await failing.receive()
                    assert caught.value.code == CloseCode.INTERNAL_ERROR
                    assert caught.value.reason == ""
                    failing_address = f"127.0.0.1:{server.client_ports[1]}"
                healthy.send("still here")
                assert await healthy.receive() == "still here"
        assert_sockets_closed(server)
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].name == "shardchat.websocket"
    assert errors[0].getMessage() == (
        f"handler failed on connection from {failing_address}"
    )
    assert errors[0].exc_info is not None
    assert str(errors[0].exc_info[1]) == "handler bug"


@engines
async def test_serve_connection_closed_in_group_is_routine(
    engine: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def receive_in_nursery(connection: Connection) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.receive)

    with trio.fail_after(DEADLINE):
        async with serving(receive_in_nursery, engine=engine) as server:
            async with connect("127.0.0.1", server.port, RESOURCE) as client:
                await client.close(CloseCode.GOING_AWAY, "")
        assert_sockets_closed(server)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


@engines
async def test_serve_foreign_connection_closed_is_handler_error(
    engine: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A ConnectionClosed from another connection does not mean this one closed.
    async def raise_foreign(connection: Connection) -> None:
        await connection.receive()
        raise ConnectionClosed(CloseCode.ABNORMAL, "")

    with trio.fail_after(DEADLINE):
        async with serving(raise_foreign, engine=engine) as server:
            async with connect("127.0.0.1", server.port, RESOURCE) as client:
                client.send("relay this")
                with pytest.raises(ConnectionClosed) as caught:
                    await client.receive()
                assert caught.value.code == CloseCode.INTERNAL_ERROR
        assert_sockets_closed(server)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1


# Sending


@engines
async def test_send_backlog_flushes_in_order(engine: str) -> None:
    # The client reads nothing until the server has sent 2 MB, far more than
    # the kernel buffers hold, so the backlog path must deliver the rest.
    count = 256
    payload = "p" * 8192
    sent = trio.Event()

    async def send_many(connection: Connection) -> None:
        for index in range(count):
            connection.send(f"{index:05d}{payload}")
            if index % 16 == 0:
                await trio.sleep(0)
        sent.set()
        await connection.receive()

    with trio.fail_after(DEADLINE):
        async with serving(
            send_many, engine=engine, send_buffer_limit=4 << 20
        ) as server:
            client = await server.open_client()
            await client.handshake()
            await sent.wait()
            for index in range(count):
                frame = await client.read_frame()
                assert frame.payload[:5] == f"{index:05d}".encode()
            await client.stream.send_all(
                client_frame(CLOSE, close_payload(CloseCode.NORMAL))
            )
            assert await client.read_close() == (CloseCode.NORMAL, "")
            await client.stream.aclose()
        assert_sockets_closed(server)


@engines
async def test_send_slow_reader_is_aborted(
    engine: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="shardchat.websocket")
    outcome: dict[str, Any] = {}

    async def flood(connection: Connection) -> None:
        sends = 0
        try:
            # Bounded: 100000 sends of 1 KiB pass any 64 KiB limit.
            while sends < 100_000:
                connection.send("f" * 1024)
                sends += 1
                if sends % 8 == 0:
                    await trio.sleep(0)
        except ConnectionClosed as exc:
            outcome["send"] = exc
        with pytest.raises(ConnectionClosed) as caught:
            await connection.receive()
        outcome["receive"] = caught.value
        with pytest.raises(ConnectionClosed) as caught:
            connection.send("again")
        outcome["send_again"] = caught.value

    with trio.fail_after(DEADLINE):
        async with serving(flood, engine=engine, send_buffer_limit=64 * 1024) as server:
            client = await server.open_client()
            client.stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client_port = client.stream.socket.getsockname()[1]
            await client.handshake()
            await server_done(server)
            await client.stream.aclose()
        assert_sockets_closed(server)
    for key in ["send", "receive", "send_again"]:
        assert outcome[key].code == CloseCode.POLICY_VIOLATION
        assert outcome[key].reason == "send buffer full"
    aborts = [r for r in caplog.records if r.getMessage().startswith("aborted")]
    assert len(aborts) == 1
    assert aborts[0].levelno == logging.INFO
    assert aborts[0].args[0] == f"127.0.0.1:{client_port}"


async def server_done(server: Server) -> None:
    while server.returned < 1:
        await trio.sleep(0.01)


@engines
async def test_close_with_ping_in_flight(
    engine: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A ping that crosses the server's close frame must not crash the
    # connection. wsproto forbids the pong, and trio-websocket 0.12.2 raises
    # from its reader task when it tries to send one.
    async def close_at_once(connection: Connection) -> None:
        await connection.close(CloseCode.GOING_AWAY, "bye")

    with trio.fail_after(DEADLINE):
        async with serving(close_at_once, engine=engine, close_timeout=3) as server:
            client = await server.open_client()
            await client.handshake()
            assert await client.read_close() == (CloseCode.GOING_AWAY, "bye")
            started = trio.current_time()
            await client.stream.send_all(
                client_frame(PING, b"late")
                + client_frame(CLOSE, close_payload(CloseCode.GOING_AWAY))
            )
            assert await client.read_to_eof() == b""
            assert trio.current_time() - started < 1
        assert_sockets_closed(server)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
