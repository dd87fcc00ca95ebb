"""Load bots: many teachers or many students driven by one trio loop per process.

Run as ``python -m shardchat.bench.bots --role student --first 0 --count 500
--host 127.0.0.1 --port 4000 --secret-file DIR/secret --result out.json``.
The bots mint their own tokens from the server's secret.

A student joins its presence topic, enters the queue and waits for
``new:chat``. In the chat it replies to every teacher message, and it leaves once
the teacher ends the chat. A teacher keeps up to ``--per-teacher`` chats open,
claiming the next waiting student whenever a chat ends, and plays
``--messages`` rounds of ping-pong in each chat. A teacher process runs until
its standard input reaches end of file, which the runner arranges once every
student has finished.

``--layout`` chooses how a bot spreads its topics over connections. With
``per-chat`` (the default) each bot has a presence socket and opens one more
socket per chat, with the chat token in the URL, so the router places it on the
chat's worker. With ``single-socket`` each bot has one socket, as phoenix.js
clients do: it joins its presence topic and every chat topic there, sending the
chat token in the join payload, and the worker that holds the socket forwards
the frames of chats owned by another worker.

The bots share the machine's cores with the server they measure, so they stay
lean: one task per bot and per open chat, no reader task where one coroutine
can wait for the next frame itself, and a single task that sends heartbeats on
connections that have been quiet for 30 seconds. A shared socket does need a
reader task, which routes each frame to the link of its topic.

At exit, normal or not, the process writes a JSON result file: frame counts,
every chat with the texts this side sent, the latency samples, the errors and
the process CPU time. ``shardchat.bench.report`` merges these files.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import enum
import json
import logging
import os
import signal
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from shardchat import websocket
from shardchat.bench.links import (
    REPLY_TIMEOUT_S,
    AnyLink,
    BotError,
    ChatEnded,
    Link,
    Rejected,
    SharedSocket,
    Tally,
    TopicLink,
    describe_error,
    reply_response,
)
from shardchat.exceptions import ConnectionClosed, ShardchatError
from shardchat.phoenix import (
    CLOSE,
    ERROR,
    REPLY,
    Message,
)
from shardchat.tokens import load_secret, mint, verify

logger = logging.getLogger("shardchat.bench.bots")

COMPLETED_REASON = "teacher_ended"

# phoenix.js sends a heartbeat every 30 s, and the server closes a connection
# idle for 60 s. Checking every 5 s keeps a quiet connection well inside that.
HEARTBEAT_INTERVAL_S = 30.0
HEARTBEAT_CHECK_S = 5.0

CONNECT_TRIES = 3
CONNECT_RETRY_DELAY_S = 0.2

# A teacher whose claim is rejected with "no students waiting" claims again on the next user:status
# that shows a waiting student, or after this long.
CLAIM_RETRY_S = 0.05

# A student goes back to the queue when a chat is cut short, at most this
# often before it gives up.
MAX_CHATS_PER_STUDENT = 10


CONNECT_ERRORS = (OSError, ShardchatError, trio.TooSlowError, trio.BrokenResourceError)


class Layout(enum.Enum):
    """The way a bot spreads its presence and chat topics over websocket connections."""

    PER_CHAT = "per-chat"  # a presence socket plus one socket per chat
    SINGLE_SOCKET = "single-socket"  # every topic of a bot on one socket


@dataclass
class Settings:
    """The server address, secret and workload shared by the bots of a process."""

    host: str
    port: int
    secret: bytes
    per_teacher: int
    messages: int
    connect_timeout: float
    layout: Layout = Layout.PER_CHAT


# A presence or chat link in either layout.


class Bots:
    """The state the bots of one process share."""

    def __init__(self, settings: Settings, tally: Tally, connect_limit: int) -> None:
        self.settings = settings
        self.tally = tally
        # Bounds handshakes in flight so a thousand bots do not all hit the
        # server's listen backlog at once.
        self.connect_limiter = trio.CapacityLimiter(connect_limit)
        # The open websocket connections, for the heartbeat task.
        self.connections: set[Link | SharedSocket] = set()
        # The single-socket layout's sockets by user id.
        self.sockets: dict[str, SharedSocket] = {}

    def open_link(
        self, token: str, chat_id: str | None = None
    ) -> AbstractAsyncContextManager[AnyLink]:
        """Open a presence link with a user token, or a chat link with a chat token.

        In the per-chat layout each link is a socket of its own, and a chat
        socket carries ``chat_id`` in its URL. In the single-socket layout
        the presence link opens the user's socket and a chat link is one
        more topic on it, so the user's presence link must be open.

        Raises:
            BotError: CONNECT_TRIES attempts failed, or a chat link has no
                presence socket to join on.
        """
        if self.settings.layout is Layout.PER_CHAT:
            return self._open_socket(token, chat_id)
        if chat_id is None:
            return self._open_shared_socket(token)
        return self._open_topic(token)

    @contextlib.asynccontextmanager
    async def _open_socket(
        self, token: str, chat_id: str | None
    ) -> AsyncIterator[Link]:
        query = {"vsn": "2.0.0", "token": token}
        if chat_id is not None:
            query["chat"] = chat_id
        resource = "/socket/websocket?" + urllib.parse.urlencode(query)
        async with contextlib.AsyncExitStack() as stack:
            connection = await self._connect(stack, resource)
            link = Link(connection, self.tally)
            self.connections.add(link)
            try:
                yield link
            finally:
                self.connections.discard(link)

    @contextlib.asynccontextmanager
    async def _open_shared_socket(self, token: str) -> AsyncIterator[TopicLink]:
        user_id = verify(self.settings.secret, token).user_id
        query = {"vsn": "2.0.0", "token": token}
        resource = "/socket/websocket?" + urllib.parse.urlencode(query)
        async with contextlib.AsyncExitStack() as stack:
            connection = await self._connect(stack, resource)
            socket = SharedSocket(connection, self.tally)
            # Entered after the connection, so the reader stops before it closes.
            reader = await stack.enter_async_context(trio.open_nursery())
            reader.start_soon(socket.route_frames)
            self.connections.add(socket)
            self.sockets[user_id] = socket
            try:
                yield socket.open_topic({})
            finally:
                del self.sockets[user_id]
                self.connections.discard(socket)
                reader.cancel_scope.cancel()

    @contextlib.asynccontextmanager
    async def _open_topic(self, token: str) -> AsyncIterator[TopicLink]:
        user_id = verify(self.settings.secret, token).user_id
        socket = self.sockets.get(user_id)
        if socket is None:
            raise BotError(
                f"no open socket for user {user_id}: open its presence link first"
            )
        # A join on a shared socket carries the chat token that the URL of a
        # per-chat socket would.
        link = socket.open_topic({"token": token})
        try:
            yield link
        finally:
            link.close()

    async def _connect(self, stack: contextlib.AsyncExitStack, resource: str) -> Any:
        for attempt in range(1, CONNECT_TRIES + 1):
            try:
                async with self.connect_limiter:
                    return await stack.enter_async_context(
                        websocket.connect(
                            self.settings.host,
                            self.settings.port,
                            resource,
                            connect_timeout=self.settings.connect_timeout,
                        )
                    )
            except Exception as exc:
                if not _is_connect_error(exc):
                    raise
                if attempt == CONNECT_TRIES:
                    raise BotError(
                        f"connection failed after {CONNECT_TRIES} tries: "
                        f"{describe_error(exc)}"
                    ) from exc
            await trio.sleep(CONNECT_RETRY_DELAY_S * attempt)
        raise AssertionError("unreachable")


def _is_connect_error(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_connect_error(inner) for inner in exc.exceptions)
    return isinstance(exc, CONNECT_ERRORS)


def _new_chat_record(chat: dict[str, Any]) -> dict[str, Any]:
    return {
        "chat_id": chat["id"],
        "teacher_id": chat["teacher_id"],
        "student_id": chat["student_id"],
        "sent": [],
        "end_reason": None,
    }


async def _expect(link: AnyLink, event: str) -> Any:
    """Read frames until ``event`` arrives and return its payload.

    Replies with status ok and unrelated pushes are skipped.

    Raises:
        ChatEnded: ``chat:terminated`` arrived first.
        Rejected: an error reply arrived.
        BotError: the server closed or crashed the channel.
    """
    while True:
        frame = await link.receive()
        if frame.event == event:
            return frame.payload
        if frame.event == "chat:terminated":
            raise ChatEnded(frame.payload.get("reason"))
        if frame.event == REPLY:
            reply_response(frame, f"frame {frame.ref} on {frame.topic}")
        elif frame.event in (ERROR, CLOSE):
            raise BotError(
                f"server sent {frame.event} on {frame.topic}: {frame.payload}"
            )


class PendingReply:
    """A reply that a task waits for while another task reads the connection."""

    __slots__ = ("arrived", "frame")

    def __init__(self) -> None:
        self.arrived = trio.Event()
        self.frame: Message | None = None


class Teacher:
    """A teacher bot: claims students and plays ping-pong in each chat."""

    def __init__(self, bots: Bots, teacher_id: str) -> None:
        self.bots = bots
        self.teacher_id = teacher_id
        self.slots = trio.Semaphore(bots.settings.per_teacher)
        self.open_chats = 0
        self.served = 0
        self.students_total: int | None = None
        self.student_waiting = trio.Event()
        self.replies: dict[str, PendingReply] = {}
        self.cancel_scope = trio.CancelScope()
        self.claim_errors: collections.Counter[str] = collections.Counter()

    async def run(self) -> None:
        settings = self.bots.settings
        token = mint(settings.secret, self.teacher_id, "teacher")
        async with self.bots.open_link(token) as presence:
            await presence.join("presence:teachers")
            with self.cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read_presence, presence)
                    await self._claim_students(presence, nursery)

    async def _read_presence(self, presence: AnyLink) -> None:
        try:
            while True:
                frame = await presence.receive()
                if frame.event == REPLY:
                    pending = self.replies.pop(frame.ref, None)
                    if pending is not None:
                        pending.frame = frame
                        pending.arrived.set()
                elif frame.event == "user:status":
                    self._update_status(frame.payload)
        except ConnectionClosed as exc:
            self.bots.tally.record_error(self.teacher_id, f"presence socket {exc}")
            self.cancel_scope.cancel()

    def _update_status(self, payload: dict[str, Any]) -> None:
        students = payload.get("students") or {}
        self.students_total = students.get("total")
        if students.get("waiting", 0) > 0:
            self.student_waiting.set()
        self._stop_if_done()

    def _stop_if_done(self) -> None:
        # Once every student has left, a teacher that has taught is done.
        if self.served and not self.open_chats and self.students_total == 0:
            self.cancel_scope.cancel()

    async def _claim(self, presence: AnyLink) -> dict[str, Any]:
        # The reply arrives through _read_presence, which owns the receiving.
        ref = presence.push("presence:teachers", "claim:student", {})
        pending = PendingReply()
        self.replies[ref] = pending
        with trio.move_on_after(REPLY_TIMEOUT_S):
            await pending.arrived.wait()
            return reply_response(pending.frame, "claim:student")
        self.replies.pop(ref, None)
        raise BotError(f"no reply to claim:student within {REPLY_TIMEOUT_S:.0f} s")

    async def _claim_students(self, presence: AnyLink, nursery: trio.Nursery) -> None:
        # Runs until _stop_if_done or the process cancels it.
        while True:
            await self.slots.acquire()
            try:
                response = await self._claim(presence)
            except Rejected as exc:
                self.slots.release()
                await self._wait_after_rejection(exc.reason)
                continue
            chat = response["chat"]
            self.open_chats += 1
            nursery.start_soon(self._run_chat, chat)

    async def _wait_after_rejection(self, reason: str) -> None:
        self.bots.tally.rejected_claims[reason] += 1
        if reason != "no students waiting":
            # "too many chats" can follow a chat end that the server has not
            # processed yet, so it is expected now and then. Each other
            # reason is reported once per teacher.
            self.claim_errors[reason] += 1
            if reason != "too many chats" and self.claim_errors[reason] == 1:
                self.bots.tally.record_error(
                    self.teacher_id, f"claim:student rejected: {reason}"
                )
            await trio.sleep(CLAIM_RETRY_S)
            return
        self.student_waiting = trio.Event()
        with trio.move_on_after(CLAIM_RETRY_S):
            await self.student_waiting.wait()

    async def _run_chat(self, chat: dict[str, Any]) -> None:
        tally = self.bots.tally
        record = _new_chat_record(chat)
        tally.chats.append(record)
        try:
            async with self.bots.open_link(chat["token"], chat["id"]) as link:
                await self._converse(link, chat["id"], record)
        except Exception as exc:
            tally.record_error(
                self.teacher_id, f"chat {chat['id']}: {describe_error(exc)}"
            )
        finally:
            self.open_chats -= 1
            self.served += 1
            self.slots.release()
            self._stop_if_done()

    async def _converse(
        self, link: AnyLink, chat_id: str, record: dict[str, Any]
    ) -> None:
        """Play the chat's rounds, then end it; record the end reason."""
        topic = f"chats:{chat_id}"
        sent = record["sent"]
        try:
            await link.join(topic)
            link.push(topic, "teacher:joined", {})
            await _expect(link, "chat:ready")
            for k in range(1, self.bots.settings.messages + 1):
                text = f"q{k} {chat_id} {time.monotonic_ns()}"
                link.push(topic, "teacher:send", {"message": text})
                sent.append(text)
                await _expect(link, "teacher:receive")
            link.push(topic, "chat:terminate", {})
            payload = await _expect(link, "chat:terminated")
        except ChatEnded as exc:
            record["end_reason"] = exc.reason
        else:
            record["end_reason"] = payload.get("reason")


