"""Websocket engines and the opening-handshake steps they share.

Each engine module provides ``accept()``, an async context manager that completes
the server handshake on a socket and yields a shardchat.websocket.Connection.

Both engines read the request head with read_request_head() instead of letting a
library read it. The router may have read the whole head, part of it or none of
it, and wsproto 1.3.2 drops any bytes that follow the head in the buffer it
parses. So the head is cut off here, and the early frames after it are fed to
the connection once the handshake is done.
"""

from __future__ import annotations

import contextlib
import http
import logging
import re
import socket
from collections.abc import Callable, Iterable
from urllib.parse import parse_qsl, urlsplit

import h11
import trio
from wsproto import ConnectionType
from wsproto.events import RejectConnection
from wsproto.handshake import H11Handshake
from wsproto.utilities import RemoteProtocolError

from shardchat.close_codes import CloseCode
from shardchat.exceptions import HandshakeError
from shardchat.websocket import HandshakeRequest

_log = logging.getLogger("shardchat.websocket")

# The same bound as h11's default max_incomplete_event_size, so a head that
# passes here also passes h11.
MAX_HEAD_SIZE = 16 * 1024

_RECEIVE_SIZE = 4096

# h11 ends a head at an empty line and accepts a bare LF as a line ending.
_HEAD_END = re.compile(rb"\n\r?\n")


def utf8_size(text: str) -> int:
    """Return the UTF-8 size of text in bytes, without encoding ASCII text."""
    if text.isascii():
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


async def read_request_head(
    sock: socket.socket, initial_data: bytes
) -> tuple[bytes, bytes]:
    """Read from sock until the HTTP request head is complete.

    Returns the head, up to and including its empty line, and the bytes after it.

    Raises:
        HandshakeError: the head exceeds MAX_HEAD_SIZE (431), or the peer closed
            or reset the connection before the head was complete (400).
    """
    data = bytearray(initial_data)
    search_from = 0
    while True:
        match = _HEAD_END.search(data, search_from)
        if match is not None:
            end = match.end()
            if end > MAX_HEAD_SIZE:
                break
            return bytes(data[:end]), bytes(data[end:])
        if len(data) > MAX_HEAD_SIZE:
            break
        # A match can start up to 2 bytes before the new data.
        search_from = max(0, len(data) - 2)

        await trio.lowlevel.wait_readable(sock)
        try:
            chunk = sock.recv(_RECEIVE_SIZE)
        except BlockingIOError:
            continue
        except OSError as exc:
            raise HandshakeError(
                400, f"connection failed before the request head was complete: {exc}"
            ) from None
        if not chunk:
            raise HandshakeError(
                400, "connection closed before the request head was complete"
            )
        data += chunk
    raise HandshakeError(431, f"request head exceeds {MAX_HEAD_SIZE} bytes")


def parse_request_head(head: bytes) -> HandshakeRequest:
    """Parse a complete HTTP request head with h11.

    Only the HTTP syntax is checked here, and start_server_handshake() checks the
    upgrade headers. Header values are decoded as ISO-8859-1, as ASGI servers do.

    Raises:
        HandshakeError: the head is not a valid HTTP/1.1 request (400).
    """
    parser = h11.Connection(h11.SERVER)
    parser.receive_data(head)
    try:
        event = parser.next_event()
    except h11.RemoteProtocolError as exc:
        raise HandshakeError(400, f"invalid HTTP request head: {exc}") from None
    if not isinstance(event, h11.Request):
        raise HandshakeError(400, "invalid HTTP request head: no request line")
    headers = [
        (name.decode("ascii"), value.decode("latin-1")) for name, value in event.headers
    ]
    return make_request(event.target.decode("ascii"), headers)


def make_request(target: str, headers: Iterable[tuple[str, str]]) -> HandshakeRequest:
    """Build a HandshakeRequest from a request target and lowercase-named headers."""
    parts = urlsplit(target)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    header_tuple = tuple(headers)
    subprotocols = tuple(
        token.strip()
        for name, value in header_tuple
        if name == "sec-websocket-protocol"
        for token in value.split(",")
        if token.strip()
    )
    return HandshakeRequest(parts.path, query, header_tuple, subprotocols)


def start_server_handshake(
    sock: socket.socket, remote_address: str, head: bytes
) -> H11Handshake:
    """Check the upgrade headers of head with wsproto (RFC 6455 section 4.2.1).

    Returns wsproto's server handshake, ready to send AcceptConnection.

    Raises:
        HandshakeError: the request is not a valid websocket upgrade. wsproto's
            response, 400 or 426 for an unsupported version, has been sent.
    """
    handshake = H11Handshake(ConnectionType.SERVER)
    try:
        handshake.receive_data(head)
        for _ in handshake.events():
            pass
    except RemoteProtocolError as exc:
        hint = exc.event_hint
        if not isinstance(hint, RejectConnection):
            hint = RejectConnection()
        error = HandshakeError(hint.status_code, f"invalid upgrade request: {exc}")
        send_error_response(sock, handshake.send(hint))
        log_rejection(remote_address, error)
        raise error from None
    return handshake


def select_subprotocol_or_reject(
    sock: socket.socket,
    remote_address: str,
    request: HandshakeRequest,
    select_subprotocol: Callable[[HandshakeRequest], str | None],
) -> str | None:
    """Return the subprotocol that select_subprotocol picks, or reject the request.

    Raises:
        HandshakeError: select_subprotocol raised it, and its status has been
            sent. Or select_subprotocol failed or returned a subprotocol the
            client did not offer, which is logged and rejected with 500.
    """
    try:
        subprotocol = select_subprotocol(request)
        if subprotocol is not None and subprotocol not in request.subprotocols:
            raise ValueError(
                f"selected subprotocol {subprotocol!r} is not one of the offered "
                f"{request.subprotocols}"
            )
    except HandshakeError as error:
        reject(sock, remote_address, error)
        raise
    except Exception:
        _log.exception("subprotocol selection failed for %s", remote_address)
        error = HandshakeError(500, "subprotocol selection failed")
        send_error_response(sock, error_response(error.status))
        raise error from None
    return subprotocol


def as_close_code(code: int) -> int:
    """Return code as a CloseCode member, or as a plain int when it has none."""
    try:
        return CloseCode(code)
    except ValueError:
        # Codes 3000-4999 belong to applications and have no CloseCode member.
        return int(code)


def reject(sock: socket.socket, remote_address: str, error: HandshakeError) -> None:
    """Send the response for error.status and log the rejection at debug."""
    send_error_response(sock, error_response(error.status))
    log_rejection(remote_address, error)


def error_response(status: int) -> bytes:
    """Return an HTTP/1.1 response with the status, no body and Connection: close."""
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return (
        f"HTTP/1.1 {status} {phrase}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    ).encode("latin-1")


def send_error_response(sock: socket.socket, response: bytes) -> None:
    """Write a rejection response with one non-blocking send, ignoring failures.

    The response is small and the send buffer of a connection still in its
    handshake is empty, so one send takes all of it. A peer that is gone cannot
    read it anyway.
    """
    with contextlib.suppress(OSError):
        sock.send(response)


def log_rejection(remote_address: str, error: HandshakeError) -> None:
    """Log a rejected handshake at debug, because rejections are routine."""
    _log.debug(
        "rejected websocket handshake from %s with status %d: %s",
        remote_address,
        error.status,
        error,
    )
