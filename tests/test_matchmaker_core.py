"""Tests of the matchmaker state machine, with no event loop."""

import collections
import itertools
import json

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from shardchat.matchmaker.core import (
    REQUEUE_REASONS,
    Chat,
    ChatAssigned,
    Counts,
    EndChat,
    Matchmaker,
    QueueChanged,
    ReplyError,
    ReplyOk,
    Role,
    StudentStatus,
)

TEACHER = Role.TEACHER
STUDENT = Role.STUDENT


def place_by_number(chat_id: str, slots: int) -> int:
    """Place chat "chat-N" on slot N mod slots, so tests can predict it."""
    return int(chat_id.removeprefix("chat-")) % slots


def make_matchmaker(slots: int = 3, max_chats: int = 5) -> Matchmaker:
    numbers = itertools.count(1)
    times = itertools.count(1000)
    return Matchmaker(
        slots,
        place=place_by_number,
        new_chat_id=lambda: f"chat-{next(numbers)}",
        clock=lambda: float(next(times)),
        max_chats_per_teacher=max_chats,
    )


def make_waiting(mm: Matchmaker, *student_ids: str, worker: int = 0) -> None:
    for student_id in student_ids:
        mm.join(student_id, STUDENT, worker)
        mm.ready(0, student_id)


def claim_chat(mm: Matchmaker, teacher_id: str) -> Chat:
    assigned = mm.claim(0, teacher_id)[0]
    assert isinstance(assigned, ChatAssigned)
    return assigned.chat


# Construction


def test_matchmaker_rejects_zero_slots():
    with pytest.raises(ValueError, match="^slots must be at least 1, got 0$"):
        Matchmaker(0, place=place_by_number, new_chat_id=lambda: "chat-1")


def test_matchmaker_rejects_zero_max_chats():
    with pytest.raises(
        ValueError, match="^max_chats_per_teacher must be at least 1, got 0$"
    ):
        Matchmaker(
            1,
            place=place_by_number,
            new_chat_id=lambda: "chat-1",
            max_chats_per_teacher=0,
        )


def test_counts_to_payload():
    payload = Counts(2, 7, 3, 1, 1).to_payload()
    assert payload == {
        "teachers": {"total": 2},
        "students": {"total": 7, "waiting": 3, "chatting": 1, "finished": 1},
    }


# Presence


def test_join_student_is_idle():
    mm = make_matchmaker()
    assert mm.join("s1", STUDENT, 0) == []
    assert mm.student_status("s1") is StudentStatus.IDLE


def test_join_rejects_worker_out_of_range():
    mm = make_matchmaker(slots=3)
    with pytest.raises(
        ValueError, match=r"^worker is 3, which is not a slot in 0\.\.2$"
    ):
        mm.join("s1", STUDENT, 3)
    assert mm.student_status("s1") is None


def test_join_rejects_negative_worker():
    mm = make_matchmaker(slots=3)
    with pytest.raises(ValueError, match=r"^worker is -1, which is not a slot"):
        mm.join("t1", TEACHER, -1)
    assert mm.counts().teachers == 0


def test_leave_one_of_two_joins():
    mm = make_matchmaker()
    mm.join("s1", STUDENT, 1)
    mm.join("s1", STUDENT, 1)
    assert mm.leave("s1", STUDENT, 1) == []
    assert mm.student_status("s1") is StudentStatus.IDLE
    assert mm.leave("s1", STUDENT, 1) == []
    assert mm.student_status("s1") is None


def test_leave_one_of_two_workers():
    mm = make_matchmaker()
    mm.join("t1", TEACHER, 0)
    mm.join("t1", TEACHER, 2)
    mm.leave("t1", TEACHER, 0)
    assert mm.counts().teachers == 1
    assert mm.teacher_workers() == (2,)
    mm.leave("t1", TEACHER, 2)
    assert mm.counts().teachers == 0
    assert mm.teacher_workers() == ()


def test_leave_without_join_is_ignored():
    mm = make_matchmaker()
    assert mm.leave("s1", STUDENT, 0) == []
    assert mm.leave("t1", TEACHER, 0) == []
    assert mm.counts() == Counts(0, 0, 0, 0, 0)


def test_leave_on_other_worker_is_ignored():
    mm = make_matchmaker()
    mm.join("s1", STUDENT, 0)
    mm.join("t1", TEACHER, 0)
    assert mm.leave("s1", STUDENT, 1) == []
    assert mm.leave("t1", TEACHER, 1) == []
    assert mm.student_status("s1") is StudentStatus.IDLE
    assert mm.teacher_workers() == (0,)


def test_roles_are_separate_namespaces():
    mm = make_matchmaker()
    mm.join("alex", TEACHER, 0)
    assert mm.student_status("alex") is None
    assert mm.ready(1, "alex") == [ReplyError(1, "not connected")]

    mm.join("alex", STUDENT, 1)
    assert mm.counts() == Counts(1, 1, 0, 0, 0)
    mm.leave("alex", TEACHER, 0)
    assert mm.student_status("alex") is StudentStatus.IDLE
    assert mm.counts() == Counts(0, 1, 0, 0, 0)


