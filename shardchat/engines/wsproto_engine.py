"""The default websocket engine: wsproto driven by one task per connection.

Per-message CPU cost is what this engine is built for. The task that calls
receive() waits for readability, reads with one recv_into into a reused 64 KiB
buffer and feeds wsproto directly, without a reader task or a memory channel
between them. send() encodes the frame and writes it with one non-blocking
sock.send, so relaying a message costs no task switch and one system call. Only
when the kernel's send buffer is full does a writer task, parked until then,
wait for writability and flush the backlog, and frames sent meanwhile leave
coalesced in its next write. A backlog above send_buffer_limit means the peer
reads too slowly, and the connection is aborted rather than buffered further.

RFC 6455 framing, masking checks, UTF-8 validation and the close handshake come
from wsproto. The server encodes its own unmasked data frames, which takes about
0.22 us per message where wsproto's encoder takes about 2.8 us (timeit, 104-byte
text message, Python 3.11, wsproto 1.3.2, AMD EPYC).

benchmarks/engine_echo.py measured 37-44 us of server CPU per echoed message
with 100 connections on a 2-CPU AMD EPYC container, where the trio-websocket
engine took 87-104 us.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import trio
from wsproto import ConnectionType
from wsproto.connection import Connection as ProtocolConnection
from wsproto.connection import ConnectionState as ProtocolState
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError

from shardchat.close_codes import CloseCode
from shardchat.engines import (
    as_close_code,
    handshake,
    log_rejection,
    make_request,
    read_request_head,
    reject,
    select_subprotocol_or_reject,
    send_error_response,
    utf8_size,
)
from shardchat.exceptions import ConnectionClosed, HandshakeError
from shardchat.websocket import HandshakeRequest, format_address

__all__ = ["WsprotoConnection", "accept", "connect"]

_log = logging.getLogger("shardchat.websocket")

RECEIVE_BUFFER_SIZE = 64 * 1024
MAX_RESPONSE_HEAD = 16 * 1024

# One receive buffer for every connection of the process. A read copies the
# bytes out (into wsproto or a bytes object) before the task can yield, and trio
# runs one task at a time, so no two reads ever share it. A buffer per
# connection cost 64 KiB of each idle connection's memory.
_RECEIVE_BUFFER = bytearray(RECEIVE_BUFFER_SIZE)
_RECEIVE_VIEW = memoryview(_RECEIVE_BUFFER)

# A client has no close_timeout option, so it waits as long as serve's default.
CLIENT_CLOSE_TIMEOUT = 5.0

# SO_LINGER on with a zero timeout: close() resets the connection and drops the
# unsent backlog instead of keeping it in the kernel.
_LINGER_RESET = struct.pack("ii", 1, 0)

_SEND_BUFFER_FULL = "send buffer full"


class ConnectionState(enum.Enum):
    """The stage of a connection, changed only by _start_closing and _close_socket."""

    OPEN = "open"
    # A close frame was sent or received and the socket is still open.
    CLOSING = "closing"
    # The socket is closed.
    CLOSED = "closed"


def encode_text_frame(text: str) -> bytes:
    """Encode text as one final, unmasked text frame (RFC 6455 section 5.2).

    Only a server may send unmasked frames.
    """
    payload = text.encode("utf-8")
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65536:
        return struct.pack("!BBH", 0x81, 126, size) + payload
    return struct.pack("!BBQ", 0x81, 127, size) + payload


def _unmask(payload: bytes, mask: bytes) -> bytes:
    """XOR ``payload`` with the repeated 4-byte ``mask`` (RFC 6455 section 5.3)."""
    size = len(payload)
    key = (mask * (size // 4 + 1))[:size]
    value = int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")
    return value.to_bytes(size, "big")


def encode_masked_text_frame(text: str) -> bytes:
    """Encode text as one final text frame masked with a fresh random key.

    A client must mask every frame with a key from a strong source of entropy
    (RFC 6455 section 5.3). This costs about a tenth of wsproto's encoder for
    a chat message.
    """
    payload = text.encode("utf-8")
    size = len(payload)
    mask = os.urandom(4)
    if size < 126:
        header = bytes((0x81, 0x80 | size))
    elif size < 65536:
        header = struct.pack("!BBH", 0x81, 0x80 | 126, size)
    else:
        header = struct.pack("!BBQ", 0x81, 0x80 | 127, size)
    return header + mask + _unmask(payload, mask)


class WsprotoConnection:
    """A websocket connection over a non-blocking socket, server or client side.

    receive() may run in one task while other tasks call send(). The backlog
    writer, started only while writes wait for the socket, runs in the
    connection's nursery.
    """

    __slots__ = (
        "remote_address",
        "request",
        "subprotocol",
        "_sock",
        "_protocol",
        "_client",
        "_encode",
        "_state",
        "_close_code",
        "_close_reason",
        "_failed",
        "_messages",
        "_fragments",
        "_fragments_size",
        "_max_message_size",
        "_reading",
        "_read_lot",
        "_pending",
        "_send_buffer_limit",
        "_nursery",
        "_writer_running",
        "_drained_lot",
        "_close_timeout",
        "_simple_frames",
        "_partial",
    )

    def __init__(
        self,
        sock: socket.socket,
        protocol: ProtocolConnection,
        *,
        client: bool,
        request: HandshakeRequest,
        subprotocol: str | None,
        remote_address: str,
        close_timeout: float,
        max_message_size: int,
        send_buffer_limit: int,
    ) -> None:
        self.remote_address = remote_address
        self.request = request
        self.subprotocol = subprotocol
        self._sock = sock
        self._protocol = protocol
        self._client = client
        self._encode: Callable[[str], bytes | bytearray] = (
            encode_masked_text_frame if client else encode_text_frame
        )
        self._state = ConnectionState.OPEN
        self._close_code: int | None = None
        self._close_reason = ""
        # Set when this side found an invalid frame. wsproto then parses no
        # more frames, so the close handshake ends at the peer's EOF.
        self._failed = False

        # A list, not a deque, because it rarely contains more than one message
        # and an empty deque takes 624 bytes of every idle connection's memory.
        self._messages: list[str | bytes] = []
        self._fragments: list[str | bytes] = []
        self._fragments_size = 0
        self._max_message_size = max_message_size
        self._reading = False
        # Parking lots are made when a second task first waits, since most
        # connections never need them.
        self._read_lot: trio.lowlevel.ParkingLot | None = None

        self._pending = bytearray()
        self._send_buffer_limit = send_buffer_limit
        # The connection's nursery, set by accept() or connect(); the backlog
        # writer runs there.
        self._nursery: trio.Nursery | None = None
        self._writer_running = False
        self._drained_lot: trio.lowlevel.ParkingLot | None = None
        self._close_timeout = close_timeout

        # Until the first frame that is not a simple text frame, frames are
        # parsed here; from then on wsproto parses everything (see _feed).
        self._simple_frames = True
        self._partial = b""

        # Frames that arrived with the handshake are already inside wsproto.
        self._process_events()

    @property
    def closed(self) -> bool:
        return self._state is not ConnectionState.OPEN

    async def receive(self) -> str | bytes:
        """Return the next complete message, reading the socket when none is queued.

        Messages that arrived before the peer's close frame are returned first.

        Raises:
            ConnectionClosed: the connection is closing or closed. The code is the
                peer's for a peer close, ours for a close or failure detected
                here, ABNORMAL when the TCP connection ended without a close
                frame, and POLICY_VIOLATION when the peer read too slowly.
        """
        messages = self._messages
        while not messages:
            if self._state is not ConnectionState.OPEN:
                raise ConnectionClosed(self._close_code, self._close_reason)
            await self._read_once()
        return messages.pop(0)

    def send(self, text: str) -> None:
        """Send a text message at once, or add it to the backlog when one exists.

        Never blocks and never yields to another task.

        Raises:
            ConnectionClosed: the connection is closing or closed, or this send
                aborted it.
        """
        if self._state is not ConnectionState.OPEN:
            raise ConnectionClosed(self._close_code, self._close_reason)
        self._write(self._encode(text))
        if self._state is ConnectionState.CLOSED:
            raise ConnectionClosed(self._close_code, self._close_reason)

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Send a close frame and wait up to close_timeout for the handshake to end.

        The server closes the socket once the peer's close frame arrives, and a
        client waits for the server's TCP close first (RFC 6455 section 7.1.1).
        Either way the socket is closed on return. Calls after the first one
        only wait for the handshake that is already running.
        """
        if self._state is ConnectionState.OPEN:
            self._start_closing(code, reason)
            self._send_control(CloseConnection(code=code, reason=reason))
        if self._state is ConnectionState.CLOSED:
            return
        with trio.move_on_after(self._close_timeout):
            await self._finish_close_handshake()
        self._close_socket()

    def close_now(self) -> None:
        """Close the socket without waiting, after a best-effort GOING_AWAY frame.

        Used when the connection's task is cancelled, so nothing may block.
        """
        if self._state is ConnectionState.OPEN:
            self._start_closing(CloseCode.GOING_AWAY, "")
            if not self._pending:
                try:
                    frame = self._protocol.send(
                        CloseConnection(code=CloseCode.GOING_AWAY)
                    )
                    self._sock.send(frame)
                except (OSError, LocalProtocolError):
                    pass
        self._close_socket()

    async def _flush_backlog(self) -> None:
        """Write the backlog as the socket becomes writable, then end.

        The task exists only while there is a backlog, so an idle connection
        costs no writer task.
        """
        sock = self._sock
        try:
            while self._pending and self._state is not ConnectionState.CLOSED:
                try:
                    await trio.lowlevel.wait_writable(sock)
                except trio.ClosedResourceError:
                    return
                try:
                    sent = sock.send(self._pending)
                except BlockingIOError:
                    continue
                except OSError:
                    # EPIPE, ECONNRESET, or the socket closed under us.
                    self._abort(CloseCode.ABNORMAL, "")
                    return
                del self._pending[:sent]
        finally:
            self._writer_running = False
            if self._drained_lot:
                self._drained_lot.unpark_all()

    # Reading

    async def _read_once(self) -> None:
        """Read the socket once and process the events, or wait for the task that does.

        trio allows one task at a time to wait for a socket to become readable.
        """
        if self._reading:
            if self._read_lot is None:
                self._read_lot = trio.lowlevel.ParkingLot()
            await self._read_lot.park()
            return
        self._reading = True
        try:
            await self._read_and_process()
        finally:
            self._reading = False
            if self._read_lot:
                self._read_lot.unpark_all()

    async def _read_and_process(self) -> None:
        sock = self._sock
        try:
            await trio.lowlevel.wait_readable(sock)
        except trio.ClosedResourceError:
            # Another task aborted the connection, and the state records why.
            return
        try:
            size = sock.recv_into(_RECEIVE_BUFFER)
        except BlockingIOError:
            return
        except OSError:
            self._abort(CloseCode.ABNORMAL, "")
            return
        if not size:
            self._abort(CloseCode.ABNORMAL, "")
            return

        if self._failed or self._protocol.state is ProtocolState.CLOSED:
            # Nothing after the close handshake, or after a frame wsproto
            # rejected, is parsed, so it is discarded.
            return
        self._feed(_RECEIVE_VIEW[:size])

    def feed(self, data: bytes) -> None:
        """Parse bytes that arrived before the connection existed."""
        if data:
            self._feed(data)

    def _feed(self, data: bytes | memoryview) -> None:
        if self._simple_frames:
            data = self._take_simple_frames(data)
            if not data:
                return
        self._protocol.receive_data(data)
        self._process_events()

    def _take_simple_frames(self, data: bytes | memoryview) -> bytes:
        """Parse complete single-frame text messages at the front of ``data``.

        Nearly every frame of a chat is one unfragmented text frame under 64 KiB,
        which this loop parses in about a fifth of wsproto's time. A partial
        simple frame waits here for the next read. Any other frame (control,
        fragment, binary, unmasked from a client, masked from a server, invalid
        UTF-8, over the size limit) and everything after it go to wsproto, which
        applies RFC 6455 in full, so this connection stops using the loop.

        Returns the bytes left for wsproto, starting at a frame boundary.
        """
        buffer = self._partial + data if self._partial else bytes(data)
        self._partial = b""
        end = len(buffer)
        position = 0
        # Servers receive masked frames (RFC 6455 section 5.1), clients unmasked.
        mask_bit = 0 if self._client else 0x80
        while True:
            available = end - position
            if available < 2:
                break
            second = buffer[position + 1]
            if buffer[position] != 0x81 or second & 0x80 != mask_bit:
                return self._leave_simple_frames(buffer, position)
            length = second & 0x7F
            header = 2
            if length == 126:
                if available < 4:
                    break
                length = (buffer[position + 2] << 8) | buffer[position + 3]
                header = 4
            elif length == 127:
                return self._leave_simple_frames(buffer, position)
            if length > self._max_message_size:
                return self._leave_simple_frames(buffer, position)
            if mask_bit:
                header += 4
            if available < header + length:
                break
            start = position + header
            payload = buffer[start : start + length]
            if mask_bit:
                payload = _unmask(payload, buffer[start - 4 : start])
            try:
                text = payload.decode("utf-8")
            except UnicodeDecodeError:
                return self._leave_simple_frames(buffer, position)
            if self._state is ConnectionState.OPEN:
                self._messages.append(text)
            position = start + length
        self._partial = buffer[position:]
        return b""

    def _leave_simple_frames(self, buffer: bytes, position: int) -> bytes:
        self._simple_frames = False
        return buffer[position:]

    def _process_events(self) -> None:
        for event in self._protocol.events():
            event_type = type(event)
            if event_type is TextMessage or event_type is BytesMessage:
                if self._state is not ConnectionState.OPEN:
                    continue
                data = event.data
                if event.message_finished and not self._fragments:
                    self._add_message(data)
                else:
                    self._add_fragment(data, event.message_finished)
            elif event_type is Ping:
                self._send_control(event.response())
            elif event_type is CloseConnection:
                self._receive_close(event)
            # This engine sends no pings, so a pong needs nothing.

    def _add_message(self, data: str | bytes) -> None:
        # A code point takes at most 4 bytes in UTF-8, so short text needs no count.
        size = len(data)
        if size * 4 > self._max_message_size and isinstance(data, str):
            size = utf8_size(data)
        if size > self._max_message_size:
            self._fail_message_too_big()
            return
        self._messages.append(data)

    def _add_fragment(self, data: str | bytes, message_finished: bool) -> None:
        # Fragments and the parts of a large frame are counted as they arrive,
        # so an oversize message is rejected before it is buffered whole.
        self._fragments.append(data)
        if isinstance(data, str):
            self._fragments_size += utf8_size(data)
        else:
            self._fragments_size += len(data)
        if self._fragments_size > self._max_message_size:
            self._fail_message_too_big()
            return
        if message_finished:
            if isinstance(data, str):
                message: str | bytes = "".join(self._fragments)  # type: ignore[arg-type]
            else:
                message = b"".join(self._fragments)  # type: ignore[arg-type]
            self._fragments.clear()
            self._fragments_size = 0
            self._messages.append(message)

    def _fail_message_too_big(self) -> None:
        self._fragments.clear()
        self._fragments_size = 0
        self._fail(
            CloseCode.MESSAGE_TOO_BIG,
            f"message exceeds {self._max_message_size} bytes",
        )

    def _receive_close(self, event: CloseConnection) -> None:
        state = self._protocol.state
        if state is ProtocolState.REMOTE_CLOSING:
            # The peer started the close, so echo its code (RFC 6455 section
            # 5.5.1) and, as a server, close the socket at once.
            self._start_closing(as_close_code(event.code), event.reason or "")
            self._send_control(event.response())
            if not self._client and not self._pending:
                self._close_socket()
        elif state is ProtocolState.CLOSED:
            # The peer's close frame replies to ours.
            if not self._client and not self._pending:
                self._close_socket()
        else:
            # wsproto reports a frame it could not parse as a close event
            # without a state change, with the close code for the problem.
            self._fail(as_close_code(event.code), event.reason or "")

    def _fail(self, code: int, reason: str) -> None:
        """Start the close handshake after an invalid frame from the peer."""
        self._failed = True
        if self._state is ConnectionState.OPEN:
            self._start_closing(code, reason)
            self._send_control(CloseConnection(code=code, reason=reason))

    # Writing

    def _send_control(self, event: Event) -> None:
        try:
            data = self._protocol.send(event)
        except LocalProtocolError:
            # wsproto allows no frame after a close frame, for example a pong
            # for a ping that crossed our close. That is routine while closing.
            return
        if self._state is not ConnectionState.CLOSED:
            self._write(data)

    def _write(self, data: bytes | bytearray) -> None:
        pending = self._pending
        if pending:
            pending += data
        else:
            try:
                sent = self._sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                # EPIPE or ECONNRESET: the peer is gone.
                self._abort(CloseCode.ABNORMAL, "")
                return
            if sent == len(data):
                return
            pending += memoryview(data)[sent:]
            if not self._writer_running:
                self._writer_running = True
                self._nursery.start_soon(self._flush_backlog)
        if len(pending) > self._send_buffer_limit:
            self._abort_slow_reader()

    async def _drain(self) -> None:
        while self._pending and self._state is not ConnectionState.CLOSED:
            if self._drained_lot is None:
                self._drained_lot = trio.lowlevel.ParkingLot()
            await self._drained_lot.park()

    # Closing

    async def _finish_close_handshake(self) -> None:
        if self._failed:
            # Our close frame must go out before the FIN, after which the peer
            # closes its side.
            await self._drain()
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_WR)
        while self._state is not ConnectionState.CLOSED:
            if not self._client and self._protocol.state is ProtocolState.CLOSED:
                break
            await self._read_once()
        await self._drain()

    def _start_closing(self, code: int, reason: str) -> None:
        self._state = ConnectionState.CLOSING
        self._close_code = code
        self._close_reason = reason

    def _abort(self, code: int, reason: str) -> None:
        """Close the socket without a close handshake."""
        if self._state is ConnectionState.OPEN:
            self._start_closing(code, reason)
        self._close_socket()

    def _abort_slow_reader(self) -> None:
        _log.info(
            "aborted connection from %s: %d bytes waiting to be sent exceed "
            "the send buffer limit of %d bytes",
            self.remote_address,
            len(self._pending),
            self._send_buffer_limit,
        )
        self._start_closing(CloseCode.POLICY_VIOLATION, _SEND_BUFFER_FULL)
        self._messages.clear()
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self._close_socket()

    def _close_socket(self) -> None:
        if self._state is ConnectionState.CLOSED:
            return
        if self._close_code is None:
            self._close_code = CloseCode.ABNORMAL
        self._state = ConnectionState.CLOSED
        self._pending.clear()
        if self._sock.fileno() != -1:
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()
        if self._drained_lot:
            self._drained_lot.unpark_all()
        if self._read_lot:
            self._read_lot.unpark_all()


