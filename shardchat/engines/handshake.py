"""The server side of the websocket opening handshake, without h11.

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
    digest = hashlib.sha1(key.encode("ascii") + _ACCEPT_GUID).digest()
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {base64.b64encode(digest).decode('ascii')}",
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
