"""Exceptions raised by shardchat.

Every exception the package raises on purpose derives from ShardchatError::

    ShardchatError
    ├── TokenError               a token is malformed, forged or expired
    ├── ProtocolError            a client frame breaks the Phoenix Channels protocol
    ├── HandshakeError           an HTTP request head cannot be accepted
    ├── ConnectionClosed         a websocket connection is closed (carries the code)
    ├── HandOffError             a socket hand-off between processes failed
    └── ConfigurationError       a command-line option or setting is invalid
"""


class ShardchatError(Exception):
    """Base class of every error shardchat raises on purpose."""


class TokenError(ShardchatError):
    """A token is malformed, carries a bad signature, or has expired."""


class ProtocolError(ShardchatError):
    """A client frame does not follow the Phoenix Channels protocol."""


class HandshakeError(ShardchatError):
    """An HTTP request head cannot be accepted.

    Attributes:
        status: the HTTP status code of the response.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ConnectionClosed(ShardchatError):
    """A websocket connection is closed.

    Attributes:
        code: the close code received or sent, or None when the TCP
            connection ended without a close frame.
        reason: the close reason, possibly empty.
    """

    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(f"connection closed: code={code} reason={reason!r}")
        self.code = code
        self.reason = reason


class HandOffError(ShardchatError):
    """A socket could not be passed from one process to another."""


class ConfigurationError(ShardchatError):
    """A command-line option or setting is invalid."""