async def run_student(bots: Bots, student_id: str) -> None:
    """Queue one student and chat until a teacher ends a chat with it."""
    settings = bots.settings
    token = mint(settings.secret, student_id, "student")
    async with bots.open_link(token) as presence:
        topic = f"presence:student:{student_id}"
        await presence.join(topic)
        await presence.request(topic, "student:ready", {})
        for _ in range(MAX_CHATS_PER_STUDENT):
            chat = await _expect(presence, "new:chat")
            reason = await _attend_chat(bots, student_id, chat)
            if reason == COMPLETED_REASON:
                bots.tally.mark_finished(student_id)
                return
            if reason is None:
                return
            # The server puts the student back in the queue after a chat
            # cut short by the teacher's side.
        raise BotError(f"no completed chat after {MAX_CHATS_PER_STUDENT} chats")


async def _attend_chat(bots: Bots, student_id: str, chat: dict[str, Any]) -> str | None:
    """Reply to every teacher message of one chat; return the chat's end reason.

    Returns None when the chat failed on this side before it ended, after
    recording why.
    """
    tally = bots.tally
    record = _new_chat_record(chat)
    tally.chats.append(record)
    chat_id = chat["id"]
    try:
        async with bots.open_link(chat["token"], chat_id) as link:
            await _answer_messages(link, chat_id, record)
    except Exception as exc:
        tally.record_error(student_id, f"chat {chat_id}: {describe_error(exc)}")
    return record["end_reason"]


