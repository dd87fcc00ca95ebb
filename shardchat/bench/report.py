"""Benchmark bookkeeping without I/O: merge bot results, verify chat logs, summarize.

The runner gathers plain data (the bots' result files, the server's ``/stats``
and chat logs) and hands it to these functions, so every rule that decides
whether a run passed is tested here with no server and no event loop.

A chat counts as completed when either of its bots saw it end with
``teacher_ended``. Such a chat must have a log of exactly ``2 * messages``
rows, numbered 1 to ``2 * messages``, alternating teacher and student, whose
bodies are the texts the bots sent. A chat cut short for another reason (the
server then puts the student back in the queue) is counted as interrupted, and
its log only has to agree that it did not end with ``teacher_ended``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "COMPLETED_REASON",
    "MAX_LISTED_PROBLEMS",
    "ChatRecord",
    "MergedResults",
    "Verification",
    "Workload",
    "build_summary",
    "cpu_usage",
    "format_summary",
    "is_log_settled",
    "merge_results",
    "percentile",
    "verify_chat",
    "verify_run",
]

COMPLETED_REASON = "teacher_ended"

# The text summary lists this many problems; the JSON summary lists them all.
MAX_LISTED_PROBLEMS = 10


@dataclass(frozen=True)
class Workload:
    """The settings of one benchmark run."""

    students: int
    teachers: int
    per_teacher: int
    messages: int
    workers: int | None
    ws_engine: str | None = None
    layout: str = "per-chat"


@dataclass(frozen=True)
class ChatRecord:
    """One chat as its two bots reported it.

    A side that sent no report (its process died, say) has ``None`` for its
    sent texts and its end reason.
    """

    chat_id: str
    teacher_id: str
    student_id: str
    teacher_sent: tuple[str, ...] | None = None
    student_sent: tuple[str, ...] | None = None
    teacher_end: str | None = None
    student_end: str | None = None

    @property
    def completed(self) -> bool:
        return COMPLETED_REASON in (self.teacher_end, self.student_end)


@dataclass(frozen=True)
class MergedResults:
    """The bot processes' results added together."""

    frames_sent: int = 0
    frames_received: int = 0
    chats: dict[str, ChatRecord] = field(default_factory=dict)
    latency_ms: list[float] = field(default_factory=list)
    client_cpu_s: float = 0.0
    errors: list[str] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)
    started_at: float | None = None
    students_finished_at: float | None = None
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Verification:
    """The outcome of checking every reported chat against its log."""

    chats_verified: int
    chats_interrupted: int
    problems: list[str]


def merge_results(results: Iterable[Mapping[str, Any]]) -> MergedResults:
    """Add up the bot processes' result documents.

    Each document has ``role``, ``frames_sent``, ``frames_received``,
    ``chats`` (``chat_id``, ``teacher_id``, ``student_id``, ``sent``,
    ``end_reason``), ``latency_ms``, ``errors``, ``cpu_s``, ``unfinished``,
    ``started_at`` and ``finished_at``. A chat reported twice by the same
    role is a problem, as is a chat whose two reports name different
    participants.
    """
    frames_sent = 0
    frames_received = 0
    latency: list[float] = []
    cpu = 0.0
    errors: list[str] = []
    unfinished: list[str] = []
    problems: list[str] = []
    started: list[float] = []
    students_finished: list[float] = []
    sides: dict[str, dict[str, Any]] = {}

    for result in results:
        role = result["role"]
        frames_sent += result["frames_sent"]
        frames_received += result["frames_received"]
        latency.extend(result.get("latency_ms", ()))
        cpu += result.get("cpu_s", 0.0)
        errors.extend(result.get("errors", ()))
        unfinished.extend(result.get("unfinished", ()))
        if result.get("started_at") is not None:
            started.append(result["started_at"])
        if role == "student" and result.get("finished_at") is not None:
            students_finished.append(result["finished_at"])
        for chat in result.get("chats", ()):
            problem = _add_side(sides, role, chat)
            if problem is not None:
                problems.append(problem)

    chats = {chat_id: ChatRecord(**fields) for chat_id, fields in sides.items()}
    return MergedResults(
        frames_sent=frames_sent,
        frames_received=frames_received,
        chats=chats,
        latency_ms=latency,
        client_cpu_s=cpu,
        errors=errors,
        unfinished=sorted(unfinished, key=_natural_key),
        started_at=min(started, default=None),
        students_finished_at=max(students_finished, default=None),
        problems=problems,
    )