def test_teacher_workers_sorted():
    mm = make_matchmaker(slots=4)
    mm.join("t1", TEACHER, 3)
    mm.join("t2", TEACHER, 1)
    mm.join("t2", TEACHER, 3)
    mm.join("s1", STUDENT, 0)
    assert mm.teacher_workers() == (1, 3)
    mm.leave("t1", TEACHER, 3)
    assert mm.teacher_workers() == (1, 3)
    mm.leave("t2", TEACHER, 3)
    assert mm.teacher_workers() == (1,)


def test_chat_assigned_workers_sorted():
    mm = make_matchmaker()
    mm.join("t1", TEACHER, 2)
    mm.join("t1", TEACHER, 0)
    mm.join("s1", STUDENT, 1)
    mm.join("s1", STUDENT, 0)
    mm.ready(1, "s1")
    assigned = mm.claim(2, "t1")[0]
    assert assigned.teacher_workers == (0, 2)
    assert assigned.student_workers == (0, 1)


# ready


def test_ready_not_connected():
    mm = make_matchmaker()
    assert mm.ready(7, "s1") == [ReplyError(7, "not connected")]


def test_ready_already_waiting():
    mm = make_matchmaker()
    make_waiting(mm, "s1")
    assert mm.ready(8, "s1") == [ReplyError(8, "already waiting")]
    assert mm.queue() == ("s1",)


def test_ready_already_in_a_chat():
    mm = make_matchmaker()
    mm.join("t1", TEACHER, 0)
    make_waiting(mm, "s1")
    mm.claim(1, "t1")
    assert mm.ready(9, "s1") == [ReplyError(9, "already in a chat")]
    assert mm.queue() == ()


def test_ready_idle_joins_tail():
    mm = make_matchmaker()
    make_waiting(mm, "s1", "s2")
    mm.join("s3", STUDENT, 1)
    assert mm.ready(3, "s3") == [ReplyOk(3, {"position": 3}), QueueChanged()]
    assert mm.queue() == ("s1", "s2", "s3")
    assert mm.student_status("s3") is StudentStatus.WAITING


def test_ready_finished_joins_tail():
    mm = make_matchmaker()
    mm.join("t1", TEACHER, 0)
    make_waiting(mm, "s1", "s2")
    chat = claim_chat(mm, "t1")
    mm.chat_ended(chat.id, "completed")
    assert mm.student_status("s1") is StudentStatus.FINISHED
    assert mm.ready(4, "s1") == [ReplyOk(4, {"position": 2}), QueueChanged()]
    assert mm.queue() == ("s2", "s1")


# claim


def test_claim_not_connected():
    mm = make_matchmaker()
    make_waiting(mm, "s1")
    assert mm.claim(5, "t1") == [ReplyError(5, "not connected")]
    assert mm.queue() == ("s1",)


def test_claim_student_id_is_not_a_teacher():
    mm = make_matchmaker()
    make_waiting(mm, "s1", "s2")
    assert mm.claim(5, "s2") == [ReplyError(5, "not connected")]


def test_claim_no_students_waiting():
    mm = make_matchmaker()
    mm.join("t1", TEACHER, 0)
    mm.join("s1", STUDENT, 0)
    assert mm.claim(6, "t1") == [ReplyError(6, "no students waiting")]


def test_claim_too_many_chats():
    mm = make_matchmaker(max_chats=2)
    mm.join("t1", TEACHER, 0)
    make_waiting(mm, "s1", "s2", "s3")
    claim_chat(mm, "t1")
    claim_chat(mm, "t1")
    assert mm.claim(7, "t1") == [ReplyError(7, "too many chats")]
    assert mm.queue() == ("s3",)
    assert len(mm.chats_of("t1")) == 2


def test_claim_too_many_before_empty_queue():
    mm = make_matchmaker(max_chats=1)
    mm.join("t1", TEACHER, 0)
    make_waiting(mm, "s1")
    claim_chat(mm, "t1")
    assert mm.claim(8, "t1") == [ReplyError(8, "too many chats")]


def test_claim_default_max_is_five():
    mm = make_matchmaker(max_chats=5)
    mm.join("t1", TEACHER, 0)
    make_waiting(mm, *(f"s{i}" for i in range(6)))
    for _ in range(5):
        claim_chat(mm, "t1")
    assert mm.claim(9, "t1") == [ReplyError(9, "too many chats")]
    assert mm.queue() == ("s5",)


def test_claim_assigns_head():
    mm = make_matchmaker(slots=3)
    mm.join("t1", TEACHER, 2)
    make_waiting(mm, "s1", "s2", worker=1)
    effects = mm.claim(10, "t1")
    chat = Chat("chat-1", "t1", "s1", 1, 1000.0)
    assert effects == [ChatAssigned(10, chat, (2,), (1,)), QueueChanged()]
    assert mm.chat("chat-1") == chat
    assert mm.chats_of("t1") == (chat,)
    assert mm.student_status("s1") is StudentStatus.CHATTING
    assert mm.queue() == ("s2",)


