"""Matchmaker state machine: presence, the student queue and teacher claims.

One matchmaker process owns the global state: which users are connected, which
students wait and in what order, and which teacher chats with which student.
Workers report events to it, and it applies each event to completion before
reading the next. Because only one event runs at a time, no lock is needed and
no race can give a student to two teachers or a teacher more chats than the
limit allows.

This module is that state machine without I/O: it imports neither trio nor
socket. Every event method changes the state and returns the effects to carry
out as plain data (ChatAssigned, ReplyOk, ReplyError, EndChat, QueueChanged).
The trio shell turns effects into messages to workers, and the tests drive the
machine directly with no event loop.

Presence is reference-counted per (user, worker), because one user may hold
several connections, on one worker or on several. A user is connected from the
first join until every join has left. Teachers and students have separate
namespaces, so the same id may name one teacher and one student.

A chat exists only while both its teacher and its student are connected: the
last leave of either ends the chat.
"""

from __future__ import annotations

import collections
import enum
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = [
    "REQUEUE_REASONS",
    "Chat",
    "ChatAssigned",
    "Counts",
    "Effect",
    "EndChat",
    "Matchmaker",
    "QueueChanged",
    "ReplyError",
    "ReplyOk",
    "Role",
    "StudentStatus",
]

logger = logging.getLogger("shardchat.matchmaker")

# A chat that ends for one of these reasons was cut short through no choice of
# the student, so a connected student goes back to the head of the queue
# rather than waiting behind students who became ready later.
REQUEUE_REASONS = frozenset({"teacher_left", "teacher_disconnected", "worker_lost"})


class Role(enum.Enum):
    TEACHER = "teacher"
    STUDENT = "student"


class StudentStatus(enum.Enum):
    IDLE = "idle"  # connected but not in the queue yet
    WAITING = "waiting"
    CHATTING = "chatting"
    FINISHED = "finished"


@dataclass(frozen=True, slots=True)
class Chat:
    """A private chat between one teacher and one student.

    Attributes:
        id: the chat id, from the injected new_chat_id.
        teacher_id: the teacher in the chat.
        student_id: the student in the chat.
        worker: the slot of the worker that owns the chat.
        created_at: the injected clock's time when the claim succeeded.
    """

    id: str
    teacher_id: str
    student_id: str
    worker: int
    created_at: float


class Counts(NamedTuple):
    """Numbers of connected users, as broadcast to teachers.

    IDLE students count only in `students`.
    """

    teachers: int
    students: int
    waiting: int
    chatting: int
    finished: int

    def to_payload(self) -> dict:
        """Return the counts in the shape of the status broadcast payload."""
        return {
            "teachers": {"total": self.teachers},
            "students": {
                "total": self.students,
                "waiting": self.waiting,
                "chatting": self.chatting,
                "finished": self.finished,
            },
        }


class ChatAssigned(NamedTuple):
    """A successful claim, which the shell sends to the chat's worker and both users.

    The worker tuples are the sorted slots where each user has a presence.
    """

    request_id: int
    chat: Chat
    teacher_workers: tuple[int, ...]
    student_workers: tuple[int, ...]


class ReplyOk(NamedTuple):
    """A successful reply to the request `request_id`."""

    request_id: int
    response: dict


class ReplyError(NamedTuple):
    """A rejected request, with the reason sent to the client."""

    request_id: int
    reason: str


class EndChat(NamedTuple):
    """An order to the chat's worker to end the chat and tell its participants.

    worker_lost also returns one for each chat the lost worker owned, and the
    shell drops those.
    """

    chat: Chat
    reason: str


class QueueChanged(NamedTuple):
    """A signal that queue positions changed.

    It carries nothing because the shell reads the new positions from
    Matchmaker.queue_positions() once, however many changes a batch held.
    """


Effect = ChatAssigned | ReplyOk | ReplyError | EndChat | QueueChanged


@dataclass(slots=True)
class _Teacher:
    # worker -> number of presence joins on it; a key is present only while > 0
    refs: dict[int, int] = field(default_factory=dict)
    # the teacher's chat ids in creation order (a dict used as an ordered set)
    chat_ids: dict[str, None] = field(default_factory=dict)


@dataclass(slots=True)
class _Student:
    refs: dict[int, int] = field(default_factory=dict)
    status: StudentStatus = StudentStatus.IDLE
    chat_id: str | None = None


def _sorted_workers(refs: dict[int, int]) -> tuple[int, ...]:
    return tuple(sorted(refs))


def _drop_ref(refs: dict[int, int], worker: int) -> bool:
    """Remove one presence join on `worker`; return False if there was none."""
    count = refs.get(worker, 0)
    if count == 0:
        return False
    if count == 1:
        del refs[worker]
    else:
        refs[worker] = count - 1
    return True


