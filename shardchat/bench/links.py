"""Bot connections: Phoenix frames over one websocket, or many topics on a shared one.

``Link`` is one websocket whose bot reads its frames itself. ``SharedSocket``
carries several topics on one websocket and routes each received frame to the
``TopicLink`` of its topic, so teacher and student code can use either kind
through the same push, receive, request and join calls. ``Tally`` counts the
frames and collects what the bots of a process report.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from shardchat.exceptions import ConnectionClosed
from shardchat.phoenix import (
    CLOSE,
    ERROR,
    HEARTBEAT,
    JOIN,
    LEAVE,
    PHOENIX_TOPIC,
    REPLY,
    Message,
    decode_v2,
    encode_v2,
)

logger = logging.getLogger("shardchat.bench.bots")

# Maximum wait for a reply to a request. The runner's timeout bounds the run
# as a whole.
REPLY_TIMEOUT_S = 30.0

MAX_RECORDED_ERRORS = 1000


class BotError(Exception):
    """A bot cannot go on: an unexpected frame or a connection that failed."""


class Rejected(BotError):
    """The server replied to a request with status error."""

    def __init__(self, event: str, reason: str) -> None:
        super().__init__(f"{event} rejected: {reason}")
        self.event = event
        self.reason = reason


class ChatEnded(Exception):
    """The server ended a chat before the bot expected it."""

    def __init__(self, reason: str | None) -> None:
        super().__init__(f"chat ended early: {reason}")
        self.reason = reason


def describe_error(exc: BaseException) -> str:
    """Return a one-line description, flattening exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe_error(inner) for inner in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