def test_claim_worker_from_place():
    mm = make_matchmaker(slots=2)
    mm.join("t1", TEACHER, 0)
    make_waiting(mm, "s1", "s2")
    first = claim_chat(mm, "t1")
    second = claim_chat(mm, "t1")
    assert first.worker == 1
    assert second.worker == 0


def test_claim_serves_in_ready_order():
    mm = make_matchmaker()
    mm.join("t1", TEACHER, 0)
    mm.join("t2", TEACHER, 1)
    for student_id in ("s3", "s1", "s2"):
        mm.join(student_id, STUDENT, 0)
    for student_id in ("s2", "s3", "s1"):
        mm.ready(0, student_id)
    served = [
        claim_chat(mm, "t1").student_id,
        claim_chat(mm, "t2").student_id,
        claim_chat(mm, "t1").student_id,
    ]
    assert served == ["s2", "s3", "s1"]


def test_claim_rejects_reused_chat_id():
    mm = Matchmaker(3, place=place_by_number, new_chat_id=lambda: "chat-1")
    mm.join("t1", TEACHER, 0)
    make_waiting(mm, "s1", "s2")
    claim_chat(mm, "t1")
    with pytest.raises(
        ValueError, match="^new_chat_id returned 'chat-1', which is in use$"
    ):
        mm.claim(11, "t1")
    assert mm.queue() == ("s2",)
    assert mm.student_status("s2") is StudentStatus.WAITING


def test_claim_rejects_place_out_of_range():
    mm = Matchmaker(3, place=lambda chat_id, slots: slots, new_chat_id=lambda: "c")
    mm.join("t1", TEACHER, 0)
    make_waiting(mm, "s1")
    with pytest.raises(
        ValueError, match=r"^place\('c'\) is 3, which is not a slot in 0\.\.2$"
    ):
        mm.claim(12, "t1")
    assert mm.queue() == ("s1",)
    assert mm.chats_of("t1") == ()


# Student leaves


def test_leave_waiting_student_leaves_queue():
    mm = make_matchmaker()
    make_waiting(mm, "s1", "s2", "s3")
    assert mm.leave("s2", STUDENT, 0) == [QueueChanged()]
    assert mm.queue() == ("s1", "s3")
    assert mm.student_status("s2") is None


def test_leave_idle_student_changes_no_queue():
    mm = make_matchmaker()
    mm.join("s1", STUDENT, 0)
    assert mm.leave("s1", STUDENT, 0) == []


def test_leave_chatting_student_ends_chat():
    mm = make_matchmaker()
    mm.join("t1", TEACHER, 0)
    make_waiting(mm, "s1", "s2")
    chat = claim_chat(mm, "t1")
    assert mm.leave("s1", STUDENT, 0) == [EndChat(chat, "student_disconnected")]
    assert mm.chat(chat.id) is None
    assert mm.chats_of("t1") == ()
    assert mm.student_status("s1") is None
    assert mm.queue() == ("s2",)


def test_leave_chatting_student_frees_place():
    mm = make_matchmaker(max_chats=1)
    mm.join("t1", TEACHER, 0)
    make_waiting(mm, "s1", "s2")
    claim_chat(mm, "t1")
    mm.leave("s1", STUDENT, 0)
    assert claim_chat(mm, "t1").student_id == "s2"


def test_leave_chatting_student_second_connection():
    mm = make_matchmaker()
    mm.join("t1", TEACHER, 0)
    make_waiting(mm, "s1")
    mm.join("s1", STUDENT, 2)
    chat = claim_chat(mm, "t1")
    assert mm.leave("s1", STUDENT, 0) == []
    assert mm.chat(chat.id) == chat


def test_leave_finished_student_is_forgotten():
    mm = make_matchmaker()
    mm.join("t1", TEACHER, 0)
    make_waiting(mm, "s1")
    mm.chat_ended(claim_chat(mm, "t1").id, "completed")
    assert mm.leave("s1", STUDENT, 0) == []
    assert mm.counts() == Counts(1, 0, 0, 0, 0)


# Teacher leaves


def test_leave_teacher_requeues_at_head():
    mm = make_matchmaker()
    mm.join("t1", TEACHER, 0)
    mm.join("t2", TEACHER, 1)
    make_waiting(mm, "s1", "s2", "s3", "s4", "s5")
    first = claim_chat(mm, "t1")
    other = claim_chat(mm, "t2")
    second = claim_chat(mm, "t1")
    third = claim_chat(mm, "t1")

    effects = mm.leave("t1", TEACHER, 0)

    assert effects == [
        EndChat(first, "teacher_disconnected"),
        EndChat(second, "teacher_disconnected"),
        EndChat(third, "teacher_disconnected"),
        QueueChanged(),
    ]
    assert mm.queue() == ("s1", "s3", "s4", "s5")
    assert mm.chats_of("t2") == (other,)
    assert mm.chats_of("t1") == ()
    assert mm.counts() == Counts(1, 5, 4, 1, 0)
    for student_id in ("s1", "s3", "s4"):
        assert mm.student_status(student_id) is StudentStatus.WAITING