async def _answer_messages(link: AnyLink, chat_id: str, record: dict[str, Any]) -> None:
    """Reply until the chat ends; record the end reason."""
    topic = f"chats:{chat_id}"
    sent = record["sent"]
    latency = link.tally.latency_ms
    await link.join(topic)
    link.push(topic, "student:joined", {})
    answered = 0
    while True:
        try:
            payload = await _expect(link, "student:receive")
        except ChatEnded as exc:
            record["end_reason"] = exc.reason
            return
        received_ns = time.monotonic_ns()
        answered += 1
        text = f"a{answered} {chat_id}"
        link.push(topic, "student:send", {"message": text})
        sent.append(text)

        # The teacher's text ends with its monotonic clock at send time, which
        # all processes on this machine share.
        sent_ns = int(payload["message"].rpartition(" ")[2])
        latency.append((received_ns - sent_ns) / 1e6)


async def _send_heartbeats(connections: set[Link | SharedSocket]) -> None:
    # Runs until the process cancels it.
    while True:
        await trio.sleep(HEARTBEAT_CHECK_S)
        now = trio.current_time()
        for connection in list(connections):
            if now - connection.last_sent >= HEARTBEAT_INTERVAL_S:
                with contextlib.suppress(ConnectionClosed):
                    connection.send_heartbeat()


