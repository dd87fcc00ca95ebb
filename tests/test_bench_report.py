"""Unit tests for shardchat.bench.report: merging, log checks, percentiles, summary."""

from __future__ import annotations

import json

import pytest

from shardchat.bench import report
from shardchat.bench.report import ChatRecord, MergedResults, Workload

MESSAGES = 3


def teacher_texts(chat_id: str, count: int = MESSAGES) -> list[str]:
    return [f"q{k} {chat_id} {1000 + k}" for k in range(1, count + 1)]


def student_texts(chat_id: str, count: int = MESSAGES) -> list[str]:
    return [f"a{k} {chat_id}" for k in range(1, count + 1)]


def make_record(
    chat_id: str = "c1",
    student_id: str = "s0",
    teacher_end: str | None = "teacher_ended",
    student_end: str | None = "teacher_ended",
) -> ChatRecord:
    return ChatRecord(
        chat_id=chat_id,
        teacher_id="t0",
        student_id=student_id,
        teacher_sent=tuple(teacher_texts(chat_id)),
        student_sent=tuple(student_texts(chat_id)),
        teacher_end=teacher_end,
        student_end=student_end,
    )


def make_log(
    record: ChatRecord, end_reason: str | None = "teacher_ended"
) -> dict[str, object]:
    rows = []
    for question, answer in zip(record.teacher_sent, record.student_sent, strict=True):
        rows.append({"sender": "teacher", "body": question})
        rows.append({"sender": "student", "body": answer})
    for seq, row in enumerate(rows, start=1):
        row["seq"] = seq
        row["sent_at"] = 1_700_000_000_000 + seq
    return {
        "chat": {
            "id": record.chat_id,
            "teacher_id": record.teacher_id,
            "student_id": record.student_id,
            "ended_at": 1_700_000_000_999,
            "end_reason": end_reason,
            "message_count": len(rows),
        },
        "messages": rows,
    }


def workload(students: int = 1) -> Workload:
    return Workload(
        students=students,
        teachers=1,
        per_teacher=5,
        messages=MESSAGES,
        workers=2,
        ws_engine="wsproto",
    )


def merged_with(*records: ChatRecord) -> MergedResults:
    return MergedResults(chats={record.chat_id: record for record in records})


def bot_result(role: str, chats: list[dict[str, object]], **fields: object) -> dict:
    result = {
        "role": role,
        "frames_sent": 10,
        "frames_received": 12,
        "chats": chats,
        "latency_ms": [],
        "errors": [],
        "unfinished": [],
        "started_at": 100.0,
        "finished_at": 110.0,
        "cpu_s": 1.5,
    }
    result.update(fields)
    return result


# verify_chat


def test_verify_chat_correct():
    record = make_record()
    assert report.verify_chat(record, make_log(record), MESSAGES) == []


def test_verify_chat_sender_as_user_id():
    record = make_record()
    log = make_log(record)
    for row in log["messages"]:
        row["sender"] = "t0" if row["sender"] == "teacher" else "s0"
    assert report.verify_chat(record, log, MESSAGES) == []


def test_verify_chat_missing_log():
    record = make_record()
    assert report.verify_chat(record, None, MESSAGES) == ["chat c1: log not found"]


def test_verify_chat_short():
    record = make_record()
    log = make_log(record)
    del log["messages"][-1]
    assert report.verify_chat(record, log, MESSAGES) == [
        "chat c1: log has 5 messages, expected 6"
    ]


def test_verify_chat_reordered():
    record = make_record()
    log = make_log(record)
    rows = log["messages"]
    rows[2], rows[3] = rows[3], rows[2]
    assert report.verify_chat(record, log, MESSAGES) == ["chat c1: row 3 has seq 4"]


def test_verify_chat_reordered_bodies():
    record = make_record()
    log = make_log(record)
    rows = log["messages"]
    rows[0]["body"], rows[2]["body"] = rows[2]["body"], rows[0]["body"]
    assert report.verify_chat(record, log, MESSAGES) == [
        "chat c1: message 1 is 'q2 c1 1002', the teacher bot sent 'q1 c1 1001'"
    ]