def test_leave_teacher_without_chats():
    mm = make_matchmaker()
    mm.join("t1", TEACHER, 0)
    make_waiting(mm, "s1")
    assert mm.leave("t1", TEACHER, 0) == []
    assert mm.queue() == ("s1",)


def test_leave_teacher_second_connection():
    mm = make_matchmaker()
    mm.join("t1", TEACHER, 0)
    mm.join("t1", TEACHER, 0)
    make_waiting(mm, "s1")
    chat = claim_chat(mm, "t1")
    assert mm.leave("t1", TEACHER, 0) == []
    assert mm.chats_of("t1") == (chat,)


# chat_ended


@pytest.mark.parametrize("reason", sorted(REQUEUE_REASONS))
def test_chat_ended_requeue_reason(reason):
    mm = make_matchmaker(max_chats=1)
    mm.join("t1", TEACHER, 0)
    make_waiting(mm, "s1", "s2")
    chat = claim_chat(mm, "t1")
    assert mm.chat_ended(chat.id, reason) == [QueueChanged()]
    assert mm.queue() == ("s1", "s2")
    assert mm.student_status("s1") is StudentStatus.WAITING
    assert mm.chat(chat.id) is None
    assert mm.chats_of("t1") == ()


def test_requeue_reasons_exact():
    assert REQUEUE_REASONS == {"teacher_left", "teacher_disconnected", "worker_lost"}


@pytest.mark.parametrize("reason", ["completed", "student_left", "teacher_ended"])
def test_chat_ended_other_reason_finishes(reason):
    mm = make_matchmaker()
    mm.join("t1", TEACHER, 0)
    make_waiting(mm, "s1", "s2")
    chat = claim_chat(mm, "t1")
    assert mm.chat_ended(chat.id, reason) == []
    assert mm.student_status("s1") is StudentStatus.FINISHED
    assert mm.queue() == ("s2",)
    assert mm.chat(chat.id) is None


def test_chat_ended_frees_teacher_place():
    mm = make_matchmaker(max_chats=1)
    mm.join("t1", TEACHER, 0)
    make_waiting(mm, "s1", "s2")
    mm.chat_ended(claim_chat(mm, "t1").id, "completed")
    assert claim_chat(mm, "t1").student_id == "s2"


def test_chat_ended_unknown_id():
    mm = make_matchmaker()
    assert mm.chat_ended("chat-404", "completed") == []


def test_chat_ended_twice_is_idempotent():
    mm = make_matchmaker()
    mm.join("t1", TEACHER, 0)
    make_waiting(mm, "s1")
    chat = claim_chat(mm, "t1")
    mm.chat_ended(chat.id, "completed")
    before = mm.snapshot()
    assert mm.chat_ended(chat.id, "teacher_left") == []
    assert mm.snapshot() == before
    assert mm.student_status("s1") is StudentStatus.FINISHED


def test_chat_ended_after_student_left():
    mm = make_matchmaker()
    mm.join("t1", TEACHER, 0)
    make_waiting(mm, "s1")
    chat = claim_chat(mm, "t1")
    mm.leave("s1", STUDENT, 0)
    assert mm.chat_ended(chat.id, "student_disconnected") == []


# worker_lost


def test_worker_lost_ends_own_chats():
    mm = make_matchmaker(slots=3)
    mm.join("t1", TEACHER, 0)
    make_waiting(mm, "s1", "s2", "s3", "s4", worker=0)
    on_1 = claim_chat(mm, "t1")
    on_2 = claim_chat(mm, "t1")
    on_0 = claim_chat(mm, "t1")

    effects = mm.worker_lost(1)

    assert effects == [EndChat(on_1, "worker_lost"), QueueChanged()]
    assert mm.queue() == ("s1", "s4")
    assert mm.chats_of("t1") == (on_2, on_0)
    assert mm.student_status("s1") is StudentStatus.WAITING


def test_worker_lost_drops_presences():
    mm = make_matchmaker(slots=3)
    mm.join("t1", TEACHER, 1)
    mm.join("t2", TEACHER, 1)
    mm.join("t2", TEACHER, 2)
    make_waiting(mm, "s1", "s2", worker=1)
    mm.join("s2", STUDENT, 0)
    mm.join("s3", STUDENT, 1)

    assert mm.worker_lost(1) == [QueueChanged()]
    assert mm.queue() == ("s2",)
    assert mm.queue_positions() == {"s2": (1, (0,))}
    assert mm.student_status("s1") is None
    assert mm.student_status("s3") is None
    assert mm.teacher_workers() == (2,)
    assert mm.counts() == Counts(1, 1, 1, 0, 0)


def test_worker_lost_with_many_joins_on_it():
    mm = make_matchmaker(slots=2)
    mm.join("t1", TEACHER, 0)
    mm.join("t1", TEACHER, 0)
    mm.join("t1", TEACHER, 1)
    mm.worker_lost(0)
    assert mm.teacher_workers() == (1,)
    mm.leave("t1", TEACHER, 1)
    assert mm.counts().teachers == 0


