"""Websocket connections: the interface the chat code uses and the engine behind it.

A worker receives an accepted TCP socket from the router together with the bytes
the router already read, and calls serve() on it. serve() finishes the opening
handshake, runs the handler, and closes the socket on every path, so a crash or a
slow client on one connection never affects the others.

Two engines implement the same Connection interface. "wsproto" is the default: one
task per connection reads the socket itself, and send() writes frames without a
task switch. "trio-websocket" wraps the trio-websocket library and is kept to
compare against. The engines live in shardchat.engines.
"""

from __future__ import annotations

import logging
import socket
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

from shardchat.close_codes import CloseCode
from shardchat.exceptions import ConnectionClosed, HandshakeError

if typing.TYPE_CHECKING:
    import trio

ENGINES = ("wsproto", "trio-websocket")
DEFAULT_ENGINE = "wsproto"

_log = logging.getLogger("shardchat.websocket")


@dataclass(frozen=True)
class HandshakeRequest:
    """The HTTP upgrade request that opened a connection.

    Attributes:
        path: the request target without the query string, not percent-decoded.
        query: the query parameters, where the last value of a repeated name wins.
        headers: every request header in order, with lowercased names.
        subprotocols: the subprotocols offered in Sec-WebSocket-Protocol, in order.
    """

    path: str
    query: dict[str, str]
    headers: tuple[tuple[str, str], ...]
    subprotocols: tuple[str, ...]


