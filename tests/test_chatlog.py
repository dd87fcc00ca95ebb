import sqlite3

from shardchat import chatlog
from shardchat.chatlog import ChatLog


async def test_chatlog_round_trip(tmp_path):
    log = ChatLog(tmp_path, 0)
    key = log.open_chat("c1", "t1", "s1", 100.0)
    log.start_chat(key, 101.0)
    log.message(key, 1, "teacher", "q1", 102.0)
    log.message(key, 2, "student", "a1", 103.0)
    log.end_chat(key, 104.0, "teacher_ended", 2)
    await log.flush()
    log.close()
    chat = chatlog.read_chat(tmp_path, 1, "c1")
    assert chat["chat"]["teacher_id"] == "t1"
    assert chat["chat"]["started_at"] == 101.0
    assert chat["chat"]["end_reason"] == "teacher_ended"
    assert chat["chat"]["message_count"] == 2
    assert [row["body"] for row in chat["messages"]] == ["q1", "a1"]
    assert [row["sender"] for row in chat["messages"]] == ["teacher", "student"]


async def test_chatlog_messages_ordered_by_seq(tmp_path):
    log = ChatLog(tmp_path, 0)
    first = log.open_chat("c1", "t1", "s1", 1.0)
    second = log.open_chat("c2", "t1", "s2", 1.0)
    for seq in (1, 2, 3):
        log.message(second, seq, "teacher", f"second {seq}", 2.0)
        log.message(first, seq, "teacher", f"first {seq}", 2.0)
    await log.flush()
    log.close()
    chat = chatlog.read_chat(tmp_path, None, "c1")
    assert [row["seq"] for row in chat["messages"]] == [1, 2, 3]
    assert chat["messages"][0]["body"] == "first 1"


async def test_chatlog_keys_continue_after_reopen(tmp_path):
    log = ChatLog(tmp_path, 3)
    assert log.open_chat("c1", "t", "s", 1.0) == 1
    await log.flush()
    log.close()
    reopened = ChatLog(tmp_path, 3)
    assert reopened.open_chat("c2", "t", "s", 1.0) == 2
    await reopened.flush()
    reopened.close()
    assert chatlog.read_chat(tmp_path, 4, "c2")["chat"]["worker"] == 3


def test_chatlog_unknown_chat(tmp_path):
    chatlog.connect(chatlog.log_path(tmp_path, 0)).close()
    assert chatlog.read_chat(tmp_path, 1, "nope") is None


def test_chatlog_uses_wal(tmp_path):
    chatlog.connect(chatlog.log_path(tmp_path, 0)).close()
    connection = sqlite3.connect(chatlog.log_path(tmp_path, 0))
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    connection.close()