def test_worker_lost_teacher_ends_chats_elsewhere():
    mm = make_matchmaker(slots=3)
    mm.join("t1", TEACHER, 0)
    make_waiting(mm, "s1", "s2", worker=2)
    on_1 = claim_chat(mm, "t1")
    on_2 = claim_chat(mm, "t1")

    effects = mm.worker_lost(0)

    assert effects == [
        EndChat(on_1, "teacher_disconnected"),
        EndChat(on_2, "teacher_disconnected"),
        QueueChanged(),
    ]
    assert mm.queue() == ("s1", "s2")
    assert mm.counts() == Counts(0, 2, 2, 0, 0)


def test_worker_lost_student_ends_chat_elsewhere():
    mm = make_matchmaker(slots=3)
    mm.join("t1", TEACHER, 2)
    make_waiting(mm, "s1", worker=0)
    chat = claim_chat(mm, "t1")
    assert chat.worker == 1

    assert mm.worker_lost(0) == [EndChat(chat, "student_disconnected")]
    assert mm.student_status("s1") is None
    assert mm.chats_of("t1") == ()


def test_worker_lost_chat_and_student_on_it():
    mm = make_matchmaker(slots=2)
    mm.join("t1", TEACHER, 0)
    make_waiting(mm, "s1", worker=1)
    chat = claim_chat(mm, "t1")
    assert chat.worker == 1

    assert mm.worker_lost(1) == [EndChat(chat, "worker_lost")]
    assert mm.student_status("s1") is None
    assert mm.queue() == ()
    assert mm.chats_of("t1") == ()


def test_worker_lost_requeue_order():
    mm = make_matchmaker(slots=2)
    mm.join("t1", TEACHER, 0)
    mm.join("t2", TEACHER, 1)
    make_waiting(mm, "s1", "s2", "s3", "s4", "s5", worker=1)
    first = claim_chat(mm, "t1")
    second = claim_chat(mm, "t2")
    third = claim_chat(mm, "t2")
    fourth = claim_chat(mm, "t1")
    workers = [chat.worker for chat in (first, second, third, fourth)]
    assert workers == [1, 0, 1, 0]

    effects = mm.worker_lost(0)

    assert effects == [
        EndChat(first, "teacher_disconnected"),
        EndChat(second, "worker_lost"),
        EndChat(fourth, "worker_lost"),
        QueueChanged(),
    ]
    assert mm.queue() == ("s1", "s2", "s4", "s5")
    assert mm.chats_of("t2") == (third,)


def test_worker_lost_requeued_ahead_of_waiting():
    mm = make_matchmaker(slots=2)
    mm.join("t1", TEACHER, 1)
    make_waiting(mm, "s1", "s2", "s3")
    claim_chat(mm, "t1")
    claim_chat(mm, "t1")
    mm.worker_lost(1)
    assert mm.queue() == ("s1", "s2", "s3")


def test_worker_lost_rejects_worker_out_of_range():
    mm = make_matchmaker(slots=3)
    with pytest.raises(
        ValueError, match=r"^worker is 5, which is not a slot in 0\.\.2$"
    ):
        mm.worker_lost(5)


def test_worker_lost_then_rejoin():
    mm = make_matchmaker(slots=2)
    mm.join("s1", STUDENT, 0)
    mm.worker_lost(0)
    mm.join("s1", STUDENT, 0)
    assert mm.student_status("s1") is StudentStatus.IDLE


# Status


def test_take_status_initially_none():
    mm = make_matchmaker()
    assert mm.take_status() is None


def test_take_status_once_per_change():
    mm = make_matchmaker()
    mm.join("t1", TEACHER, 0)
    assert mm.take_status() == Counts(1, 0, 0, 0, 0)
    assert mm.take_status() is None


def test_take_status_coalesces_burst():
    mm = make_matchmaker()
    for i in range(1000):
        mm.join(f"s{i}", STUDENT, i % 3)
    assert mm.take_status() == Counts(0, 1000, 0, 0, 0)
    assert mm.take_status() is None


def test_take_status_second_worker_join():
    mm = make_matchmaker()
    mm.join("t1", TEACHER, 0)
    mm.join("s1", STUDENT, 0)
    mm.take_status()
    mm.join("t1", TEACHER, 1)
    mm.join("s1", STUDENT, 2)
    assert mm.take_status() is None


def test_take_status_reverted_change_is_none():
    mm = make_matchmaker()
    mm.join("s1", STUDENT, 0)
    mm.leave("s1", STUDENT, 0)
    assert mm.take_status() is None


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (lambda mm: mm.ready(0, "s2"), Counts(1, 2, 2, 0, 0)),
        (lambda mm: mm.claim(0, "t1"), Counts(1, 2, 0, 1, 0)),
        (lambda mm: mm.leave("s2", STUDENT, 0), Counts(1, 1, 1, 0, 0)),
        (lambda mm: mm.leave("t1", TEACHER, 0), Counts(0, 2, 1, 0, 0)),
        (lambda mm: mm.join("t2", TEACHER, 1), Counts(2, 2, 1, 0, 0)),
    ],
    ids=["ready", "claim", "student_leave", "teacher_leave", "teacher_join"],
)
def test_take_status_after_change(event, expected):
    mm = make_matchmaker()
    mm.join("t1", TEACHER, 0)
    make_waiting(mm, "s1")
    mm.join("s2", STUDENT, 0)
    mm.take_status()
    event(mm)
    assert mm.take_status() == expected