def _drop_worker_refs(
    users: dict[str, _Teacher] | dict[str, _Student], worker: int
) -> set[str]:
    """Drop every presence on `worker`; return the users left with none."""
    disconnected = set()
    for user_id, user in users.items():
        if user.refs.pop(worker, None) is not None and not user.refs:
            disconnected.add(user_id)
    return disconnected


class Matchmaker:
    """The matchmaker state machine.

    The event methods (join, leave, ready, claim, chat_ended, worker_lost)
    return the list of effects the shell must carry out, in order. The other
    methods only read the state, except that take_status() records the counts
    it returns.

    Args:
        slots: the number of worker processes, numbered 0 to slots - 1.
        place: maps a chat id and the number of slots to the slot that will
            own the chat.
        new_chat_id: returns a chat id never used before.
        clock: returns the current time in seconds, stored in Chat.created_at.
        max_chats_per_teacher: the maximum number of chats a teacher has
            at once.

    Raises:
        ValueError: if slots or max_chats_per_teacher is less than 1.
    """

    def __init__(
        self,
        slots: int,
        *,
        place: Callable[[str, int], int],
        new_chat_id: Callable[[], str],
        clock: Callable[[], float] = time.time,
        max_chats_per_teacher: int = 5,
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        if max_chats_per_teacher < 1:
            raise ValueError(
                f"max_chats_per_teacher must be at least 1, got {max_chats_per_teacher}"
            )
        self._slots = slots
        self._place = place
        self._new_chat_id = new_chat_id
        self._clock = clock
        self._max_chats = max_chats_per_teacher

        self._teachers: dict[str, _Teacher] = {}
        self._students: dict[str, _Student] = {}
        # An ordered set of student ids, head first: it pops the head, pushes
        # at either end and removes a leaving student in O(1).
        self._queue: collections.OrderedDict[str, None] = collections.OrderedDict()
        # Chats in creation order, which requeueing relies on.
        self._chats: dict[str, Chat] = {}

        # Kept up to date on every change so that counts() and
        # teacher_workers() cost O(1) and O(slots) however many users connect.
        self._teacher_refs_by_worker: collections.Counter[int] = collections.Counter()
        self._status_totals: collections.Counter[StudentStatus] = collections.Counter()
        self._last_status = Counts(0, 0, 0, 0, 0)

    # Events

    def join(self, user_id: str, role: Role, worker: int) -> list[Effect]:
        """Record one presence join of a user on a worker.

        A student's first join makes it IDLE. Further joins, on the same
        worker or another, only add a reference.

        Raises:
            ValueError: if worker is not a slot number.
        """
        self._check_worker(worker, "worker")
        if role is Role.TEACHER:
            teacher = self._teachers.get(user_id)
            if teacher is None:
                teacher = self._teachers[user_id] = _Teacher()
            teacher.refs[worker] = teacher.refs.get(worker, 0) + 1
            self._teacher_refs_by_worker[worker] += 1
        else:
            student = self._students.get(user_id)
            if student is None:
                student = self._students[user_id] = _Student()
                self._status_totals[StudentStatus.IDLE] += 1
            student.refs[worker] = student.refs.get(worker, 0) + 1
        return []

    def leave(self, user_id: str, role: Role, worker: int) -> list[Effect]:
        """Remove one presence join of a user on a worker.

        When it was the user's last join, the user disconnects: a teacher's
        chats end, and a student leaves the queue or ends its chat. A leave
        with no matching join changes nothing.
        """
        if role is Role.TEACHER:
            teacher = self._teachers.get(user_id)
            if teacher is None or not _drop_ref(teacher.refs, worker):
                logger.debug(
                    "ignored unmatched leave of teacher %s on %d", user_id, worker
                )
                return []
            self._drop_teacher_worker_ref(worker)
            if teacher.refs:
                return []
            return self._disconnect_teacher(user_id)

        student = self._students.get(user_id)
        if student is None or not _drop_ref(student.refs, worker):
            logger.debug("ignored unmatched leave of student %s on %d", user_id, worker)
            return []
        if student.refs:
            return []
        return self._disconnect_student(user_id)

    def ready(self, request_id: int, student_id: str) -> list[Effect]:
        """Put an IDLE or FINISHED student at the tail of the queue.

        Replies with the student's 1-based position, or with one of the errors
        "not connected", "already waiting" and "already in a chat".
        """
        student = self._students.get(student_id)
        if student is None:
            return [ReplyError(request_id, "not connected")]
        if student.status is StudentStatus.WAITING:
            return [ReplyError(request_id, "already waiting")]
        if student.status is StudentStatus.CHATTING:
            return [ReplyError(request_id, "already in a chat")]

        self._set_status(student, StudentStatus.WAITING)
        self._queue[student_id] = None
        position = len(self._queue)
        return [ReplyOk(request_id, {"position": position}), QueueChanged()]

    def claim(self, request_id: int, teacher_id: str) -> list[Effect]:
        """Give the student at the head of the queue to a teacher.

        Replies with one of the errors "not connected", "too many chats" and
        "no students waiting", checked in that order.

        Raises:
            ValueError: if new_chat_id returns an id in use or place returns a
                number that is not a slot. The state is unchanged.
        """
        teacher = self._teachers.get(teacher_id)
        if teacher is None:
            return [ReplyError(request_id, "not connected")]
        if len(teacher.chat_ids) >= self._max_chats:
            return [ReplyError(request_id, "too many chats")]
        if not self._queue:
            return [ReplyError(request_id, "no students waiting")]

        # Validate the injected functions' results before changing anything.
        chat_id = self._new_chat_id()
        if chat_id in self._chats:
            raise ValueError(f"new_chat_id returned {chat_id!r}, which is in use")
        worker = self._place(chat_id, self._slots)
        self._check_worker(worker, f"place({chat_id!r})")

        student_id, _ = self._queue.popitem(last=False)
        student = self._students[student_id]
        chat = Chat(chat_id, teacher_id, student_id, worker, self._clock())
        self._chats[chat_id] = chat
        teacher.chat_ids[chat_id] = None
        student.chat_id = chat_id
        self._set_status(student, StudentStatus.CHATTING)
        logger.debug(
            "assigned student %s to teacher %s in chat %s on worker %d",
            student_id,
            teacher_id,
            chat_id,
            worker,
        )
        assigned = ChatAssigned(
            request_id,
            chat,
            _sorted_workers(teacher.refs),
            _sorted_workers(student.refs),
        )
        return [assigned, QueueChanged()]

    def chat_ended(self, chat_id: str, reason: str) -> list[Effect]:
        """Forget a chat that its worker has ended.

        The student goes back to the head of the queue if the reason is in
        REQUEUE_REASONS, and becomes FINISHED otherwise. An unknown chat id
        returns [], because the worker and the matchmaker may both end the
        same chat.
        """
        chat = self._chats.get(chat_id)
        if chat is None:
            logger.debug("ignored end of unknown chat %s (%s)", chat_id, reason)
            return []
        requeued = self._end_chats([(chat, reason)])
        return [QueueChanged()] if requeued else []

    def worker_lost(self, worker: int) -> list[Effect]:
        """Drop every presence on a dead worker and end the chats it owned.

        Chats owned by the worker end with "worker_lost". Chats elsewhere end
        with "teacher_disconnected" or "student_disconnected" when the lost
        presences were a participant's last ones. Connected students of ended
        chats go back to the head of the queue, oldest chat first.

        Raises:
            ValueError: if worker is not a slot number.
        """
        self._check_worker(worker, "worker")
        disconnected_teachers = _drop_worker_refs(self._teachers, worker)
        disconnected_students = _drop_worker_refs(self._students, worker)
        self._teacher_refs_by_worker.pop(worker, None)

        # Collect the chats in creation order before forgetting anyone, so
        # that the reason names what actually cut each chat.
        ending: list[tuple[Chat, str]] = []
        for chat in self._chats.values():
            if chat.worker == worker:
                ending.append((chat, "worker_lost"))
            elif chat.teacher_id in disconnected_teachers:
                ending.append((chat, "teacher_disconnected"))
            elif chat.student_id in disconnected_students:
                ending.append((chat, "student_disconnected"))

        queue_changed = False
        for student_id in disconnected_students:
            queue_changed |= self._forget_student(student_id)
        for teacher_id in disconnected_teachers:
            del self._teachers[teacher_id]
        queue_changed |= self._end_chats(ending)

        logger.info(
            "worker %d lost: ended %d chats, disconnected %d teachers and %d students",
            worker,
            len(ending),
            len(disconnected_teachers),
            len(disconnected_students),
        )
        effects: list[Effect] = [EndChat(chat, reason) for chat, reason in ending]
        if queue_changed:
            effects.append(QueueChanged())
        return effects

    # Reads

    def counts(self) -> Counts:
        """Return the numbers of connected users."""
        return Counts(
            teachers=len(self._teachers),
            students=len(self._students),
            waiting=self._status_totals[StudentStatus.WAITING],
            chatting=self._status_totals[StudentStatus.CHATTING],
            finished=self._status_totals[StudentStatus.FINISHED],
        )

    def take_status(self) -> Counts | None:
        """Return the counts if they differ from the last take, else None.

        The shell calls it on a timer, so a burst of events produces one
        broadcast. Counts that changed and changed back between two takes
        return None. Before the first take, the last counts are all zero.
        """
        current = self.counts()
        if current == self._last_status:
            return None
        self._last_status = current
        return current

    def teacher_workers(self) -> tuple[int, ...]:
        """Return the sorted slots where at least one teacher has a presence."""
        return tuple(sorted(self._teacher_refs_by_worker))

    def queue_positions(self) -> dict[str, tuple[int, tuple[int, ...]]]:
        """Map each waiting student to its 1-based position and its workers."""
        return {
            student_id: (position, _sorted_workers(self._students[student_id].refs))
            for position, student_id in enumerate(self._queue, start=1)
        }

    def snapshot(self) -> dict:
        """Return a JSON-serializable view of the whole state, for inspection."""
        return {
            "counts": self.counts().to_payload(),
            "queue_length": len(self._queue),
            "chats": [
                {
                    "id": chat.id,
                    "teacher_id": chat.teacher_id,
                    "student_id": chat.student_id,
                    "worker": chat.worker,
                    "created_at": chat.created_at,
                }
                for chat in self._chats.values()
            ],
            "teachers": {
                teacher_id: len(teacher.chat_ids)
                for teacher_id, teacher in self._teachers.items()
            },
        }

    def student_status(self, student_id: str) -> StudentStatus | None:
        """Return a connected student's status, or None if it is not connected."""
        student = self._students.get(student_id)
        return None if student is None else student.status

    def chats_of(self, teacher_id: str) -> tuple[Chat, ...]:
        """Return a teacher's chats, oldest first."""
        teacher = self._teachers.get(teacher_id)
        if teacher is None:
            return ()
        return tuple(self._chats[chat_id] for chat_id in teacher.chat_ids)

    def chat(self, chat_id: str) -> Chat | None:
        """Return a chat in progress, or None."""
        return self._chats.get(chat_id)

    def queue(self) -> tuple[str, ...]:
        """Return the waiting students' ids, head first."""
        return tuple(self._queue)

    # Internals

    def _check_worker(self, worker: int, name: str) -> None:
        if not 0 <= worker < self._slots:
            raise ValueError(
                f"{name} is {worker}, which is not a slot in 0..{self._slots - 1}"
            )

    def _set_status(self, student: _Student, status: StudentStatus) -> None:
        # The only place that changes a connected student's status, so that
        # the totals behind counts() stay exact.
        self._status_totals[student.status] -= 1
        self._status_totals[status] += 1
        student.status = status

    def _drop_teacher_worker_ref(self, worker: int) -> None:
        self._teacher_refs_by_worker[worker] -= 1
        if self._teacher_refs_by_worker[worker] == 0:
            del self._teacher_refs_by_worker[worker]

    def _disconnect_teacher(self, teacher_id: str) -> list[Effect]:
        teacher = self._teachers.pop(teacher_id)
        ending = [
            (self._chats[chat_id], "teacher_disconnected")
            for chat_id in teacher.chat_ids
        ]
        requeued = self._end_chats(ending)
        effects: list[Effect] = [EndChat(chat, reason) for chat, reason in ending]
        if requeued:
            effects.append(QueueChanged())
        return effects

    def _disconnect_student(self, student_id: str) -> list[Effect]:
        chat_id = self._students[student_id].chat_id
        queue_changed = self._forget_student(student_id)
        if queue_changed:
            return [QueueChanged()]
        if chat_id is None:
            return []
        chat = self._chats[chat_id]
        self._end_chats([(chat, "student_disconnected")])
        return [EndChat(chat, "student_disconnected")]

    def _forget_student(self, student_id: str) -> bool:
        """Remove a disconnected student; return whether it left the queue."""
        student = self._students.pop(student_id)
        self._status_totals[student.status] -= 1
        if student.status is StudentStatus.WAITING:
            del self._queue[student_id]
            return True
        return False

    def _end_chats(self, ending: Iterable[tuple[Chat, str]]) -> bool:
        """Remove chats, given oldest first, and settle their students.

        A student still connected goes back to the head of the queue if the
        reason is in REQUEUE_REASONS, and becomes FINISHED otherwise. Returns
        whether any student was requeued.
        """
        requeued: list[str] = []
        for chat, reason in ending:
            del self._chats[chat.id]
            teacher = self._teachers.get(chat.teacher_id)
            if teacher is not None:
                del teacher.chat_ids[chat.id]
            logger.debug("ended chat %s (%s)", chat.id, reason)

            student = self._students.get(chat.student_id)
            if student is None:
                continue
            student.chat_id = None
            if reason in REQUEUE_REASONS:
                self._set_status(student, StudentStatus.WAITING)
                requeued.append(chat.student_id)
            else:
                self._set_status(student, StudentStatus.FINISHED)

        # Push the newest first so that the oldest chat's student ends up at
        # the very head.
        for student_id in reversed(requeued):
            self._queue[student_id] = None
            self._queue.move_to_end(student_id, last=False)
        return bool(requeued)
