"""A chat as its worker keeps it: participants, sequence numbers, relaying.

Both participants of a chat connect to the chat's worker, so relaying a chat
message is one decode, one encode and one socket write in one process. Each
participant is reached through a ``Member``: the seam where delivery to a
participant on another worker would plug in.
"""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shardchat.chatlog import ChatLog
    from shardchat.worker.connection import ClientConnection

TEACHER = "teacher"
STUDENT = "student"

# Relayed events: what the sender pushes -> what the other participant receives.
RELAYS = {
    TEACHER: ("teacher:send", "student:receive"),
    STUDENT: ("student:send", "teacher:receive"),
}


class ChatState(enum.Enum):
    OPEN = "open"  # created, waiting for both participants to join
    READY = "ready"  # both joined; messages flow
    ENDED = "ended"


class Member:
    """One participant's channel: the connection and the join_ref it joined under."""

    __slots__ = ("connection", "join_ref", "topic")

    def __init__(self, connection: ClientConnection, join_ref: str | None, topic: str):
        self.connection = connection
        self.join_ref = join_ref
        self.topic = topic

    def deliver(self, event: str, payload: Any) -> None:
        self.connection.push(self.join_ref, self.topic, event, payload)

    def close(self) -> None:
        self.connection.close_channel(self.topic, self.join_ref)


class Chat:
    """One chat in progress on this worker."""

    __slots__ = (
        "id",
        "topic",
        "teacher_id",
        "student_id",
        "state",
        "seq",
        "members",
        "created_at",
        "started_at",
        "chat_log",
        "log_key",
    )

    def __init__(
        self,
        chat_id: str,
        teacher_id: str,
        student_id: str,
        chat_log: ChatLog,
        created_at: float | None = None,
    ) -> None:
        self.id = chat_id
        self.topic = f"chats:{chat_id}"
        self.teacher_id = teacher_id
        self.student_id = student_id
        self.state = ChatState.OPEN
        self.seq = 0
        self.members: dict[str, Member] = {}
        self.created_at = time.time() if created_at is None else created_at
        self.started_at: float | None = None
        self.chat_log = chat_log
        self.log_key = chat_log.open_chat(
            chat_id, teacher_id, student_id, self.created_at
        )

    def role_of(self, user_id: str) -> str | None:
        if user_id == self.teacher_id:
            return TEACHER
        if user_id == self.student_id:
            return STUDENT
        return None

    def join(self, role: str, member: Member) -> None:
        """Seat a participant; the second one to arrive makes the chat ready.

        A participant who joins again from another channel takes the seat, and
        the old channel is closed so it does not wait for frames that go elsewhere.
        """
        previous = self.members.get(role)
        self.members[role] = member
        if previous is not None and previous.connection is not member.connection:
            previous.close()
        if self.state is ChatState.OPEN and len(self.members) == 2:
            self.state = ChatState.READY
            self.started_at = time.time()
            self.chat_log.start_chat(self.log_key, self.started_at)
            for seated in self.members.values():
                seated.deliver("chat:ready", {})

    def relay(self, role: str, message: str) -> None:
        """Pass a chat message to the other participant and log it."""
        self.seq += 1
        now = time.time()
        receive_event = RELAYS[role][1]
        other = self.members.get(STUDENT if role == TEACHER else TEACHER)
        if other is not None:
            other.deliver(
                receive_event,
                {"message": message, "seq": self.seq, "sent_at": now * 1000.0},
            )
        self.chat_log.message(self.log_key, self.seq, role, message, now)

    def end(self, reason: str) -> None:
        """Mark the chat ended, tell every seated participant why, close their channels.

        The channel is closed with ``phx_close`` as a Phoenix channel that stops
        normally would, so Phoenix clients do not try to rejoin it.
        """
        if self.state is ChatState.ENDED:
            return
        self.state = ChatState.ENDED
        for member in self.members.values():
            member.deliver("chat:terminated", {"reason": reason})
            member.close()
        self.members.clear()
        self.chat_log.end_chat(self.log_key, time.time(), reason, self.seq)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "teacher_id": self.teacher_id,
            "student_id": self.student_id,
            "state": self.state.value,
            "messages": self.seq,
            "created_at": self.created_at,
            "started_at": self.started_at,
        }


def chat_payload(chat_id: str, teacher_id: str, student_id: str, token: str) -> dict:
    """Build the chat map sent to a participant (with that participant's token)."""
    return {
        "id": chat_id,
        "teacher_id": teacher_id,
        "student_id": student_id,
        "token": token,
    }
