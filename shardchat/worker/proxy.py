"""Chat channels of connections held by another worker (one socket per client).

A client may join its presence topic and any number of ``chats:*`` topics on
one socket, wherever the router placed it. When a chat belongs to another
worker, the worker with the socket forwards the client's frames for
that topic, already decoded, to the chat's worker over their peer link. There
a ``ClientConnection`` whose websocket is a ``ProxyWebSocket`` handles them
with the same code as a local connection; its output frames travel back over
the link and are written to the real websocket unchanged. The per-chat socket
(the ``chat`` URL parameter) stays the fast path and never crosses a link.

Messages on a peer link (msgpack maps, see ``shardchat.ipc``):

- ``proxy_open {conn, identity, vsn}``: first forwarded frame of a connection;
- ``proxy_in {conn, message}``: a client frame as ``[join_ref, ref, topic, event, payload]``;
- ``proxy_out {conn, text}``: an encoded frame for the client;
- ``proxy_close {conn}``: the client connection closed;
- ``proxy_topic_closed {conn, topic}``: the chat's worker closed or refused a
  forwarded channel, so the holding worker stops counting it against the
  100-channel limit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shardchat.close_codes import CloseCode
from shardchat.exceptions import ConnectionClosed

if TYPE_CHECKING:
    from shardchat.ipc import Link
    from shardchat.websocket import HandshakeRequest


class ProxyWebSocket:
    """The websocket side of a forwarded connection: frames go back over a link."""

    remote_address = "peer worker"
    request: HandshakeRequest | None = None
    subprotocol = None

    def __init__(self, link: Link, connection_id: int) -> None:
        self.link = link
        self.connection_id = connection_id
        self.closed = False

    def send(self, text: str) -> None:
        if self.closed or self.link.closed:
            raise ConnectionClosed(CloseCode.GOING_AWAY, "peer link closed")
        self.link.send({"op": "proxy_out", "conn": self.connection_id, "text": text})

    def topic_closed(self, topic: str) -> None:
        """Tell the holding worker that a forwarded channel closed or was refused."""
        if not self.link.closed:
            self.link.send(
                {"op": "proxy_topic_closed", "conn": self.connection_id, "topic": topic}
            )

    async def receive(self) -> str:
        raise RuntimeError("a proxied connection receives frames from its link")

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        # Closing the client's socket is the holding worker's decision; a
        # protocol error on a forwarded frame closes only what was forwarded.
        self.closed = True
