"""Tests for the bench's connection layouts: per-chat sockets and one shared socket."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from shardchat import tokens
from shardchat.bench import bots, runner
from shardchat.bench.bots import BotError, Bots, ChatEnded, Layout, Settings, Tally

BENCH_TIMEOUT_S = 180
TEST_DEADLINE_S = 30


def run_bench(layout: str, summary_path: Path) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable, "-m", "shardchat", "bench",
        "--students", "30",
        "--teachers", "3",
        "--messages", "5",
        "--workers", "2",
        "--layout", layout,
        "--json", str(summary_path),
        "--quiet",
    ]  # fmt: skip
    return subprocess.run(
        command, check=False, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S
    )


@pytest.mark.parametrize("layout", ["per-chat", "single-socket"])
def test_bench_layout_verifies_every_chat(tmp_path, layout):
    summary_path = tmp_path / "summary.json"
    completed = run_bench(layout, summary_path)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    summary = json.loads(summary_path.read_text())
    assert summary["ok"] is True, summary["problems"]
    assert summary["chats_verified"] == 30
    assert summary["layout"] == layout
    assert f"client layout      {layout}" in completed.stdout


def test_bench_layout_default_per_chat():
    parser = argparse.ArgumentParser()
    runner.add_arguments(parser)
    assert parser.parse_args([]).layout == "per-chat"


def test_bots_layout_default_per_chat():
    args = bots.build_parser().parse_args(
        ["--role", "student", "--count", "1", "--port", "1"]
        + ["--secret-file", "secret", "--result", "out.json"]
    )
    assert args.layout == "per-chat"


def make_bots(host: str, port: int, secret: bytes) -> Bots:
    settings = Settings(
        host=host,
        port=port,
        secret=secret,
        per_teacher=5,
        messages=1,
        connect_timeout=10.0,
        layout=Layout.SINGLE_SOCKET,
    )
    return Bots(settings, Tally(role="teacher", started_at=time.time()), 4)


async def test_shared_socket_chat_without_presence():
    secret = b"k" * 32
    shared = make_bots("127.0.0.1", 1, secret)
    token = tokens.mint(secret, "s9", "student", chat=("c1", "t1", "s9"))
    with pytest.raises(
        BotError, match=r"^no open socket for user s9: open its presence link first$"
    ):
        async with shared.open_link(token, "c1"):
            pass


async def test_shared_socket_chat_topics(server_factory):
    server = server_factory(workers=2)
    shared = make_bots(server.host, server.port, server.secret)
    with trio.fail_after(TEST_DEADLINE_S):
        async with (
            shared.open_link(server.token("t1", "teacher")) as teacher,
            shared.open_link(server.token("s1", "student")) as student,
        ):
            await teacher.join("presence:teachers")
            student_topic = "presence:student:s1"
            await student.join(student_topic)
            await student.request(student_topic, "student:ready", {})
            response = await teacher.request("presence:teachers", "claim:student", {})
            chat = response["chat"]
            student_chat = await bots._expect(student, "new:chat")

            topic = f"chats:{chat['id']}"
            async with shared.open_link(student_chat["token"], chat["id"]) as answers:
                await answers.join(topic)
                async with shared.open_link(chat["token"], chat["id"]) as questions:
                    await questions.join(topic)
                    await bots._expect(questions, "chat:ready")
                    # One socket per bot carries both its topics.
                    assert len(shared.connections) == 2
                    assert questions.socket is teacher.socket
                    assert questions.join_ref != teacher.join_ref

                # Closing the teacher's chat link mid-chat leaves the channel,
                # which ends the chat as closing a per-chat socket would.
                with pytest.raises(ChatEnded) as ended:
                    await bots._expect(answers, "student:receive")
                assert ended.value.reason == "teacher_left"