@dataclass
class Tally:
    """The counters and records one bot process writes to its result file."""

    role: str
    started_at: float
    frames_sent: int = 0
    frames_received: int = 0
    chats: list[dict[str, Any]] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    error_count: int = 0
    unfinished: set[str] = field(default_factory=set)
    finished_at: float | None = None
    rejected_claims: collections.Counter[str] = field(
        default_factory=collections.Counter
    )

    def record_error(self, bot_id: str, text: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_RECORDED_ERRORS:
            self.errors.append(f"{bot_id}: {text}")
        logger.warning("%s: %s", bot_id, text)

    def mark_finished(self, bot_id: str) -> None:
        self.unfinished.discard(bot_id)
        self.finished_at = time.time()

    def to_json(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "pid": os.getpid(),
            "frames_sent": self.frames_sent,
            "frames_received": self.frames_received,
            "chats": self.chats,
            "latency_ms": [round(sample, 3) for sample in self.latency_ms],
            "errors": self.errors,
            "error_count": self.error_count,
            "unfinished": sorted(self.unfinished),
            "rejected_claims": dict(self.rejected_claims),
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "cpu_s": time.process_time(),
        }


class Link:
    """One websocket connection that speaks Phoenix frames and counts them."""

    __slots__ = ("connection", "join_ref", "last_ref", "last_sent", "pending", "tally")

    def __init__(self, connection: Any, tally: Tally) -> None:
        self.connection = connection
        self.tally = tally
        self.join_ref: str | None = None
        self.last_ref = 0
        # Frames read while waiting for a reply, kept for the next receive().
        self.pending: collections.deque[Message] = collections.deque()
        self.last_sent = trio.current_time()

    def push(self, topic: str, event: str, payload: Any) -> str:
        """Send one frame on the joined topic and return its ref."""
        self.last_ref += 1
        ref = str(self.last_ref)
        if event == JOIN:
            self.join_ref = ref
        self.connection.send(
            encode_v2(Message(self.join_ref, ref, topic, event, payload))
        )
        self.tally.frames_sent += 1
        self.last_sent = trio.current_time()
        return ref

    def send_heartbeat(self) -> None:
        self.last_ref += 1
        frame = Message(None, str(self.last_ref), PHOENIX_TOPIC, HEARTBEAT, {})
        self.connection.send(encode_v2(frame))
        self.tally.frames_sent += 1
        self.last_sent = trio.current_time()

    async def receive(self) -> Message:
        """Return the next frame, skipping heartbeat replies.

        Raises:
            ConnectionClosed: the connection is closed.
        """
        if self.pending:
            return self.pending.popleft()
        while True:
            frame = await self._next_frame()
            if frame.topic != PHOENIX_TOPIC:
                return frame

    async def _next_frame(self) -> Message:
        frame = decode_v2(await self.connection.receive())
        self.tally.frames_received += 1
        return frame

    async def request(self, topic: str, event: str, payload: Any) -> dict[str, Any]:
        """Push a frame and wait for its reply; return the reply's response.

        Frames that arrive first are kept for ``receive``.

        Raises:
            Rejected: the reply has status error.
            BotError: no reply within REPLY_TIMEOUT_S.
            ConnectionClosed: the connection closed first.
        """
        ref = self.push(topic, event, payload)
        return await await_reply(self._next_frame, self.pending, ref, topic, event)

    async def join(self, topic: str) -> dict[str, Any]:
        return await self.request(topic, JOIN, {})


class SharedSocket:
    """One websocket that carries several topics, each read through a TopicLink.

    ``route_frames`` is the only reader: it hands each frame to the link that
    pushed on the frame's topic. Refs come from one counter, so they are unique
    on the socket, and the heartbeat task checks the socket, not each topic.
    """

    __slots__ = ("closed", "connection", "last_ref", "last_sent", "routes", "tally")

    def __init__(self, connection: Any, tally: Tally) -> None:
        self.connection = connection
        self.tally = tally
        self.last_ref = 0
        self.last_sent = trio.current_time()
        self.routes: dict[str, TopicLink] = {}
        # The close that stopped the reader, or None while the connection is open.
        self.closed: ConnectionClosed | None = None

    def next_ref(self) -> str:
        self.last_ref += 1
        return str(self.last_ref)

    def send(self, frame: Message) -> None:
        self.connection.send(encode_v2(frame))
        self.tally.frames_sent += 1
        self.last_sent = trio.current_time()

    def send_heartbeat(self) -> None:
        self.send(Message(None, self.next_ref(), PHOENIX_TOPIC, HEARTBEAT, {}))

    def open_topic(self, join_payload: dict[str, Any]) -> TopicLink:
        """Return a link for one more topic, joined later with ``join_payload``.

        Raises:
            ConnectionClosed: the connection is closed.
        """
        if self.closed is not None:
            raise ConnectionClosed(self.closed.code, self.closed.reason)
        return TopicLink(self, join_payload)

    async def route_frames(self) -> None:
        """Read frames until the connection closes and pass each to its topic's link.

        Heartbeat replies and late frames of a topic whose link has closed
        (the reply to its leave, say) are counted and dropped.
        """
        try:
            while True:
                frame = decode_v2(await self.connection.receive())
                self.tally.frames_received += 1
                link = self.routes.get(frame.topic)
                if link is not None:
                    link.deliver(frame)
        except ConnectionClosed as exc:
            self.closed = exc
            for link in list(self.routes.values()):
                link.send_channel.close()


class TopicLink:
    """One topic on a SharedSocket, with the methods of Link.

    The link takes its topic from its first push or join, and from then on
    receives that topic's frames from the socket's reader.
    """

    __slots__ = (
        "ended",
        "join_payload",
        "join_ref",
        "pending",
        "receive_channel",
        "send_channel",
        "socket",
        "tally",
        "topic",
    )

    def __init__(self, socket: SharedSocket, join_payload: dict[str, Any]) -> None:
        self.socket = socket
        self.tally = socket.tally
        self.join_payload = join_payload
        self.topic: str | None = None
        self.join_ref: str | None = None
        # The server ended the channel, so closing the link needs no leave.
        self.ended = False
        # The socket's reader sends the topic's frames here. The buffer is
        # unbounded so that a topic its bot reads late never blocks the reader.
        self.send_channel: trio.MemorySendChannel[Message]
        self.receive_channel: trio.MemoryReceiveChannel[Message]
        self.send_channel, self.receive_channel = trio.open_memory_channel(math.inf)
        # Frames read while waiting for a reply, kept for the next receive().
        self.pending: collections.deque[Message] = collections.deque()

    def deliver(self, frame: Message) -> None:
        if frame.event in (CLOSE, ERROR, "chat:terminated"):
            # The server sends phx_close right after chat:terminated.
            self.ended = True
        self.send_channel.send_nowait(frame)

    def push(self, topic: str, event: str, payload: Any) -> str:
        """Send one frame on the link's topic and return its ref.

        Raises:
            BotError: ``topic`` is not the link's topic, or another link
                of the socket is for it.
        """
        if topic != self.topic:
            self._bind(topic)
        ref = self.socket.next_ref()
        if event == JOIN:
            self.join_ref = ref
        self.socket.send(Message(self.join_ref, ref, topic, event, payload))
        return ref

    def _bind(self, topic: str) -> None:
        if self.topic is not None:
            raise BotError(f"invalid topic {topic}: this link is for {self.topic}")
        if topic in self.socket.routes:
            raise BotError(f"topic {topic} is already joined on this socket")
        self.topic = topic
        self.socket.routes[topic] = self

    async def receive(self) -> Message:
        """Return the next frame of the link's topic.

        Raises:
            ConnectionClosed: the socket is closed.
        """
        if self.pending:
            return self.pending.popleft()
        return await self._next_frame()

    async def request(self, topic: str, event: str, payload: Any) -> dict[str, Any]:
        """Push a frame and wait for its reply; return the reply's response.

        Frames that arrive first are kept for ``receive``.

        Raises:
            Rejected: the reply has status error.
            BotError: no reply within REPLY_TIMEOUT_S.
            ConnectionClosed: the socket closed first.
        """
        ref = self.push(topic, event, payload)
        return await await_reply(self._next_frame, self.pending, ref, topic, event)

    async def _next_frame(self) -> Message:
        try:
            return await self.receive_channel.receive()
        except trio.EndOfChannel:
            # The reader closes the channel once the socket has closed.
            closed = self.socket.closed
            code, reason = (closed.code, closed.reason) if closed else (None, "")
            raise ConnectionClosed(code, reason) from None

    async def join(self, topic: str) -> dict[str, Any]:
        return await self.request(topic, JOIN, self.join_payload)

    def close(self) -> None:
        """Stop routing the topic here, leaving its channel if still joined.

        The leave ends a chat the way closing a per-chat socket does.
        """
        if self.topic is None:
            return
        del self.socket.routes[self.topic]
        if self.join_ref is not None and not self.ended:
            with contextlib.suppress(ConnectionClosed):
                self.push(self.topic, LEAVE, {})


async def await_reply(
    next_frame: Any,
    pending: collections.deque[Message],
    ref: str,
    topic: str,
    event: str,
) -> dict[str, Any]:
    """Read frames until the reply to ``ref``; keep the others for ``receive``.

    Heartbeat replies (topic ``phoenix``) are dropped.

    Raises:
        Rejected: the reply has status error.
        BotError: no reply within REPLY_TIMEOUT_S.
    """
    with trio.move_on_after(REPLY_TIMEOUT_S):
        while True:
            frame = await next_frame()
            if frame.event == REPLY and frame.ref == ref:
                return reply_response(frame, event)
            if frame.topic != PHOENIX_TOPIC:
                pending.append(frame)
    raise BotError(f"no reply to {event} on {topic} within {REPLY_TIMEOUT_S:.0f} s")


def reply_response(frame: Message, event: str) -> dict[str, Any]:
    payload = frame.payload if isinstance(frame.payload, dict) else {}
    response = payload.get("response")
    response = response if isinstance(response, dict) else {}
    if payload.get("status") != "ok":
        raise Rejected(event, str(response.get("reason", payload.get("status"))))
    return response


AnyLink = Link | TopicLink