async def _cancel_on_sigterm(scope: trio.CancelScope, tally: Tally) -> None:
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _ in signals:
            tally.record_error("process", "stopped by SIGTERM")
            scope.cancel()
            return


def _read_until_eof(fd: int) -> None:
    # Runs until the writer closes its end; the data itself is ignored.
    while os.read(fd, 4096):
        pass


async def _cancel_on_stdin_eof(scope: trio.CancelScope) -> None:
    if sys.stdin is None:
        return
    # A thread, because epoll cannot watch a regular file or /dev/null. It
    # reads the raw descriptor: an abandoned thread blocked inside
    # sys.stdin.buffer would hold its lock and abort interpreter shutdown.
    fd = sys.stdin.fileno()
    await trio.to_thread.run_sync(_read_until_eof, fd, abandon_on_cancel=True)
    scope.cancel()


async def _guard(tally: Tally, bot_id: str, bot: Any, *args: Any) -> None:
    try:
        await bot(*args)
    except Exception as exc:
        tally.record_error(bot_id, describe_error(exc))


async def run_bots(args: argparse.Namespace, tally: Tally, bot_ids: list[str]) -> None:
    """Run every bot of this process to the end."""
    settings = Settings(
        host=args.host,
        port=args.port,
        secret=load_secret(Path(args.secret_file)),
        per_teacher=args.per_teacher,
        messages=args.messages,
        connect_timeout=args.connect_timeout,
        layout=Layout(args.layout),
    )
    bots = Bots(settings, tally, args.connect_limit)
    async with trio.open_nursery() as process:
        process.start_soon(_send_heartbeats, bots.connections)
        process.start_soon(_cancel_on_sigterm, process.cancel_scope, tally)
        if args.role == "teacher":
            process.start_soon(_cancel_on_stdin_eof, process.cancel_scope)
        async with trio.open_nursery() as nursery:
            for bot_id in bot_ids:
                if args.role == "teacher":
                    nursery.start_soon(_guard, tally, bot_id, Teacher(bots, bot_id).run)
                else:
                    nursery.start_soon(_guard, tally, bot_id, run_student, bots, bot_id)
        process.cancel_scope.cancel()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m shardchat.bench.bots",
        description=(
            "Run teacher or student load bots against a shardchat server. A "
            "teacher process exits when its standard input reaches end of file."
        ),
    )
    parser.add_argument("--role", choices=("teacher", "student"), required=True)
    parser.add_argument("--first", type=int, default=0, help="index of the first bot")
    parser.add_argument("--count", type=int, required=True, help="number of bots")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--secret-file", required=True, help="file with the server secret, hex"
    )
    parser.add_argument("--per-teacher", type=int, default=5, help="chats per teacher")
    parser.add_argument(
        "--messages", type=int, default=50, help="messages each side sends per chat"
    )
    parser.add_argument("--result", required=True, help="result JSON file to write")
    parser.add_argument(
        "--layout",
        choices=[layout.value for layout in Layout],
        default=Layout.PER_CHAT.value,
        help="per-chat: a presence socket plus one socket per chat; single-socket: "
        "one socket per bot for every topic (default: per-chat)",
    )
    parser.add_argument(
        "--connect-limit",
        type=int,
        default=64,
        help="maximum handshakes in flight (default: 64)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        help="seconds allowed for one connection attempt (default: 10)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the bots named on the command line and write their result file."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING,
        format=f"%(asctime)s bots[{os.getpid()}] %(levelname)s %(message)s",
    )
    prefix = "t" if args.role == "teacher" else "s"
    bot_ids = [f"{prefix}{i}" for i in range(args.first, args.first + args.count)]
    tally = Tally(role=args.role, started_at=time.time())
    if args.role == "student":
        tally.unfinished.update(bot_ids)

    status = 0
    try:
        trio.run(run_bots, args, tally, bot_ids)
    except KeyboardInterrupt:
        tally.record_error("process", "interrupted")
        status = 130
    except BaseException as exc:
        logger.exception("bot process crashed")
        tally.record_error("process", f"crashed: {describe_error(exc)}")
        status = 1
    finally:
        _write_result(Path(args.result), tally)
    return status


def _write_result(path: Path, tally: Tally) -> None:
    # Write then rename, so the runner never reads half a file.
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(tally.to_json()))
    partial.replace(path)


if __name__ == "__main__":
    sys.exit(main())