async def _send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        view = view[sent:]


def _set_nodelay(sock: socket.socket) -> None:
    # Chat messages are small and latency-bound, so Nagle's delay only hurts.
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# Server side


@asynccontextmanager
async def accept(
    sock: socket.socket,
    initial_data: bytes,
    *,
    remote_address: str,
    select_subprotocol: Callable[[HandshakeRequest], str | None],
    handshake_timeout: float,
    close_timeout: float,
    max_message_size: int,
    send_buffer_limit: int,
    nursery: trio.Nursery | None = None,
) -> AsyncIterator[WsprotoConnection]:
    """Complete the server handshake on sock and yield the open connection.

    On a normal exit the connection is closed with NORMAL unless it is closed
    already. On cancellation a GOING_AWAY frame is sent if the socket takes it at
    once, and the socket is closed without waiting. The backlog writer runs in
    ``nursery`` when one is given (a server's nursery of all connections), else
    in a nursery of this connection's own, which costs about 1 KiB more per
    connection.

    Raises:
        HandshakeError: the request was rejected, after the response was sent.
    """
    sock.setblocking(False)
    _set_nodelay(sock)
    connection = None
    with trio.move_on_after(handshake_timeout):
        connection = await _accept_handshake(
            sock,
            initial_data,
            remote_address=remote_address,
            select_subprotocol=select_subprotocol,
            close_timeout=close_timeout,
            max_message_size=max_message_size,
            send_buffer_limit=send_buffer_limit,
        )
    del initial_data
    if connection is None:
        error = HandshakeError(408, f"handshake timed out after {handshake_timeout} s")
        reject(sock, remote_address, error)
        raise error

    if nursery is not None:
        connection._nursery = nursery
        try:
            yield connection
            await connection.close()
        finally:
            connection.close_now()
        return

    try:
        async with trio.open_nursery() as own_nursery:
            connection._nursery = own_nursery
            try:
                yield connection
                await connection.close()
            finally:
                own_nursery.cancel_scope.cancel()
    finally:
        connection.close_now()