def _add_side(
    sides: dict[str, dict[str, Any]], role: str, chat: Mapping[str, Any]
) -> str | None:
    chat_id = chat["chat_id"]
    fields = sides.setdefault(
        chat_id,
        {
            "chat_id": chat_id,
            "teacher_id": chat["teacher_id"],
            "student_id": chat["student_id"],
        },
    )
    participants = (fields["teacher_id"], fields["student_id"])
    if participants != (chat["teacher_id"], chat["student_id"]):
        return (
            f"chat {chat_id}: reported with teacher {chat['teacher_id']} and "
            f"student {chat['student_id']}, but also with teacher "
            f"{participants[0]} and student {participants[1]}"
        )
    sent_key = f"{role}_sent"
    if fields.get(sent_key) is not None:
        return f"chat {chat_id}: reported twice by the {role} bots"
    fields[sent_key] = tuple(chat["sent"])
    fields[f"{role}_end"] = chat.get("end_reason")
    return None


def _natural_key(bot_id: str) -> tuple[str, int]:
    digits = bot_id.lstrip("abcdefghijklmnopqrstuvwxyz")
    prefix = bot_id[: len(bot_id) - len(digits)]
    return (prefix, int(digits)) if digits.isdigit() else (bot_id, -1)


def percentile(samples: Sequence[float], fraction: float) -> float | None:
    """Return the ``fraction`` quantile of ``samples``, or None when empty.

    The quantile interpolates linearly between the two nearest ranks, the
    method numpy's ``percentile`` uses by default, so the median of an even
    number of samples is the mean of the middle two.

    Raises:
        ValueError: ``fraction`` is outside 0..1.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"invalid fraction {fraction!r}: expected 0 to 1")
    if not samples:
        return None
    ordered = sorted(samples)
    position = fraction * (len(ordered) - 1)
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    weight = position - lower
    return ordered[lower] + (ordered[upper] - ordered[lower]) * weight


def is_log_settled(
    record: ChatRecord, log: Mapping[str, Any] | None, messages: int
) -> bool:
    """Return whether a fetched log looks fully committed for ``record``.

    The server commits chat logs in batches, so a log read right after the
    chat ended may still lack its last rows or its end reason. The runner
    fetches again until this is true or its retry time runs out.
    """
    if log is None:
        return False
    if log["chat"].get("end_reason") is None:
        return False
    if not record.completed:
        return True
    return len(log["messages"]) >= 2 * messages


def verify_chat(
    record: ChatRecord, log: Mapping[str, Any] | None, messages: int
) -> list[str]:
    """Check one chat's log against what its bots reported; return the problems.

    ``log`` is the ``GET /chats/<id>/messages`` document, or None when the
    server returned 404. ``messages`` is the number of messages each side
    sends in a completed chat.
    """
    chat_id = record.chat_id
    if log is None:
        return [f"chat {chat_id}: log not found"]

    problems = _check_participants(record, log["chat"])
    end_reason = log["chat"].get("end_reason")
    if not record.completed:
        if end_reason == COMPLETED_REASON:
            problems.append(
                f"chat {chat_id}: log ends with {COMPLETED_REASON}, but the bots "
                f"saw {record.teacher_end or record.student_end or 'no end'}"
            )
        return problems

    if end_reason != COMPLETED_REASON:
        problems.append(
            f"chat {chat_id}: end reason {end_reason!r}, expected {COMPLETED_REASON!r}"
        )
    problems.extend(_check_sent(record, messages))
    problems.extend(_check_rows(record, log["messages"], messages))
    return problems


def _check_participants(record: ChatRecord, chat: Mapping[str, Any]) -> list[str]:
    problems = []
    for role, expected in (
        ("teacher", record.teacher_id),
        ("student", record.student_id),
    ):
        found = chat.get(f"{role}_id")
        if found != expected:
            problems.append(
                f"chat {record.chat_id}: log names {role} {found!r}, "
                f"expected {expected!r}"
            )
    return problems


def _check_sent(record: ChatRecord, messages: int) -> list[str]:
    problems = []
    for role, sent in (
        ("teacher", record.teacher_sent),
        ("student", record.student_sent),
    ):
        if sent is None:
            problems.append(f"chat {record.chat_id}: no report from its {role} bot")
        elif len(sent) != messages:
            problems.append(
                f"chat {record.chat_id}: {role} bot sent {len(sent)} messages, "
                f"expected {messages}"
            )
    return problems


def _check_rows(
    record: ChatRecord, rows: Sequence[Mapping[str, Any]], messages: int
) -> list[str]:
    chat_id = record.chat_id
    expected_count = 2 * messages
    if len(rows) != expected_count:
        return [
            f"chat {chat_id}: log has {len(rows)} messages, expected {expected_count}"
        ]

    # Teacher message k is row 2k-1, and the student's reply to it is row 2k.
    teacher_sent = record.teacher_sent or ()
    student_sent = record.student_sent or ()
    for index, row in enumerate(rows):
        seq = index + 1
        if row.get("seq") != seq:
            return [f"chat {chat_id}: row {seq} has seq {row.get('seq')}"]

        role, participant, sent = (
            ("teacher", record.teacher_id, teacher_sent)
            if index % 2 == 0
            else ("student", record.student_id, student_sent)
        )
        # The log may name the sender by role or by user id.
        if row.get("sender") not in (role, participant):
            sender = row.get("sender")
            return [
                f"chat {chat_id}: message {seq} sent by {sender!r}, expected the {role}"
            ]

        turn = index // 2
        if turn < len(sent) and row.get("body") != sent[turn]:
            body = row.get("body")
            return [
                f"chat {chat_id}: message {seq} is {body!r}, the {role} bot sent {sent[turn]!r}"
            ]
    return []


def verify_run(
    merged: MergedResults,
    logs: Mapping[str, Mapping[str, Any] | None],
    workload: Workload,
) -> Verification:
    """Check every reported chat and that each student completed exactly one.

    ``logs`` maps each chat id in ``merged.chats`` to its fetched log, or to
    None when the server has none. A chat missing from ``logs`` counts as
    not found.
    """
    problems = list(merged.problems)
    verified = 0
    interrupted = 0
    completed_by_student: dict[str, list[str]] = {}

    for chat_id in sorted(merged.chats, key=_natural_key):
        record = merged.chats[chat_id]
        chat_problems = verify_chat(record, logs.get(chat_id), workload.messages)
        problems.extend(chat_problems)
        if not record.completed:
            interrupted += 1
            continue
        completed_by_student.setdefault(record.student_id, []).append(chat_id)
        if not chat_problems:
            verified += 1

    for student_id, chat_ids in sorted(completed_by_student.items()):
        if len(chat_ids) > 1:
            problems.append(
                f"student {student_id}: completed {len(chat_ids)} chats "
                f"({', '.join(chat_ids)}), expected 1"
            )

    completed = len(completed_by_student)
    if completed != workload.students:
        missing = workload.students - completed
        line = f"{completed} of {workload.students} students completed a chat"
        if merged.unfinished:
            listed = ", ".join(merged.unfinished[:MAX_LISTED_PROBLEMS])
            more = len(merged.unfinished) - MAX_LISTED_PROBLEMS
            suffix = f" and {more} more" if more > 0 else ""
            line += f"; unfinished bots: {listed}{suffix}"
        elif missing > 0:
            line += f"; {missing} missing"
        problems.append(line)
    return Verification(verified, interrupted, problems)


def cpu_usage(
    before: Mapping[str, Any] | None, after: Mapping[str, Any]
) -> dict[str, Any]:
    """Return the server CPU seconds spent between two ``/stats`` ``cpu_s`` maps.

    ``before`` may be None to count everything since the server started. A
    process whose counter went down was restarted in between, so its whole
    ``after`` value is counted.
    """

    def spent(old: float | None, new: float) -> float:
        if old is None or new < old:
            return new
        return new - old

    old = before or {}
    old_workers = list(old.get("workers", ()))
    per_worker = [
        spent(old_workers[i] if i < len(old_workers) else None, value)
        for i, value in enumerate(after.get("workers", ()))
    ]
    router = spent(old.get("router"), after.get("router", 0.0))
    matchmaker = spent(old.get("matchmaker"), after.get("matchmaker", 0.0))
    workers = sum(per_worker)
    return {
        "router": router,
        "matchmaker": matchmaker,
        "workers": workers,
        "per_worker": per_worker,
        "total": router + matchmaker + workers,
    }


def build_summary(
    workload: Workload,
    merged: MergedResults,
    verification: Verification,
    *,
    wall_s: float | None,
    server_cpu_s: Mapping[str, Any] | None,
    extra_problems: Sequence[str] = (),
) -> dict[str, Any]:
    """Build the JSON-ready summary of a run.

    ``extra_problems`` are failures the runner saw itself (a timeout, a bot
    process that wrote no result); they come first in ``problems``.
    """
    problems = [*extra_problems, *verification.problems]
    relayed = verification.chats_verified * 2 * workload.messages
    relays_per_s = relayed / wall_s if wall_s else None
    server_total = server_cpu_s["total"] if server_cpu_s else None
    per_relay_us = server_total / relayed * 1e6 if server_total and relayed else None
    return {
        "ok": not problems,
        "workers": workload.workers,
        "students": workload.students,
        "teachers": workload.teachers,
        "per_teacher": workload.per_teacher,
        "messages_per_chat": workload.messages,
        "chats_expected": workload.students,
        "chats_verified": verification.chats_verified,
        "chats_interrupted": verification.chats_interrupted,
        "wall_s": wall_s,
        "frames_sent": merged.frames_sent,
        "frames_received": merged.frames_received,
        "relayed_messages": relayed,
        "relays_per_s": relays_per_s,
        "latency_ms": {
            "p50": percentile(merged.latency_ms, 0.50),
            "p99": percentile(merged.latency_ms, 0.99),
            "samples": len(merged.latency_ms),
        },
        "server_cpu_s": dict(server_cpu_s) if server_cpu_s else None,
        "client_cpu_s": merged.client_cpu_s,
        "server_cpu_us_per_relay": per_relay_us,
        "ws_engine": workload.ws_engine,
        "layout": workload.layout,
        "client_errors": merged.errors[:MAX_LISTED_PROBLEMS],
        "client_error_count": len(merged.errors),
        "problems": problems,
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    """Render a summary from ``build_summary`` as lines of text."""
    latency = summary["latency_ms"]
    workers = _number(summary["workers"], "{:d}")
    engine = summary["ws_engine"] or "default"
    workload = (
        f"{summary['students']} students, {summary['teachers']} teachers x "
        f"{summary['per_teacher']} chats, {summary['messages_per_chat']} messages "
        "per chat"
    )
    verified = f"{summary['chats_verified']}/{summary['chats_expected']}"
    if summary["chats_interrupted"]:
        verified += f"  ({summary['chats_interrupted']} other chats ended early)"
    frames = (
        f"{summary['frames_sent']} sent, {summary['frames_received']} received "
        "by the bots"
    )
    p50 = _number(latency["p50"], "{:.2f} ms")
    p99 = _number(latency["p99"], "{:.2f} ms")
    lines = [
        f"workers            {workers}  (ws engine: {engine})",
        f"client layout      {summary['layout']}",
        f"workload           {workload}",
        f"wall time          {_number(summary['wall_s'], '{:.2f} s')}",
        f"chats verified     {verified}",
        f"frames             {frames}",
        f"relayed messages   {summary['relayed_messages']}",
        f"relays per second  {_number(summary['relays_per_s'], '{:.0f}')}",
        f"latency            p50 {p50}, p99 {p99}",
        f"server CPU         {_describe_cpu(summary['server_cpu_s'])}",
        f"client CPU         {summary['client_cpu_s']:.2f} s",
        "server CPU/relay   "
        + _number(summary["server_cpu_us_per_relay"], "{:.1f} us"),
    ]
    if summary["client_error_count"]:
        lines.append(f"client errors      {summary['client_error_count']}")
        lines.extend(f"  {error}" for error in summary["client_errors"])

    problems = summary["problems"]
    if summary["ok"]:
        lines.append("OK")
        return "\n".join(lines)
    lines.append(f"FAILED: {len(problems)} problems")
    lines.extend(f"  {problem}" for problem in problems[:MAX_LISTED_PROBLEMS])
    if len(problems) > MAX_LISTED_PROBLEMS:
        lines.append(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more")
    return "\n".join(lines)


def _describe_cpu(cpu: Mapping[str, Any] | None) -> str:
    if not cpu:
        return "unknown"
    return (
        f"{cpu['total']:.2f} s (router {cpu['router']:.2f}, "
        f"matchmaker {cpu['matchmaker']:.2f}, workers {cpu['workers']:.2f})"
    )


def _number(value: float | None, template: str) -> str:
    return "n/a" if value is None else template.format(value)