def test_verify_chat_wrong_sender():
    record = make_record()
    log = make_log(record)
    log["messages"][1]["sender"] = "teacher"
    assert report.verify_chat(record, log, MESSAGES) == [
        "chat c1: message 2 sent by 'teacher', expected the student"
    ]


def test_verify_chat_body_mismatch():
    record = make_record()
    log = make_log(record)
    log["messages"][3]["body"] = "a2 c9"
    assert report.verify_chat(record, log, MESSAGES) == [
        "chat c1: message 4 is 'a2 c9', the student bot sent 'a2 c1'"
    ]


def test_verify_chat_wrong_end_reason():
    record = make_record()
    log = make_log(record, end_reason="student_left")
    assert report.verify_chat(record, log, MESSAGES) == [
        "chat c1: end reason 'student_left', expected 'teacher_ended'"
    ]


def test_verify_chat_bot_sent_too_few():
    record = make_record()
    record = ChatRecord(**{**record.__dict__, "teacher_sent": record.teacher_sent[:2]})
    log = make_log(make_record())
    assert report.verify_chat(record, log, MESSAGES) == [
        "chat c1: teacher bot sent 2 messages, expected 3"
    ]


def test_verify_chat_missing_student_report():
    record = ChatRecord(**{**make_record().__dict__, "student_sent": None})
    log = make_log(make_record())
    assert report.verify_chat(record, log, MESSAGES) == [
        "chat c1: no report from its student bot"
    ]


def test_verify_chat_wrong_participant():
    record = make_record()
    log = make_log(record)
    log["chat"]["student_id"] = "s7"
    assert report.verify_chat(record, log, MESSAGES) == [
        "chat c1: log names student 's7', expected 's0'"
    ]


def test_verify_chat_interrupted_accepted():
    record = make_record(teacher_end="student_left", student_end=None)
    log = make_log(record, end_reason="student_left")
    del log["messages"][2:]
    assert report.verify_chat(record, log, MESSAGES) == []


def test_verify_chat_interrupted_but_log_completed():
    record = make_record(teacher_end="teacher_left", student_end="teacher_left")
    log = make_log(record)
    assert report.verify_chat(record, log, MESSAGES) == [
        "chat c1: log ends with teacher_ended, but the bots saw teacher_left"
    ]


# is_log_settled


def test_is_log_settled_complete():
    record = make_record()
    assert report.is_log_settled(record, make_log(record), MESSAGES)


def test_is_log_settled_not_ended():
    record = make_record()
    assert not report.is_log_settled(record, make_log(record, None), MESSAGES)


def test_is_log_settled_rows_missing():
    record = make_record()
    log = make_log(record)
    del log["messages"][-1]
    assert not report.is_log_settled(record, log, MESSAGES)


def test_is_log_settled_not_found():
    assert not report.is_log_settled(make_record(), None, MESSAGES)


# verify_run


def test_verify_run_all_verified():
    first = make_record("c1", "s0")
    second = make_record("c2", "s1")
    logs = {"c1": make_log(first), "c2": make_log(second)}
    verification = report.verify_run(merged_with(first, second), logs, workload(2))
    assert verification == report.Verification(2, 0, [])


def test_verify_run_missing_chat():
    first = make_record("c1", "s0")
    merged = MergedResults(chats={"c1": first}, unfinished=["s1"])
    verification = report.verify_run(merged, {"c1": make_log(first)}, workload(2))
    assert verification.chats_verified == 1
    assert verification.problems == [
        "1 of 2 students completed a chat; unfinished bots: s1"
    ]


def test_verify_run_chat_without_log():
    first = make_record("c1", "s0")
    verification = report.verify_run(merged_with(first), {}, workload(1))
    assert verification.chats_verified == 0
    assert verification.problems == ["chat c1: log not found"]


