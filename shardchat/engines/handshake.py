"""Both sides of the websocket opening handshake, without h11.

The router has already read and checked the request head, so the worker only
needs the upgrade checks of RFC 6455 section 4.2.1 and the 101 response. Doing
them directly costs a few microseconds, where parsing the head with h11 and
again with wsproto's handshake took about half of a connection's setup time
(py-spy profile of a worker under the reference workload).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Sequence

from shardchat import http
from shardchat.engines import make_request
from shardchat.exceptions import HandshakeError
from shardchat.websocket import HandshakeRequest

# RFC 6455 section 1.3: the GUID appended to the key before hashing.
_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SUPPORTED_VERSION = "13"


class UpgradeRequest:
    """A checked upgrade request: what the 101 response needs."""

    __slots__ = ("key", "request")

    def __init__(self, request: HandshakeRequest, key: str) -> None:
        self.request = request
        self.key = key


def check_upgrade(head: bytes) -> UpgradeRequest:
    """Parse a request head and check it is a valid websocket upgrade.

    Raises:
        HandshakeError: 400 for a malformed head or a missing or invalid
            upgrade header, 426 for a websocket version other than 13.
    """
    parsed = http.parse_head(head)
    headers = parsed.headers
    if parsed.method != "GET":
        raise HandshakeError(400, f"invalid upgrade request: method {parsed.method}")
    if "host" not in headers:
        raise HandshakeError(400, "invalid upgrade request: missing Host header")
    if not parsed.is_websocket_upgrade():
        raise HandshakeError(
            400,
            "invalid upgrade request: missing Upgrade: websocket or Connection: Upgrade",
        )
    version = headers.get("sec-websocket-version")
    if version != SUPPORTED_VERSION:
        raise HandshakeError(
            426, f"unsupported websocket version {version!r}: expected 13"
        )
    key = headers.get("sec-websocket-key", "")
    try:
        decoded = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if len(decoded) != 16:
        raise HandshakeError(400, "invalid upgrade request: invalid Sec-WebSocket-Key")
    request = make_request(parsed.target, list(_header_items(head)))
    return UpgradeRequest(request, key)


def _header_items(head: bytes):
    # Every header line in order, names lowercased, for HandshakeRequest.headers.
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, colon, value = line.partition(":")
        if colon:
            yield name.lower(), value.strip()


def accept_response(key: str, subprotocol: str | None) -> bytes:
    """Build the 101 response for a checked upgrade."""
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {accept_value(key)}",
    ]
    if subprotocol is not None:
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def rejection_response(error: HandshakeError) -> bytes:
    """Build the response for a rejected upgrade (426 names the version)."""
    extra = (
        (("Sec-WebSocket-Version", SUPPORTED_VERSION),) if error.status == 426 else ()
    )
    return http.response(error.status, extra_headers=extra)


def accept_value(key: str) -> str:
    """Return the Sec-WebSocket-Accept value for a key (RFC 6455 section 4.2.2)."""
    digest = hashlib.sha1(key.encode("ascii") + _ACCEPT_GUID).digest()
    return base64.b64encode(digest).decode("ascii")


def new_key() -> str:
    """Return a fresh Sec-WebSocket-Key: 16 random bytes, base64 encoded."""
    return base64.b64encode(os.urandom(16)).decode("ascii")


def client_request(
    host_header: str,
    resource: str,
    key: str,
    subprotocols: Sequence[str] = (),
    extra_headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    """Build a client's upgrade request (RFC 6455 section 4.1)."""
    lines = [
        f"GET {resource} HTTP/1.1",
        f"Host: {host_header}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        f"Sec-WebSocket-Version: {SUPPORTED_VERSION}",
    ]
    if subprotocols:
        lines.append(f"Sec-WebSocket-Protocol: {', '.join(subprotocols)}")
    lines.extend(f"{name}: {value}" for name, value in extra_headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def check_response(head: bytes, key: str, subprotocols: Sequence[str]) -> str | None:
    """Check a server's response to an upgrade; return the selected subprotocol.

    Raises:
        HandshakeError: with the server's status when it is not 101, or with
            status 0 when the response is not a valid websocket accept.
    """
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise HandshakeError(0, f"invalid handshake response {lines[0][:80]!r}")
    status = int(parts[1])
    if status != 101:
        raise HandshakeError(status, f"websocket upgrade rejected with status {status}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    if headers.get("upgrade", "").lower() != "websocket":
        raise HandshakeError(
            0, "invalid handshake response: missing Upgrade: websocket"
        )
    if headers.get("sec-websocket-accept") != accept_value(key):
        raise HandshakeError(
            0, "invalid handshake response: wrong Sec-WebSocket-Accept"
        )
    subprotocol = headers.get("sec-websocket-protocol")
    if subprotocol is not None and subprotocol not in subprotocols:
        raise HandshakeError(
            0,
            f"invalid handshake response: subprotocol {subprotocol!r} was not offered",
        )
    return subprotocol