async def _accept_handshake(
    sock: socket.socket,
    initial_data: bytes,
    *,
    remote_address: str,
    select_subprotocol: Callable[[HandshakeRequest], str | None],
    close_timeout: float,
    max_message_size: int,
    send_buffer_limit: int,
) -> WsprotoConnection:
    try:
        head, early_data = await read_request_head(sock, initial_data)
        upgrade = handshake.check_upgrade(head)
    except HandshakeError as error:
        send_error_response(sock, handshake.rejection_response(error))
        log_rejection(remote_address, error)
        raise
    request = upgrade.request
    subprotocol = select_subprotocol_or_reject(
        sock, remote_address, request, select_subprotocol
    )
    await _send_all(sock, handshake.accept_response(upgrade.key, subprotocol))

    protocol = ProtocolConnection(ConnectionType.SERVER)
    connection = WsprotoConnection(
        sock,
        protocol,
        client=False,
        request=request,
        subprotocol=subprotocol,
        remote_address=remote_address,
        close_timeout=close_timeout,
        max_message_size=max_message_size,
        send_buffer_limit=send_buffer_limit,
    )
    connection.feed(early_data)
    return connection


# Client side


@asynccontextmanager
async def connect(
    host: str,
    port: int,
    resource: str,
    *,
    subprotocols: Sequence[str] = (),
    extra_headers: Sequence[tuple[str, str]] = (),
    connect_timeout: float = 10.0,
    max_message_size: int = 1 << 20,
    send_buffer_limit: int = 1 << 20,
) -> AsyncIterator[WsprotoConnection]:
    """Open a client connection, as described at shardchat.websocket.connect."""
    try:
        with trio.fail_after(connect_timeout):
            sock = await _open_socket(host, port)
            try:
                connection = await _connect_handshake(
                    sock,
                    host,
                    port,
                    resource,
                    subprotocols=subprotocols,
                    extra_headers=extra_headers,
                    max_message_size=max_message_size,
                    send_buffer_limit=send_buffer_limit,
                )
            except BaseException:
                sock.close()
                raise
    except trio.TooSlowError:
        raise TimeoutError(
            f"websocket connection to {host}:{port} timed out after {connect_timeout} s"
        ) from None

    try:
        async with trio.open_nursery() as nursery:
            connection._nursery = nursery
            try:
                yield connection
                await connection.close()
            finally:
                nursery.cancel_scope.cancel()
    finally:
        connection.close_now()