def test_verify_run_student_completed_twice():
    first = make_record("c1", "s0")
    second = make_record("c2", "s0")
    logs = {"c1": make_log(first), "c2": make_log(second)}
    verification = report.verify_run(merged_with(first, second), logs, workload(2))
    assert verification.problems == [
        "student s0: completed 2 chats (c1, c2), expected 1",
        "1 of 2 students completed a chat; 1 missing",
    ]


def test_verify_run_interrupted_then_completed():
    cut = make_record(
        "c1", "s0", teacher_end="teacher_left", student_end="teacher_left"
    )
    cut_log = make_log(cut, end_reason="teacher_left")
    done = make_record("c2", "s0")
    logs = {"c1": cut_log, "c2": make_log(done)}
    verification = report.verify_run(merged_with(cut, done), logs, workload(1))
    assert verification == report.Verification(1, 1, [])


# merge_results


def test_merge_results_joins_both_sides():
    chat = {"chat_id": "c1", "teacher_id": "t0", "student_id": "s0"}
    teacher = bot_result(
        "teacher",
        [{**chat, "sent": teacher_texts("c1"), "end_reason": "teacher_ended"}],
    )
    student = bot_result(
        "student",
        [{**chat, "sent": student_texts("c1"), "end_reason": "teacher_ended"}],
        latency_ms=[1.0, 2.0],
        finished_at=120.0,
    )
    merged = report.merge_results([teacher, student])
    assert merged.chats == {"c1": make_record()}
    assert merged.frames_sent == 20
    assert merged.frames_received == 24
    assert merged.latency_ms == [1.0, 2.0]
    assert merged.client_cpu_s == 3.0
    assert merged.started_at == 100.0
    assert merged.students_finished_at == 120.0
    assert merged.problems == []


def test_merge_results_participant_conflict():
    teacher = bot_result(
        "teacher",
        [{"chat_id": "c1", "teacher_id": "t0", "student_id": "s0", "sent": []}],
    )
    student = bot_result(
        "student",
        [{"chat_id": "c1", "teacher_id": "t1", "student_id": "s0", "sent": []}],
    )
    merged = report.merge_results([teacher, student])
    expected = (
        "chat c1: reported with teacher t1 and student s0, "
        "but also with teacher t0 and student s0"
    )
    assert merged.problems == [expected]


def test_merge_results_reported_twice():
    chat = {"chat_id": "c1", "teacher_id": "t0", "student_id": "s0", "sent": []}
    merged = report.merge_results([bot_result("student", [chat, chat])])
    assert merged.problems == ["chat c1: reported twice by the student bots"]


def test_merge_results_unfinished_sorted_by_number():
    results = [
        bot_result("student", [], unfinished=["s10", "s2"]),
        bot_result("student", [], unfinished=["s1"]),
    ]
    assert report.merge_results(results).unfinished == ["s1", "s2", "s10"]


# percentile


def test_percentile_median_odd():
    assert report.percentile([5.0, 1.0, 3.0], 0.5) == 3.0


def test_percentile_median_even():
    assert report.percentile([4.0, 1.0, 2.0, 3.0], 0.5) == 2.5


def test_percentile_p99_interpolates():
    samples = [float(value) for value in range(1, 101)]
    assert report.percentile(samples, 0.99) == pytest.approx(99.01)


def test_percentile_extremes():
    samples = [7.0, 2.0, 9.0]
    assert report.percentile(samples, 0.0) == 2.0
    assert report.percentile(samples, 1.0) == 9.0


def test_percentile_single_sample():
    assert report.percentile([4.5], 0.99) == 4.5


def test_percentile_empty():
    assert report.percentile([], 0.5) is None


def test_percentile_invalid_fraction():
    with pytest.raises(ValueError, match=r"^invalid fraction 1\.5: expected 0 to 1$"):
        report.percentile([1.0], 1.5)