def test_take_status_after_chat_finished():
    mm = make_matchmaker()
    mm.join("t1", TEACHER, 0)
    make_waiting(mm, "s1")
    chat = claim_chat(mm, "t1")
    mm.take_status()
    mm.chat_ended(chat.id, "completed")
    assert mm.take_status() == Counts(1, 1, 0, 0, 1)


# Counts


def test_counts_by_status():
    mm = make_matchmaker()
    mm.join("t1", TEACHER, 0)
    mm.join("t2", TEACHER, 1)
    mm.join("idle", STUDENT, 0)
    make_waiting(mm, "chatting", "finished", "waiting")
    claim_chat(mm, "t1")
    mm.chat_ended(claim_chat(mm, "t2").id, "completed")
    assert mm.counts() == Counts(
        teachers=2, students=4, waiting=1, chatting=1, finished=1
    )


def test_counts_student_on_two_workers_once():
    mm = make_matchmaker()
    make_waiting(mm, "s1", worker=0)
    mm.join("s1", STUDENT, 1)
    assert mm.counts() == Counts(0, 1, 1, 0, 0)


# Reads


def test_queue_positions():
    mm = make_matchmaker()
    make_waiting(mm, "s1", worker=2)
    mm.join("s1", STUDENT, 0)
    make_waiting(mm, "s2", worker=1)
    mm.join("s3", STUDENT, 0)
    assert mm.queue_positions() == {"s1": (1, (0, 2)), "s2": (2, (1,))}


def test_snapshot():
    mm = make_matchmaker(slots=3)
    mm.join("t1", TEACHER, 0)
    mm.join("t2", TEACHER, 1)
    make_waiting(mm, "s1", "s2")
    claim_chat(mm, "t1")
    snapshot = mm.snapshot()
    assert snapshot == {
        "counts": {
            "teachers": {"total": 2},
            "students": {"total": 2, "waiting": 1, "chatting": 1, "finished": 0},
        },
        "queue_length": 1,
        "chats": [
            {
                "id": "chat-1",
                "teacher_id": "t1",
                "student_id": "s1",
                "worker": 1,
                "created_at": 1000.0,
            }
        ],
        "teachers": {"t1": 1, "t2": 0},
    }
    assert json.loads(json.dumps(snapshot)) == snapshot


def test_chats_of_unknown_teacher():
    mm = make_matchmaker()
    assert mm.chats_of("t1") == ()


def test_chat_unknown_id():
    mm = make_matchmaker()
    assert mm.chat("chat-1") is None


# Random event sequences against a plain-list model

TEACHERS = ("t0", "t1", "s0")  # "s0" is also a student id: separate namespaces
STUDENTS = ("s0", "s1", "s2", "s3", "s4")
SLOTS = 3
MAX_CHATS = 2
END_REASONS = (
    "teacher_left",
    "teacher_disconnected",
    "worker_lost",
    "completed",
    "student_left",
)