class Connection(typing.Protocol):
    """One websocket connection, as both engines and connect() provide it.

    Attributes:
        remote_address: the peer's "host:port", read from the socket itself.
        request: the upgrade request, as received by a server or sent by a client.
        subprotocol: the subprotocol the server selected, or None.
    """

    remote_address: str
    request: HandshakeRequest
    subprotocol: str | None

    @property
    def closed(self) -> bool:
        """Whether a close frame was sent or received, or the socket is gone."""
        ...

    async def receive(self) -> str | bytes:
        """Return the next complete message.

        Raises:
            ConnectionClosed: the connection is closing or closed, with the
                close code and reason.
        """
        ...

    def send(self, text: str) -> None:
        """Queue a text message without blocking and without a checkpoint.

        Raises:
            ConnectionClosed: the connection is closing or closed.
        """
        ...

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Run the close handshake and close the socket. Later calls wait for it."""
        ...


def format_address(sock: socket.socket) -> str:
    """Return the peer address of sock as "host:port", or "[host]:port" for IPv6."""
    try:
        address = sock.getpeername()
    except OSError:
        return "unknown"
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        if ":" in host:
            return f"[{host}]:{port}"
        return f"{host}:{port}"
    # An AF_UNIX peer usually has no name.
    return str(address) or "unnamed"


def _select_no_subprotocol(request: HandshakeRequest) -> str | None:
    return None


async def serve(
    sock: socket.socket,
    initial_data: bytes,
    handler: Callable[[Connection], Awaitable[None]],
    *,
    engine: str = DEFAULT_ENGINE,
    select_subprotocol: Callable[
        [HandshakeRequest], str | None
    ] = _select_no_subprotocol,
    handshake_timeout: float = 10.0,
    close_timeout: float = 5.0,
    max_message_size: int = 1 << 20,
    send_buffer_limit: int = 1 << 20,
    nursery: trio.Nursery | None = None,
) -> None:
    """Accept a websocket connection on an accepted socket and run handler on it.

    initial_data are the bytes already read from sock: the request head, maybe
    followed by early frames, or only part of the head, or nothing. An invalid
    request gets an HTTP error response (400 in most cases) and the handler is
    not called. select_subprotocol may raise HandshakeError to reject the
    request with that status instead, for example 403 for a bad token.

    When the handler returns, the connection is closed with NORMAL. When it
    raises, the error is logged with the remote address, the connection is
    closed with INTERNAL_ERROR and serve returns normally, so one connection's
    failure never cancels the tasks next to it. serve closes sock before it
    returns or raises, cancellation included.

    Args:
        sock: a connected TCP socket. It is switched to non-blocking mode.
        initial_data: bytes already read from sock.
        handler: the coroutine function that runs the connection.
        engine: one of ENGINES.
        select_subprotocol: returns one of request.subprotocols, or None.
        handshake_timeout: maximum seconds to receive the request and respond.
        close_timeout: maximum seconds to wait for the peer's close frame.
        max_message_size: maximum size of a received message in bytes. A larger
            message closes the connection with MESSAGE_TOO_BIG.
        send_buffer_limit: maximum bytes waiting to be sent. Past it the peer is
            a slow reader, and the connection is aborted with POLICY_VIOLATION.
        nursery: a long-lived nursery for the engine's background tasks; with
            none, the engine opens one per connection.

    Raises:
        ValueError: engine is not one of ENGINES.
    """
    try:
        accept = _load_engine(engine)
        remote_address = format_address(sock)
        try:
            async with accept(
                sock,
                initial_data,
                remote_address=remote_address,
                select_subprotocol=select_subprotocol,
                handshake_timeout=handshake_timeout,
                close_timeout=close_timeout,
                max_message_size=max_message_size,
                send_buffer_limit=send_buffer_limit,
                nursery=nursery,
            ) as connection:
                # The head is not needed past the handshake; a connection may
                # live for hours.
                del initial_data
                await _run_handler(handler, connection)
        except HandshakeError:
            # The engine has sent the error response and logged the rejection.
            pass
        except Exception:
            _log.exception(
                "websocket engine %s failed on connection from %s",
                engine,
                remote_address,
            )
    finally:
        sock.close()


async def _run_handler(
    handler: Callable[[Connection], Awaitable[None]], connection: Connection
) -> None:
    try:
        await handler(connection)
    except Exception as exc:
        if not (connection.closed and _is_connection_closed(exc)):
            # A ConnectionClosed while this connection is still open comes from
            # another connection the handler used, so it is a handler failure.
            _log.exception(
                "handler failed on connection from %s", connection.remote_address
            )
            await connection.close(CloseCode.INTERNAL_ERROR)
            return
    await connection.close(CloseCode.NORMAL)


def _is_connection_closed(exc: BaseException) -> bool:
    if isinstance(exc, ConnectionClosed):
        return True
    if isinstance(exc, BaseExceptionGroup):
        # A handler that runs a nursery reports a closed connection in a group.
        _, rest = exc.split(ConnectionClosed)
        return rest is None
    return False


def _load_engine(name: str) -> Callable[..., AbstractAsyncContextManager[Connection]]:
    """Return the accept() of the named engine."""
    # The engines import from this module, so they are imported on first use.
    # This also loads trio-websocket only when it is selected.
    if name == "wsproto":
        from shardchat.engines import wsproto_engine

        return wsproto_engine.accept
    if name == "trio-websocket":
        from shardchat.engines import trio_websocket_engine

        return trio_websocket_engine.accept
    raise ValueError(f"unknown websocket engine {name!r}, expected one of {ENGINES}")


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
) -> AsyncIterator[Connection]:
    """Open a client websocket connection with the wsproto engine.

    When the block ends, the connection is closed with NORMAL. When it raises,
    the socket is closed at once, after a GOING_AWAY frame if the socket takes it
    without waiting.

    Args:
        host: the server's host name or address.
        port: the server's TCP port.
        resource: the request target, path and query string.
        subprotocols: the subprotocols to offer, in order of preference.
        extra_headers: more request headers to send.
        connect_timeout: maximum seconds for the TCP connect and the handshake.
        max_message_size: maximum size of a received message in bytes.
        send_buffer_limit: maximum bytes waiting to be sent before the
            connection is aborted.

    Raises:
        HandshakeError: the server responded with a status other than 101
            (status is that status), or its response was invalid (status 0).
        TimeoutError: connect_timeout passed.
        OSError: the TCP connection failed.
    """
    from shardchat.engines import wsproto_engine

    async with wsproto_engine.connect(
        host,
        port,
        resource,
        subprotocols=subprotocols,
        extra_headers=extra_headers,
        connect_timeout=connect_timeout,
        max_message_size=max_message_size,
        send_buffer_limit=send_buffer_limit,
    ) as connection:
        yield connection