# cpu_usage


def test_cpu_usage_difference():
    before = {"router": 1.0, "matchmaker": 0.5, "workers": [2.0, 3.0], "total": 6.5}
    after = {"router": 1.5, "matchmaker": 1.0, "workers": [4.0, 6.0], "total": 12.5}
    usage = report.cpu_usage(before, after)
    assert usage == {
        "router": 0.5,
        "matchmaker": 0.5,
        "workers": 5.0,
        "per_worker": [2.0, 3.0],
        "total": 6.0,
    }


def test_cpu_usage_restarted_worker():
    before = {"router": 1.0, "matchmaker": 0.5, "workers": [2.0, 3.0]}
    after = {"router": 1.0, "matchmaker": 0.5, "workers": [1.0, 3.5]}
    assert report.cpu_usage(before, after)["per_worker"] == [1.0, 0.5]


# build_summary and format_summary

SUMMARY_KEYS = {
    "ok",
    "workers",
    "students",
    "teachers",
    "per_teacher",
    "messages_per_chat",
    "chats_expected",
    "chats_verified",
    "chats_interrupted",
    "wall_s",
    "frames_sent",
    "frames_received",
    "relayed_messages",
    "relays_per_s",
    "latency_ms",
    "server_cpu_s",
    "client_cpu_s",
    "server_cpu_us_per_relay",
    "ws_engine",
    "layout",
    "client_errors",
    "client_error_count",
    "problems",
}
CPU = {
    "router": 0.5,
    "matchmaker": 0.25,
    "workers": 1.25,
    "per_worker": [1.25],
    "total": 2.0,
}


def passing_summary() -> dict:
    record = make_record()
    merged = MergedResults(
        frames_sent=40,
        frames_received=44,
        chats={"c1": record},
        latency_ms=[1.0, 2.0, 3.0],
        client_cpu_s=0.75,
    )
    verification = report.verify_run(merged, {"c1": make_log(record)}, workload(1))
    return report.build_summary(
        workload(1), merged, verification, wall_s=2.0, server_cpu_s=CPU
    )


def test_build_summary_key_set():
    assert set(passing_summary()) == SUMMARY_KEYS


def test_build_summary_nested_keys():
    summary = passing_summary()
    assert set(summary["latency_ms"]) == {"p50", "p99", "samples"}
    assert {"router", "matchmaker", "workers", "total"} <= set(summary["server_cpu_s"])


def test_build_summary_values():
    summary = passing_summary()
    assert summary["ok"] is True
    assert summary["chats_verified"] == 1
    assert summary["relayed_messages"] == 6
    assert summary["relays_per_s"] == 3.0
    assert summary["latency_ms"]["p50"] == 2.0
    assert summary["server_cpu_us_per_relay"] == pytest.approx(2.0 / 6 * 1e6)


def test_build_summary_serializable():
    summary = passing_summary()
    assert json.loads(json.dumps(summary)) == summary


def test_build_summary_extra_problems_fail():
    merged = merged_with(make_record())
    verification = report.Verification(1, 0, [])
    summary = report.build_summary(
        workload(1),
        merged,
        verification,
        wall_s=None,
        server_cpu_s=None,
        extra_problems=["timed out after 5 s"],
    )
    assert summary["ok"] is False
    assert summary["problems"] == ["timed out after 5 s"]
    assert summary["relays_per_s"] is None


def test_format_summary_ok():
    text = report.format_summary(passing_summary())
    assert text.splitlines()[-1] == "OK"
    assert "relays per second  3" in text


def test_format_summary_failed_lists_first_problems():
    summary = passing_summary()
    summary["ok"] = False
    summary["problems"] = [f"chat c{i}: log not found" for i in range(12)]
    lines = report.format_summary(summary).splitlines()
    assert lines[-12] == "FAILED: 12 problems"
    assert lines[-11] == "  chat c0: log not found"
    assert lines[-1] == "  ... and 2 more"