class MatchmakerModel:
    """A slow reference of the matchmaker rules built on lists and Counters."""

    def __init__(self) -> None:
        self.refs = {TEACHER: {}, STUDENT: {}}
        self.status: dict[str, StudentStatus] = {}
        self.queue: list[str] = []
        self.chats: list[Chat] = []  # oldest first

    def workers(self, role: Role, user_id: str) -> tuple[int, ...]:
        return tuple(sorted(self.refs[role][user_id]))

    def join(self, user_id, role, worker):
        self.refs[role].setdefault(user_id, collections.Counter())[worker] += 1
        if role is STUDENT:
            self.status.setdefault(user_id, StudentStatus.IDLE)
        return []

    def leave(self, user_id, role, worker):
        refs = self.refs[role].get(user_id)
        if refs is None or refs[worker] == 0:
            return []
        refs[worker] -= 1
        if refs[worker] == 0:
            del refs[worker]
        if refs:
            return []
        del self.refs[role][user_id]
        if role is TEACHER:
            ending = [
                (chat, "teacher_disconnected")
                for chat in self.chats
                if chat.teacher_id == user_id
            ]
            requeued = self.end(ending)
            effects = [EndChat(chat, reason) for chat, reason in ending]
            return effects + ([QueueChanged()] if requeued else [])
        status = self.status.pop(user_id)
        if status is StudentStatus.WAITING:
            self.queue.remove(user_id)
            return [QueueChanged()]
        if status is StudentStatus.CHATTING:
            chat = next(c for c in self.chats if c.student_id == user_id)
            self.chats.remove(chat)
            return [EndChat(chat, "student_disconnected")]
        return []

    def end(self, ending):
        requeued = []
        for chat, reason in ending:
            self.chats.remove(chat)
            if chat.student_id not in self.status:
                continue
            if reason in REQUEUE_REASONS:
                self.status[chat.student_id] = StudentStatus.WAITING
                requeued.append(chat.student_id)
            else:
                self.status[chat.student_id] = StudentStatus.FINISHED
        self.queue[:0] = requeued
        return bool(requeued)

    def ready(self, request_id, student_id):
        status = self.status.get(student_id)
        if status is None:
            return [ReplyError(request_id, "not connected")]
        if status is StudentStatus.WAITING:
            return [ReplyError(request_id, "already waiting")]
        if status is StudentStatus.CHATTING:
            return [ReplyError(request_id, "already in a chat")]
        self.status[student_id] = StudentStatus.WAITING
        self.queue.append(student_id)
        return [ReplyOk(request_id, {"position": len(self.queue)}), QueueChanged()]

    def claim_error(self, teacher_id):
        if teacher_id not in self.refs[TEACHER]:
            return "not connected"
        if sum(chat.teacher_id == teacher_id for chat in self.chats) >= MAX_CHATS:
            return "too many chats"
        if not self.queue:
            return "no students waiting"
        return None

    def chat_ended(self, chat_id, reason):
        chat = next((c for c in self.chats if c.id == chat_id), None)
        if chat is None:
            return []
        return [QueueChanged()] if self.end([(chat, reason)]) else []

    def worker_lost(self, worker):
        disconnected = {TEACHER: set(), STUDENT: set()}
        for role, users in self.refs.items():
            for user_id, refs in list(users.items()):
                refs.pop(worker, None)
                if not refs:
                    del users[user_id]
                    disconnected[role].add(user_id)
        ending = []
        for chat in self.chats:
            if chat.worker == worker:
                ending.append((chat, "worker_lost"))
            elif chat.teacher_id in disconnected[TEACHER]:
                ending.append((chat, "teacher_disconnected"))
            elif chat.student_id in disconnected[STUDENT]:
                ending.append((chat, "student_disconnected"))
        queue_changed = False
        for student_id in disconnected[STUDENT]:
            if self.status.pop(student_id) is StudentStatus.WAITING:
                self.queue.remove(student_id)
                queue_changed = True
        queue_changed |= self.end(ending)
        effects = [EndChat(chat, reason) for chat, reason in ending]
        return effects + ([QueueChanged()] if queue_changed else [])


class MatchmakerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.mm = make_matchmaker(slots=SLOTS, max_chats=MAX_CHATS)
        self.model = MatchmakerModel()
        self.chat_ids: list[str] = ["chat-unknown"]
        self.request_ids = itertools.count(1)
        # student -> how it last entered the queue: ("ready", order) or
        # ("requeued", 0), to check ready() order independently of the model.
        self.entries: dict[str, tuple[str, int]] = {}
        self.ready_order = itertools.count()

    def apply(self, event, *args):
        before = {s: self.mm.student_status(s) for s in STUDENTS}
        effects = getattr(self.mm, event)(*args)
        expected = getattr(self.model, event)(*args)
        assert effects == expected
        for student_id in STUDENTS:
            was_chatting = before[student_id] is StudentStatus.CHATTING
            now = self.mm.student_status(student_id)
            if was_chatting and now is StudentStatus.WAITING:
                self.entries[student_id] = ("requeued", 0)
        return effects

    @initialize(
        teacher_workers=st.lists(st.integers(0, SLOTS - 1), min_size=3, max_size=3),
        student_workers=st.lists(st.integers(0, SLOTS - 1), min_size=5, max_size=5),
    )
    def join_everyone(self, teacher_workers, student_workers):
        # Start with everyone connected so that short runs reach claims.
        for teacher_id, worker in zip(TEACHERS, teacher_workers, strict=True):
            self.apply("join", teacher_id, TEACHER, worker)
        for student_id, worker in zip(STUDENTS, student_workers, strict=True):
            self.apply("join", student_id, STUDENT, worker)

    def connected(self, role: Role) -> list[str]:
        return sorted(self.model.refs[role])

    @rule(teacher_id=st.sampled_from(TEACHERS), worker=st.integers(0, SLOTS - 1))
    def join_teacher(self, teacher_id, worker):
        self.apply("join", teacher_id, TEACHER, worker)

    @rule(student_id=st.sampled_from(STUDENTS), worker=st.integers(0, SLOTS - 1))
    def join_student(self, student_id, worker):
        self.apply("join", student_id, STUDENT, worker)

    @precondition(lambda self: self.model.refs[TEACHER] or self.model.refs[STUDENT])
    @rule(data=st.data())
    def leave_joined(self, data):
        joined = [
            (user_id, role, worker)
            for role, users in self.model.refs.items()
            for user_id, refs in sorted(users.items())
            for worker in sorted(refs)
        ]
        self.apply("leave", *data.draw(st.sampled_from(joined)))

    @rule(
        role=st.sampled_from(Role),
        index=st.integers(0, 4),
        worker=st.integers(0, SLOTS - 1),
    )
    def leave_any(self, role, index, worker):
        names = TEACHERS if role is TEACHER else STUDENTS
        self.apply("leave", names[index % len(names)], role, worker)

    def check_ready(self, student_id):
        effects = self.apply("ready", next(self.request_ids), student_id)
        if isinstance(effects[0], ReplyOk):
            self.entries[student_id] = ("ready", next(self.ready_order))

    @precondition(lambda self: self.model.refs[STUDENT])
    @rule(data=st.data())
    def ready_connected(self, data):
        self.check_ready(data.draw(st.sampled_from(self.connected(STUDENT))))

    @rule(student_id=st.sampled_from(STUDENTS))
    def ready_any(self, student_id):
        self.check_ready(student_id)

    def check_claim(self, teacher_id):
        request_id = next(self.request_ids)
        head = self.mm.queue()[:1]
        error = self.model.claim_error(teacher_id)
        effects = self.mm.claim(request_id, teacher_id)
        if error is not None:
            assert effects == [ReplyError(request_id, error)]
            return

        chat = effects[0].chat
        assert (chat.student_id,) == head
        assert chat.teacher_id == teacher_id
        assert chat.worker == place_by_number(chat.id, SLOTS)
        assert effects == [
            ChatAssigned(
                request_id,
                chat,
                self.model.workers(TEACHER, teacher_id),
                self.model.workers(STUDENT, chat.student_id),
            ),
            QueueChanged(),
        ]
        self.model.queue.pop(0)
        self.model.status[chat.student_id] = StudentStatus.CHATTING
        self.model.chats.append(chat)
        self.chat_ids.append(chat.id)

    @precondition(lambda self: self.model.refs[TEACHER])
    @rule(data=st.data())
    def claim_connected(self, data):
        self.check_claim(data.draw(st.sampled_from(self.connected(TEACHER))))

    @rule(teacher_id=st.sampled_from(TEACHERS))
    def claim_any(self, teacher_id):
        self.check_claim(teacher_id)

    @precondition(lambda self: self.model.chats)
    @rule(data=st.data(), reason=st.sampled_from(END_REASONS))
    def chat_ended_current(self, data, reason):
        chat = data.draw(st.sampled_from(self.model.chats))
        self.apply("chat_ended", chat.id, reason)

    @rule(data=st.data(), reason=st.sampled_from(END_REASONS))
    def chat_ended_any(self, data, reason):
        # Mostly ids of chats already ended, and one id never issued.
        chat_id = data.draw(st.sampled_from(self.chat_ids))
        self.apply("chat_ended", chat_id, reason)

    @rule(worker=st.integers(0, SLOTS - 1))
    def worker_lost(self, worker):
        self.apply("worker_lost", worker)

    @invariant()
    def state_matches_model(self):
        assert self.mm.queue() == tuple(self.model.queue)
        for student_id in STUDENTS:
            expected = self.model.status.get(student_id)
            assert self.mm.student_status(student_id) is expected
        chats = [self.mm.chat(chat.id) for chat in self.model.chats]
        assert chats == self.model.chats
        teacher_workers = {
            worker for refs in self.model.refs[TEACHER].values() for worker in refs
        }
        assert self.mm.teacher_workers() == tuple(sorted(teacher_workers))

    @invariant()
    def teachers_within_max_chats(self):
        for teacher_id in TEACHERS:
            assert len(self.mm.chats_of(teacher_id)) <= MAX_CHATS

    @invariant()
    def chatting_students_match_chats(self):
        chats = self.mm.snapshot()["chats"]
        students_in_chats = [chat["student_id"] for chat in chats]
        assert len(students_in_chats) == len(set(students_in_chats))
        chatting = {
            s for s in STUDENTS if self.mm.student_status(s) is StudentStatus.CHATTING
        }
        assert set(students_in_chats) == chatting

    @invariant()
    def queue_holds_waiting_students(self):
        queue = self.mm.queue()
        assert len(queue) == len(set(queue))
        waiting = {
            s for s in STUDENTS if self.mm.student_status(s) is StudentStatus.WAITING
        }
        assert set(queue) == waiting

    @invariant()
    def counts_match_recount(self):
        statuses = [self.mm.student_status(s) for s in STUDENTS]
        connected = [status for status in statuses if status is not None]
        recount = Counts(
            teachers=len(self.mm.snapshot()["teachers"]),
            students=len(connected),
            waiting=connected.count(StudentStatus.WAITING),
            chatting=connected.count(StudentStatus.CHATTING),
            finished=connected.count(StudentStatus.FINISHED),
        )
        assert self.mm.counts() == recount

    @invariant()
    def ready_students_in_ready_order(self):
        entries = [self.entries[student_id] for student_id in self.mm.queue()]
        kinds = [kind for kind, _ in entries]
        # Every requeued student is ahead of every student queued by ready().
        assert kinds == sorted(kinds, key=lambda kind: kind == "ready")
        orders = [order for kind, order in entries if kind == "ready"]
        assert orders == sorted(orders)


MatchmakerMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None
)
test_matchmaker_random_events = MatchmakerMachine.TestCase
