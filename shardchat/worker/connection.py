"""One client connection on a worker: the Phoenix Channels protocol over a websocket.

The connection's task reads frames, applies the channel rules from
``shardchat.phoenix`` and dispatches events to presence and chat handling.
Writes go straight to the websocket engine's non-blocking ``send``, so a relay
costs no task switch.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from shardchat import phoenix, tokens
from shardchat.close_codes import CloseCode
from shardchat.exceptions import ConnectionClosed, ProtocolError, TokenError
from shardchat.phoenix import Action, Message
from shardchat.worker.chat import RELAYS, STUDENT, TEACHER, Chat, ChatState, Member

if TYPE_CHECKING:
    from shardchat.websocket import Connection
    from shardchat.worker.server import Worker

log = logging.getLogger("shardchat.worker.connection")

TEACHERS_TOPIC = "presence:teachers"
STUDENT_TOPIC_PREFIX = "presence:student:"
CHAT_TOPIC_PREFIX = "chats:"

# Events a participant may push on a chat topic besides the relayed ones.
ACKNOWLEDGED_EVENTS = ("teacher:joined", "student:joined")


class ClientConnection:
    """The Phoenix side of one websocket connection."""

    __slots__ = (
        "worker",
        "websocket",
        "identity",
        "codec",
        "id",
        "channels",
        "chat_channels",
        "topic_owners",
        "proxied_to",
        "forwarded_topics",
        "on_topic_closed",
        "last_seen",
        "frames_received",
        "frames_sent",
    )

    def __init__(
        self,
        worker: Worker,
        websocket: Connection,
        identity: tokens.Identity,
        codec: phoenix.Codec,
        connection_id: int,
    ) -> None:
        self.worker = worker
        self.websocket = websocket
        self.identity = identity
        self.codec = codec
        self.id = connection_id
        self.channels = phoenix.ChannelTable()
        # Chat channels joined on this connection: topic -> (chat, role).
        self.chat_channels: dict[str, tuple[Chat, str]] = {}
        # Chat topics seen on this connection -> the slot that owns the chat.
        self.topic_owners: dict[str, int] = {}
        # Peer slots that hold a proxy of this connection.
        # A tuple: most connections never forward, and an empty set costs
        # 216 bytes of every connection's memory.
        self.proxied_to: tuple[int, ...] = ()
        # Chat topics of this connection joined on other workers, made on
        # demand, and on a proxy the callback that notifies the holding worker
        # when one of them closes.
        self.forwarded_topics: set[str] | None = None
        self.on_topic_closed: Any = None
        self.last_seen = trio.current_time()
        self.frames_received = 0
        self.frames_sent = 0

    # Output.

    def send_message(self, message: Message) -> None:
        try:
            self.websocket.send(self.codec.encode(message))
        except ConnectionClosed:
            return
        self.frames_sent += 1

    def push(self, join_ref: str | None, topic: str, event: str, payload: Any) -> None:
        self.send_message(Message(join_ref, None, topic, event, payload))

    def reply_ok(self, request: Message, response: dict | None = None) -> None:
        self.send_message(phoenix.reply(request, "ok", response))

    def reply_error(self, request: Message, reason: str) -> None:
        self.send_message(phoenix.error_reply(request, reason))

    # Input.

    async def run(self) -> None:
        """Read and handle frames until the connection closes."""
        websocket = self.websocket
        decode = self.codec.decode
        try:
            while True:
                data = await websocket.receive()
                self.last_seen = trio.current_time()
                self.frames_received += 1
                if type(data) is not str:
                    await websocket.close(
                        CloseCode.UNSUPPORTED_DATA, "binary frames are not supported"
                    )
                    return
                try:
                    message = decode(data)
                except ProtocolError as exc:
                    log.info("connection %d: %s; closing", self.id, exc)
                    await websocket.close(CloseCode.PROTOCOL_ERROR, "invalid frame")
                    return
                self.handle(message)
        except ConnectionClosed:
            pass
        finally:
            self.release_all()

    def handle(self, message: Message) -> None:
        """Apply the channel rules to one frame."""
        # The relay is the hot path: check it before the general rules.
        entry = self.chat_channels.get(message.topic)
        if entry is not None and message.event in _RELAY_EVENTS:
            if message.join_ref is None or message.join_ref == (
                self.channels.joined.get(message.topic)
            ):
                self.handle_chat_event(entry[0], entry[1], message)
                return
        if entry is None and message.topic.startswith(CHAT_TOPIC_PREFIX):
            owner = self.owner_of(message.topic)
            if owner != self.worker.slot:
                if self.count_forwarded(message):
                    self.worker.forward(self, owner, message)
                return
        action = self.channels.classify(message)
        if action is Action.EVENT:
            self.dispatch(message)
        elif action is Action.HEARTBEAT:
            self.reply_ok(message)
        elif action is Action.JOIN:
            self.join(message)
        elif action is Action.LEAVE:
            self.release(message.topic, reason_suffix="left")
            self.reply_ok(message)
            self.send_message(phoenix.close(message.topic, message.join_ref))
        elif action is Action.LEAVE_UNJOINED:
            self.reply_ok(message)
        elif action is Action.UNMATCHED:
            self.reply_error(message, "unmatched topic")
        elif action is Action.TOO_MANY:
            self.reply_error(message, "too many channels joined")
        # Action.STALE: Phoenix ignores frames of an earlier channel.

    def count_forwarded(self, message: Message) -> bool:
        """Keep the channel limit across workers; return False if the frame is refused."""
        topics = self.forwarded_topics
        if topics is None:
            topics = self.forwarded_topics = set()
        if message.event == phoenix.JOIN and message.topic not in topics:
            if len(self.channels.joined) + len(topics) >= phoenix.MAX_CHANNELS:
                self.reply_error(message, "too many channels joined")
                return False
            topics.add(message.topic)
        elif message.event == phoenix.LEAVE:
            topics.discard(message.topic)
        self.channels.forwarded = len(topics)
        return True

    def forwarded_topic_closed(self, topic: str) -> None:
        """Forget a forwarded channel that the chat's worker closed or refused."""
        if self.forwarded_topics:
            self.forwarded_topics.discard(topic)
            self.channels.forwarded = len(self.forwarded_topics)

    def topic_closed(self, topic: str) -> None:
        if self.on_topic_closed is not None:
            self.on_topic_closed(topic)

    def owner_of(self, topic: str) -> int:
        """Return the slot that owns a chat topic (cached per connection)."""
        owner = self.topic_owners.get(topic)
        if owner is None:
            owner = self.worker.chat_owner(topic[len(CHAT_TOPIC_PREFIX) :])
            self.topic_owners[topic] = owner
        return owner

    # Joins.

    def join(self, message: Message) -> None:
        topic = message.topic
        previous = self.channels.previous_join_ref(topic)
        if previous is not phoenix.UNJOINED:
            # A second join closes the first channel (Phoenix behaviour).
            self.release(topic, reason_suffix="left", notify=False)
            self.send_message(phoenix.close(topic, previous))
        if topic == TEACHERS_TOPIC:
            self.join_teachers(message)
        elif topic.startswith(STUDENT_TOPIC_PREFIX):
            self.join_student(message)
        elif topic.startswith(CHAT_TOPIC_PREFIX):
            self.join_chat(message)
        else:
            self.reply_error(message, "unmatched topic")
        if topic not in self.channels.joined:
            self.topic_closed(topic)

    def adopt_join_identity(self, payload: Any) -> None:
        """Take the user id and role from a join payload (development mode only).

        The 2015 reference clients sent ``{"userId", "role"}`` in every join
        instead of a token. The first such join fixes the connection's identity.
        """
        if self.identity.role != tokens.ANONYMOUS_ROLE or not isinstance(payload, dict):
            return
        user_id = payload.get("userId")
        role = payload.get("role")
        if isinstance(user_id, str) and user_id and role in tokens.ROLES:
            self.identity = tokens.Identity(str(user_id), role, 0)

    def join_teachers(self, message: Message) -> None:
        self.adopt_join_identity(message.payload)
        identity = self.identity
        if identity.role != TEACHER or identity.chat_id is not None:
            self.reply_error(message, "unauthorized")
            return
        self.accept_presence(message)

    def join_student(self, message: Message) -> None:
        self.adopt_join_identity(message.payload)
        identity = self.identity
        student_id = message.topic[len(STUDENT_TOPIC_PREFIX) :]
        if (
            identity.role != STUDENT
            or identity.chat_id is not None
            or student_id != identity.user_id
        ):
            self.reply_error(message, "unauthorized")
            return
        self.accept_presence(message)

    def accept_presence(self, message: Message) -> None:
        self.channels.accept_join(message.topic, message.join_ref)
        self.worker.presence_joined(self, message.topic, message.join_ref)
        self.reply_ok(message)

    def join_chat(self, message: Message) -> None:
        chat_id = message.topic[len(CHAT_TOPIC_PREFIX) :]
        identity = self.chat_identity(chat_id, message.payload)
        if identity is None:
            self.reply_error(message, "unauthorized")
            return
        worker = self.worker
        if not worker.owns_chat(chat_id):
            # Only reached when a peer forwarded a join it does not own either.
            self.reply_error(message, "chat is owned by another worker")
            return
        if worker.chat_ended(chat_id):
            self.reply_error(message, "chat ended")
            return
        chat = worker.get_or_create_chat(
            chat_id, identity.teacher_id or "", identity.student_id or ""
        )
        role = chat.role_of(identity.user_id)
        if role is None or role != identity.role:
            self.reply_error(message, "unauthorized")
            return
        self.channels.accept_join(message.topic, message.join_ref)
        self.chat_channels[message.topic] = (chat, role)
        self.reply_ok(message)
        chat.join(role, Member(self, message.join_ref, message.topic))

    def chat_identity(self, chat_id: str, payload: Any) -> tokens.Identity | None:
        """Return the chat identity for ``chat_id``, from the connection or the join payload."""
        identity = self.identity
        if identity.chat_id == chat_id:
            return identity
        if self.worker.insecure_join_identity:
            return self.insecure_chat_identity(chat_id, payload)
        token = payload.get("token") if isinstance(payload, dict) else None
        if not isinstance(token, str):
            return None
        try:
            identity = tokens.verify(self.worker.secret, token)
        except TokenError as exc:
            log.info("connection %d: chat join with a bad token: %s", self.id, exc)
            return None
        if identity.chat_id != chat_id or identity.user_id != self.identity.user_id:
            return None
        return identity

    def insecure_chat_identity(
        self, chat_id: str, payload: Any
    ) -> tokens.Identity | None:
        """Return the chat identity from the matchmaker's record of the chat."""
        self.adopt_join_identity(payload)
        chat = self.worker.chats.get(chat_id)
        if chat is None or chat.role_of(self.identity.user_id) is None:
            return None
        role = chat.role_of(self.identity.user_id)
        return tokens.Identity(
            self.identity.user_id, role, 0, chat_id, chat.teacher_id, chat.student_id
        )

    # Events on joined channels.

    def dispatch(self, message: Message) -> None:
        topic = message.topic
        entry = self.chat_channels.get(topic)
        if entry is not None:
            self.handle_chat_event(entry[0], entry[1], message)
        elif topic == TEACHERS_TOPIC:
            self.handle_teacher_event(message)
        elif topic.startswith(STUDENT_TOPIC_PREFIX):
            self.handle_student_event(message)
        else:
            self.reply_error(message, "unknown event")

    def handle_chat_event(self, chat: Chat, role: str, message: Message) -> None:
        event = message.event
        if event == RELAYS[role][0]:
            payload = message.payload
            text = payload.get("message") if type(payload) is dict else None
            if type(text) is not str:
                self.reply_error(message, "invalid message: expected a string")
            elif chat.state is not ChatState.READY:
                self.reply_error(message, f"chat not ready: {chat.state.value}")
            else:
                chat.relay(role, text)
        elif event == "chat:terminate":
            if role != TEACHER:
                self.reply_error(message, "unauthorized")
            elif chat.state is ChatState.ENDED:
                self.reply_error(message, "chat ended")
            else:
                self.reply_ok(message)
                self.worker.end_chat(chat, "teacher_ended", notify_matchmaker=True)
        elif event in ACKNOWLEDGED_EVENTS:
            self.reply_ok(message)
        elif event in _RELAY_EVENTS:
            self.reply_error(message, "unauthorized")
        else:
            self.reply_error(message, "unknown event")

    def handle_teacher_event(self, message: Message) -> None:
        if message.event == "claim:student":
            self.worker.request_matchmaker(self, message, "claim")
        else:
            self.reply_error(message, "unknown event")

    def handle_student_event(self, message: Message) -> None:
        if message.event == "student:ready":
            self.worker.request_matchmaker(self, message, "ready")
        elif message.event == "queue:position":
            self.worker.request_matchmaker(self, message, "position")
        else:
            self.reply_error(message, "unknown event")

    # Leaving.

    def close_channel(self, topic: str, join_ref: str | None) -> None:
        """Close a channel from the server side (``phx_close``)."""
        if self.channels.joined.get(topic, phoenix.UNJOINED) != join_ref:
            return
        self.channels.remove(topic)
        self.chat_channels.pop(topic, None)
        self.send_message(phoenix.close(topic, join_ref))
        self.topic_closed(topic)

    def release(self, topic: str, reason_suffix: str, notify: bool = True) -> None:
        """Forget a channel; a chat whose participant leaves mid-chat ends."""
        self.channels.remove(topic)
        if notify:
            self.topic_closed(topic)
        entry = self.chat_channels.pop(topic, None)
        if entry is not None:
            chat, role = entry
            member = chat.members.get(role)
            if member is not None and member.connection is self:
                del chat.members[role]
                if chat.state is not ChatState.ENDED:
                    self.worker.end_chat(
                        chat, f"{role}_{reason_suffix}", notify_matchmaker=True
                    )
        elif topic == TEACHERS_TOPIC or topic.startswith(STUDENT_TOPIC_PREFIX):
            self.worker.presence_left(self, topic)

    def release_all(self) -> None:
        for topic in list(self.channels.joined):
            self.release(topic, reason_suffix="left")
        for slot in self.proxied_to:
            self.worker.send_peer(slot, {"op": "proxy_close", "conn": self.id})
        self.proxied_to = ()


_RELAY_EVENTS = frozenset({RELAYS[TEACHER][0], RELAYS[STUDENT][0], "chat:terminate"})