async def _open_socket(host: str, port: int) -> socket.socket:
    """Connect to the first address of host that accepts, and return the socket."""
    addresses = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last_error: OSError | None = None
    for family, kind, proto, _, address in addresses:
        trio_sock = trio.socket.socket(family, kind, proto)
        try:
            await trio_sock.connect(address)
        except OSError as exc:
            trio_sock.close()
            last_error = exc
            continue
        except BaseException:
            trio_sock.close()
            raise
        # The connection uses the stdlib socket's non-blocking calls directly.
        sock = socket.socket(family, kind, proto, fileno=trio_sock.detach())
        sock.setblocking(False)
        _set_nodelay(sock)
        return sock
    if last_error is not None:
        raise last_error
    raise OSError(f"no address found for {host!r}")


async def _connect_handshake(
    sock: socket.socket,
    host: str,
    port: int,
    resource: str,
    *,
    subprotocols: Sequence[str],
    extra_headers: Sequence[tuple[str, str]],
    max_message_size: int,
    send_buffer_limit: int,
) -> WsprotoConnection:
    host_header = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    key = handshake.new_key()
    await _send_all(
        sock,
        handshake.client_request(
            host_header, resource, key, subprotocols, extra_headers
        ),
    )

    remote_address = format_address(sock)
    received = bytearray()
    while True:
        end = received.find(b"\r\n\r\n")
        if end >= 0:
            break
        if len(received) > MAX_RESPONSE_HEAD:
            raise HandshakeError(
                0,
                f"handshake response from {remote_address} exceeds {MAX_RESPONSE_HEAD} bytes",
            )
        await trio.lowlevel.wait_readable(sock)
        try:
            chunk = sock.recv(RECEIVE_BUFFER_SIZE)
        except BlockingIOError:
            continue
        if not chunk:
            raise HandshakeError(
                0, f"{remote_address} closed the connection during the handshake"
            )
        received += chunk
    try:
        subprotocol = handshake.check_response(bytes(received[:end]), key, subprotocols)
    except HandshakeError as error:
        if error.status:
            raise HandshakeError(
                error.status,
                f"{remote_address} rejected the websocket upgrade with "
                f"status {error.status}",
            ) from None
        raise HandshakeError(0, f"{error} (from {remote_address})") from None

    headers = [("host", host_header)]
    headers += [(name.lower(), value) for name, value in extra_headers]
    if subprotocols:
        headers.append(("sec-websocket-protocol", ", ".join(subprotocols)))
    connection = WsprotoConnection(
        sock,
        ProtocolConnection(ConnectionType.CLIENT),
        client=True,
        request=make_request(resource, headers),
        subprotocol=subprotocol,
        remote_address=remote_address,
        close_timeout=CLIENT_CLOSE_TIMEOUT,
        max_message_size=max_message_size,
        send_buffer_limit=send_buffer_limit,
    )
    # Frames that came with the response are parsed like any later ones.
    connection.feed(bytes(received[end + 4 :]))
    return connection
