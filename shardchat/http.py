"""HTTP/1.1 request heads and small responses, without I/O.

The router reads only the request head; this module parses it and builds the
plain responses the router sends itself (health, stats, errors).
"""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import parse_qsl, urlsplit

from shardchat.exceptions import HandshakeError

HEAD_END = b"\r\n\r\n"
MAX_HEAD_BYTES = 16 * 1024

REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    426: "Upgrade Required",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class Request(NamedTuple):
    """A parsed request head."""

    method: str
    target: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]

    def header_tokens(self, name: str) -> list[str]:
        """Return a comma-separated header's items, stripped and lowercased."""
        value = self.headers.get(name, "")
        return [item.strip().lower() for item in value.split(",") if item.strip()]

    def is_websocket_upgrade(self) -> bool:
        return "websocket" in self.header_tokens("upgrade") and "upgrade" in (
            self.header_tokens("connection")
        )


def head_length(buffer: bytes | bytearray) -> int:
    """Return the length of the head at the start of ``buffer``, or 0 if incomplete."""
    end = buffer.find(HEAD_END)
    return 0 if end < 0 else end + len(HEAD_END)


def parse_head(head: bytes) -> Request:
    """Parse a complete request head (request line and header fields).

    Raises:
        HandshakeError: status 400 for a malformed head.
    """
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError as exc:  # latin-1 decodes any byte; kept for clarity
        raise HandshakeError(400, "invalid request head encoding") from exc
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HandshakeError(400, f"invalid request line {lines[0][:80]!r}")
    method, target, _version = parts
    if not target.startswith("/"):
        raise HandshakeError(400, f"invalid request target {target[:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise HandshakeError(400, f"invalid header line {line[:80]!r}")
        key = name.lower()
        value = value.strip()
        # Repeated fields are joined with commas (RFC 9110 section 5.3).
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    split = urlsplit(target)
    query = dict(parse_qsl(split.query, keep_blank_values=True))
    return Request(method, target, split.path, query, headers)


def response(
    status: int,
    body: bytes = b"",
    *,
    content_type: str = "text/plain; charset=utf-8",
    extra_headers: tuple[tuple[str, str], ...] = (),
) -> bytes:
    """Build a complete ``Connection: close`` response."""
    lines = [
        f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "Cache-Control: no-store",
    ]
    lines.extend(f"{name}: {value}" for name, value in extra_headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def text_response(status: int, text: str) -> bytes:
    """Build a plain-text response whose body is ``text`` and a newline."""
    return response(status, (text + "\n").encode())
