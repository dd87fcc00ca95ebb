"""The Phoenix Channels wire format and per-connection channel rules, without I/O.

Serializer 2.0.0 frames are JSON arrays ``[join_ref, ref, topic, event,
payload]``; serializer 1.0.0 frames are JSON objects with the same five
fields. Replies are ``phx_reply`` events whose payload is ``{"status": "ok" |
"error", "response": {...}}``, the response always a map.

``ChannelTable`` applies Phoenix's rules for one connection: which topics are
joined under which join_ref, what a leave, a rejoin or an event on an
unjoined topic turns into. It decides; the worker acts.
"""

from __future__ import annotations

import enum
from typing import Any, NamedTuple

import orjson

from shardchat.exceptions import ProtocolError

PHOENIX_TOPIC = "phoenix"
HEARTBEAT = "heartbeat"
JOIN = "phx_join"
LEAVE = "phx_leave"
CLOSE = "phx_close"
ERROR = "phx_error"
REPLY = "phx_reply"

SERIALIZER_V1 = "1.0.0"
SERIALIZER_V2 = "2.0.0"
SERIALIZERS = (SERIALIZER_V1, SERIALIZER_V2)

# Phoenix refuses a join past this many channels on one socket.
MAX_CHANNELS = 100


class Message(NamedTuple):
    """One Phoenix frame."""

    join_ref: str | None
    ref: str | None
    topic: str
    event: str
    payload: Any


def _check(join_ref: Any, ref: Any, topic: Any, event: Any, payload: Any) -> Message:
    if join_ref is not None and not isinstance(join_ref, str):
        raise ProtocolError(f"invalid join_ref {join_ref!r}: expected string or null")
    if ref is not None and not isinstance(ref, str):
        raise ProtocolError(f"invalid ref {ref!r}: expected string or null")
    if not isinstance(topic, str) or not topic:
        raise ProtocolError(f"invalid topic {topic!r}: expected a non-empty string")
    if not isinstance(event, str) or not event:
        raise ProtocolError(f"invalid event {event!r}: expected a non-empty string")
    return Message(join_ref, ref, topic, event, payload)


def decode_v2(text: str | bytes) -> Message:
    """Parse a serializer 2.0.0 frame.

    Raises:
        ProtocolError: the frame is not a JSON array of five valid fields.
    """
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"invalid JSON frame: {exc}") from None
    if type(value) is not list or len(value) != 5:
        raise ProtocolError(
            "invalid frame: expected [join_ref, ref, topic, event, payload]"
        )
    return _check(*value)


def encode_v2(message: Message) -> str:
    """Serialize a frame with serializer 2.0.0."""
    return orjson.dumps(tuple(message)).decode()


def decode_v1(text: str | bytes) -> Message:
    """Parse a serializer 1.0.0 frame (a JSON object).

    Raises:
        ProtocolError: the frame is not an object with topic, event and payload.
    """
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"invalid JSON frame: {exc}") from None
    if type(value) is not dict:
        raise ProtocolError("invalid frame: expected a JSON object")
    return _check(
        value.get("join_ref"),
        value.get("ref"),
        value.get("topic"),
        value.get("event"),
        value.get("payload", {}),
    )


def encode_v1(message: Message) -> str:
    """Serialize a frame with serializer 1.0.0."""
    return orjson.dumps(
        {
            "join_ref": message.join_ref,
            "ref": message.ref,
            "topic": message.topic,
            "event": message.event,
            "payload": message.payload,
        }
    ).decode()


class Codec(NamedTuple):
    """The decode and encode functions of one serializer version."""

    version: str
    decode: Any
    encode: Any


CODECS = {
    SERIALIZER_V1: Codec(SERIALIZER_V1, decode_v1, encode_v1),
    SERIALIZER_V2: Codec(SERIALIZER_V2, decode_v2, encode_v2),
}


def reply(request: Message, status: str, response: dict | None = None) -> Message:
    """Build the ``phx_reply`` to ``request``."""
    payload = {"status": status, "response": {} if response is None else response}
    return Message(request.join_ref, request.ref, request.topic, REPLY, payload)


def error_reply(request: Message, reason: str) -> Message:
    """Build an error reply with ``{"reason": reason}``."""
    return reply(request, "error", {"reason": reason})


def push(join_ref: str | None, topic: str, event: str, payload: Any) -> Message:
    """Build a server push on a joined channel (no ref)."""
    return Message(join_ref, None, topic, event, payload)


def close(topic: str, join_ref: str | None) -> Message:
    """Build the ``phx_close`` that ends the channel joined under ``join_ref``."""
    return Message(join_ref, join_ref, topic, CLOSE, {})


class Action(enum.Enum):
    """The worker's next step for an incoming frame."""

    HEARTBEAT = "heartbeat"  # reply ok with an empty response
    JOIN = "join"  # authorize, then accept_join() or reply an error
    LEAVE = "leave"  # release the channel, reply ok, send phx_close
    LEAVE_UNJOINED = "leave_unjoined"  # reply ok, nothing else
    EVENT = "event"  # dispatch to the channel
    UNMATCHED = "unmatched"  # reply error "unmatched topic"
    TOO_MANY = "too_many"  # reply error "too many channels joined"
    STALE = "stale"  # ignore: the join_ref names an earlier channel


class ChannelTable:
    """The channels joined on one connection, keyed by topic."""

    __slots__ = ("forwarded", "joined")

    def __init__(self) -> None:
        self.joined: dict[str, str | None] = {}
        # Channels of this connection joined on other workers, which count
        # towards the limit too.
        self.forwarded = 0

    def classify(self, message: Message) -> Action:
        """Decide what ``message`` means under Phoenix's channel rules."""
        topic = message.topic
        event = message.event
        current = self.joined.get(topic, _UNJOINED)
        if event == JOIN:
            if (
                current is _UNJOINED
                and len(self.joined) + self.forwarded >= MAX_CHANNELS
            ):
                return Action.TOO_MANY
            return Action.JOIN
        if topic == PHOENIX_TOPIC and event == HEARTBEAT:
            return Action.HEARTBEAT
        if current is _UNJOINED:
            return Action.LEAVE_UNJOINED if event == LEAVE else Action.UNMATCHED
        # Phoenix ignores frames that carry the join_ref of an earlier channel.
        if message.join_ref is not None and message.join_ref != current:
            return Action.STALE
        return Action.LEAVE if event == LEAVE else Action.EVENT

    def previous_join_ref(self, topic: str) -> str | None | object:
        """Return the join_ref the topic is joined under, or ``UNJOINED``."""
        return self.joined.get(topic, _UNJOINED)

    def accept_join(self, topic: str, join_ref: str | None) -> None:
        self.joined[topic] = join_ref

    def remove(self, topic: str) -> None:
        self.joined.pop(topic, None)


_UNJOINED = object()
UNJOINED = _UNJOINED
