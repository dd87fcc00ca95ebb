"""Measure what a bare trio server spends relaying one chat message.

The tutoring workload relays every chat message through a websocket, the Phoenix
codec and JSON. This benchmark relays the same pattern over plain trio sockets
instead: teachers and students paired into chats, a fixed number of chats in
progress at once, ping-pong rounds of small messages. Frames are a 4-byte
big-endian length and the payload. The relay server runs one task per connection,
which reads frames, looks up the partner connection and writes each frame to it
with one send.

The server CPU per relayed message it reports is a floor for shardchat on the
same machine: the cost of the receive, the send and trio's scheduling, with none
of shardchat's work on top. The server CPU is read from /proc from just before
the first client starts until the last client has exited.

    python benchmarks/floor.py --pairs 1000 --messages 50 --json floor.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import resource
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

from shardchat.process import cpu_seconds

HOST = "127.0.0.1"
LENGTH_BYTES = 4
RECEIVE_SIZE = 65536
LISTEN_BACKLOG = 4096
# Connects in progress at once in each client process, so that a large --pairs
# does not overflow the listen backlog.
CONNECT_CONCURRENCY = 200
# File descriptors kept free for the interpreter, pipes and the listener.
RESERVED_FDS = 64
SERVER_START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
LISTENING = re.compile(r"^floor listening on port (\d+)$")
READY = b""
ERRORS_REPORTED = 5


class FloorError(Exception):
    """A relay or client process failed, or a count came out wrong."""


@dataclasses.dataclass(frozen=True)
class ClientResult:
    """The result line a client process prints on stdout when it exits."""

    role: str
    chats: int
    messages_received: int
    cpu_s: float
    round_trip_ms: list[float]
    errors: list[str]
    error_count: int


def parse_cpu_list(text: str) -> set[int]:
    """Parse a CPU list such as "0-3" or "4,5" (as taskset -c takes it).

    Raises:
        ValueError: the list is empty or malformed.
    """
    cpus: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"invalid CPU list {text!r}: expected e.g. '0-3' or '4,5'")
        low = int(first)
        high = int(last) if dash else low
        if high < low:
            raise ValueError(f"invalid CPU list {text!r}: range {part} is reversed")
        cpus.update(range(low, high + 1))
    return cpus


def check_cpu_list(
    parser: argparse.ArgumentParser, option: str, text: str | None
) -> set[int] | None:
    """Parse a CPU list option and check its CPUs are usable; exit with the error if not."""
    if text is None:
        return None
    usable = os.sched_getaffinity(0)
    try:
        cpus = parse_cpu_list(text)
    except ValueError as exc:
        parser.error(str(exc))
    if not cpus <= usable:
        parser.error(
            f"invalid {option} {text}: CPUs {sorted(cpus - usable)} are not "
            f"usable here, usable: {sorted(usable)}"
        )
    return cpus


def raise_fd_limit(needed: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards needed; return the new limit.

    Children inherit the raised limit. The hard limit caps it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def encode_frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(LENGTH_BYTES, "big") + payload


class FrameReader:
    """Splits a socket's byte stream into length-prefixed payloads."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock
        self._buffer = bytearray()

    async def read_frame(self) -> bytes | None:
        """Return the next whole frame, prefix included, or None at end of stream."""
        while True:
            buffer = self._buffer
            if len(buffer) >= LENGTH_BYTES:
                end = LENGTH_BYTES + int.from_bytes(buffer[:LENGTH_BYTES], "big")
                if len(buffer) >= end:
                    frame = bytes(buffer[:end])
                    del buffer[:end]
                    return frame
            data = await self._sock.recv(RECEIVE_SIZE)
            if not data:
                return None
            buffer += data

    async def read_payload(self) -> bytes:
        """Return the next frame's payload.

        Raises:
            FloorError: the stream ended.
        """
        frame = await self.read_frame()
        if frame is None:
            raise FloorError("connection closed by the relay server")
        return frame[LENGTH_BYTES:]


async def send_frame(sock: trio.socket.SocketType, frame: bytes) -> None:
    """Write a whole frame, which takes one send() unless the socket buffer is full."""
    view = memoryview(frame)
    while view:
        sent = await sock.send(view)
        view = view[sent:]


# The relay server.


class Chat:
    """The connections of one chat: the first to register, then its partner."""

    def __init__(self, first: trio.socket.SocketType) -> None:
        self.connections = [first]

    def partner_of(self, sock: trio.socket.SocketType) -> trio.socket.SocketType | None:
        """Return the other connection, or None while only one has registered."""
        if len(self.connections) != 2:
            return None
        first, second = self.connections
        return second if sock is first else first


async def relay_connection(
    sock: trio.socket.SocketType, chats: dict[bytes, Chat]
) -> None:
    """Register a connection in its chat, then relay its frames to the partner.

    When either connection ends, the chat ends: both sockets are closed, which
    also wakes the partner's task from its receive.
    """
    reader = FrameReader(sock)
    chat_id = b""
    chat: Chat | None = None
    try:
        registration = await reader.read_frame()
        if registration is None:
            return
        chat_id = registration[LENGTH_BYTES:]
        chat = chats.pop(chat_id, None)
        if chat is None:
            chat = chats[chat_id] = Chat(sock)
        else:
            chat.connections.append(sock)
            # This connection first: the partner may start sending as soon as
            # it reads READY, and its frames are written to this socket.
            await send_frame(sock, encode_frame(READY))
            await send_frame(chat.connections[0], encode_frame(READY))

        while True:
            frame = await reader.read_frame()
            partner = chat.partner_of(sock)
            if frame is None or partner is None:
                return
            await send_frame(partner, frame)
    except (OSError, trio.ClosedResourceError):
        return
    finally:
        if chat is not None:
            if chats.get(chat_id) is chat:
                del chats[chat_id]
            for connection in chat.connections:
                connection.close()
            chat.connections.clear()
        sock.close()


async def serve_relay(cpus: set[int] | None) -> None:
    """Accept connections until the process is stopped; print the port first."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    listener = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    await listener.bind((HOST, 0))
    listener.listen(LISTEN_BACKLOG)
    print(f"floor listening on port {listener.getsockname()[1]}", flush=True)

    chats: dict[bytes, Chat] = {}
    async with trio.open_nursery() as nursery:
        while True:
            sock, _ = await listener.accept()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            nursery.start_soon(relay_connection, sock, chats)


# The clients.


def message_text(kind: str, chat: int, round_number: int, size: int) -> bytes:
    return f"{kind}{round_number} chat {chat}".encode().ljust(size, b".")


@contextmanager
def client_socket() -> Iterator[trio.socket.SocketType]:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        yield sock
    finally:
        sock.close()


async def open_chat(
    sock: trio.socket.SocketType, port: int, chat: int, connecting: trio.Semaphore
) -> FrameReader:
    """Connect, register in the chat and wait until the partner is there."""
    async with connecting:
        await sock.connect((HOST, port))
    await send_frame(sock, encode_frame(str(chat).encode()))
    reader = FrameReader(sock)
    if await reader.read_payload() != READY:
        raise FloorError(f"chat {chat}: expected the ready frame first")
    return reader


class Side:
    """One side of every chat, run in one client process.

    A failed chat is recorded in errors and does not stop the other chats.
    """

    def __init__(self, settings: argparse.Namespace) -> None:
        self.settings = settings
        self.received = 0
        self.errors: list[str] = []
        self.round_trip_ms: list[float] = []
        self.connecting = trio.Semaphore(CONNECT_CONCURRENCY)

    async def run_chat(self, chat: int) -> None:
        try:
            with client_socket() as sock:
                reader = await open_chat(
                    sock, self.settings.port, chat, self.connecting
                )
                await self.converse(sock, reader, chat)
        except (FloorError, OSError) as exc:
            self.errors.append(f"chat {chat}: {exc}")

    async def converse(
        self, sock: trio.socket.SocketType, reader: FrameReader, chat: int
    ) -> None:
        raise NotImplementedError


class Teachers(Side):
    """The teacher side: a bounded number of chats at a time, sending first."""

    async def run(self) -> None:
        limiter = trio.CapacityLimiter(self.settings.concurrent)
        async with trio.open_nursery() as nursery:
            for chat in range(self.settings.pairs):
                await limiter.acquire_on_behalf_of(chat)
                nursery.start_soon(self._teach, chat, limiter)

    async def _teach(self, chat: int, limiter: trio.CapacityLimiter) -> None:
        try:
            await self.run_chat(chat)
        finally:
            limiter.release_on_behalf_of(chat)

    async def converse(
        self, sock: trio.socket.SocketType, reader: FrameReader, chat: int
    ) -> None:
        size = self.settings.message_bytes
        for round_number in range(1, self.settings.messages + 1):
            text = message_text("q", chat, round_number, size)
            started = time.perf_counter()
            await send_frame(sock, encode_frame(text))
            reply = await reader.read_payload()
            self.round_trip_ms.append((time.perf_counter() - started) * 1e3)
            if reply != message_text("a", chat, round_number, size):
                raise FloorError(f"unexpected reply {reply[:40]!r}")
            self.received += 1


class Students(Side):
    """The student side: every student connected at once, replying to each message."""

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for chat in range(self.settings.pairs):
                nursery.start_soon(self.run_chat, chat)

    async def converse(
        self, sock: trio.socket.SocketType, reader: FrameReader, chat: int
    ) -> None:
        size = self.settings.message_bytes
        for round_number in range(1, self.settings.messages + 1):
            await reader.read_payload()
            self.received += 1
            text = message_text("a", chat, round_number, size)
            await send_frame(sock, encode_frame(text))


async def run_client(settings: argparse.Namespace) -> ClientResult:
    """Run one side of every chat within the time limit and return the counts.

    Raises:
        trio.TooSlowError: the chats did not finish within settings.timeout.
    """
    if settings.cpus:
        os.sched_setaffinity(0, parse_cpu_list(settings.cpus))
    side = Teachers(settings) if settings.role == "teachers" else Students(settings)
    with trio.fail_after(settings.timeout):
        await side.run()
    return ClientResult(
        role=settings.role,
        chats=settings.pairs,
        messages_received=side.received,
        cpu_s=time.process_time(),
        round_trip_ms=side.round_trip_ms,
        errors=side.errors[:ERRORS_REPORTED],
        error_count=len(side.errors),
    )


# The coordinating process.


def child_argv(role: str, args: argparse.Namespace, cpus: str | None) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--role", role]
    argv += ["--pairs", str(args.pairs), "--messages", str(args.messages)]
    argv += ["--concurrent", str(args.concurrent)]
    argv += ["--message-bytes", str(args.message_bytes)]
    argv += ["--timeout", str(args.timeout)]
    if args.port is not None:
        argv += ["--port", str(args.port)]
    if cpus:
        argv += ["--cpus", cpus]
    return argv


def stop_process(process: subprocess.Popen[Any]) -> None:
    """Stop a child by its PID: SIGTERM, then SIGKILL if it does not exit."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT_S)


def wait_for_port(server: subprocess.Popen[bytes]) -> int:
    """Return the port the relay server prints once it listens.

    Raises:
        FloorError: the server exited or printed nothing in time.
    """
    assert server.stdout is not None
    fd = server.stdout.fileno()
    output = b""
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while b"\n" not in output:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FloorError(
                f"relay server did not listen within {SERVER_START_TIMEOUT_S} s"
            )
        readable, _, _ = select.select([fd], [], [], remaining)
        if not readable:
            continue
        data = os.read(fd, 4096)
        if not data:
            raise FloorError(f"relay server exited with status {server.wait()}")
        output += data
    line = output.partition(b"\n")[0].decode()
    match = LISTENING.match(line)
    if match is None:
        raise FloorError(f"unexpected first line from the relay server: {line!r}")
    return int(match[1])


def collect_client(process: subprocess.Popen[str], deadline: float) -> ClientResult:
    """Wait for a client process and parse the result line it prints.

    Raises:
        FloorError: it failed, timed out or printed no result.
    """
    try:
        stdout, stderr = process.communicate(
            timeout=max(0.0, deadline - time.monotonic())
        )
    except subprocess.TimeoutExpired:
        raise FloorError("client process timed out") from None
    if process.returncode != 0:
        tail = "\n".join(stderr.strip().splitlines()[-5:])
        raise FloorError(
            f"client process exited with status {process.returncode}: {tail}"
        )
    return ClientResult(**json.loads(stdout))


def percentile(samples: list[float], fraction: float) -> float | None:
    """Return the nearest-rank percentile, or None without samples."""
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Start the relay server and both client processes; return the summary.

    Raises:
        FloorError: a process failed or a count came out wrong.
    """
    processes: list[subprocess.Popen[Any]] = []
    try:
        server = subprocess.Popen(
            child_argv("server", args, args.server_cpus), stdout=subprocess.PIPE
        )
        processes.append(server)
        args.port = wait_for_port(server)

        server_cpu_start = cpu_seconds(server.pid)
        started = time.monotonic()
        for role in ("students", "teachers"):
            processes.append(
                subprocess.Popen(
                    child_argv(role, args, args.client_cpus),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        deadline = started + args.timeout + STOP_TIMEOUT_S
        results = [collect_client(process, deadline) for process in processes[1:]]
        wall_s = time.monotonic() - started
        server_cpu_end = cpu_seconds(server.pid)
    finally:
        for process in reversed(processes):
            stop_process(process)

    if server_cpu_start is None or server_cpu_end is None:
        raise FloorError(f"cannot read the CPU time of relay server pid {server.pid}")
    return summarize(args, results, wall_s, server_cpu_end - server_cpu_start)


def summarize(
    args: argparse.Namespace,
    results: list[ClientResult],
    wall_s: float,
    server_cpu_s: float,
) -> dict[str, Any]:
    expected = args.pairs * args.messages
    relayed = sum(result.messages_received for result in results)
    round_trips = [sample for result in results for sample in result.round_trip_ms]
    ok = all(result.messages_received == expected for result in results)
    return {
        "ok": ok,
        "pairs": args.pairs,
        "messages": args.messages,
        "concurrent": args.concurrent,
        "message_bytes": args.message_bytes,
        "relayed_messages": relayed,
        "expected_relays": 2 * expected,
        "wall_s": wall_s,
        "relays_per_s": relayed / wall_s if wall_s > 0 else None,
        "server_cpu_s": server_cpu_s,
        "server_cpu_us_per_relay": server_cpu_s / relayed * 1e6 if relayed else None,
        "client_cpu_s": {result.role: result.cpu_s for result in results},
        "round_trip_ms": {
            "p50": percentile(round_trips, 0.50),
            "p99": percentile(round_trips, 0.99),
        },
        "server_cpus": args.server_cpus,
        "client_cpus": args.client_cpus,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pairs",
        type=int,
        default=1000,
        help="chats, one teacher and one student connection each (default: 1000)",
    )
    parser.add_argument(
        "--messages",
        type=int,
        default=50,
        help="messages each side sends in one chat (default: 50)",
    )
    parser.add_argument(
        "--concurrent",
        type=int,
        default=50,
        help="chats in progress at once, as 10 teachers with 5 chats each "
        "(default: 50)",
    )
    parser.add_argument(
        "--message-bytes",
        type=int,
        default=60,
        help="payload bytes of one chat message (default: 60)",
    )

    parser.add_argument(
        "--server-cpus", help="CPU list to pin the relay server to, e.g. '0' or '0-1'"
    )
    parser.add_argument(
        "--client-cpus", help="CPU list to pin the client processes to, e.g. '1'"
    )

    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds allowed for the clients to finish (default: 60)",
    )

    parser.add_argument("--json", type=Path, help="also write the summary to this file")

    # The options below are set by the coordinating process for its children.
    parser.add_argument(
        "--role",
        choices=("main", "server", "teachers", "students"),
        default="main",
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cpus", help=argparse.SUPPRESS)
    return parser


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("pairs", "messages", "concurrent"):
        if getattr(args, name) < 1:
            parser.error(f"invalid --{name} {getattr(args, name)}: must be at least 1")
    # Each message carries its round number and chat and is padded to this size,
    # so a smaller size would make messages longer than requested.
    if args.message_bytes < len(f"q{args.messages} chat {args.pairs}"):
        parser.error(f"invalid --message-bytes {args.message_bytes}: too small")
    for name in ("server_cpus", "client_cpus"):
        check_cpu_list(parser, f"--{name.replace('_', '-')}", getattr(args, name))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.role == "server":
        raise_fd_limit(2 * args.pairs + RESERVED_FDS)
        cpus = parse_cpu_list(args.cpus) if args.cpus else None
        # SIGTERM's default action ends the server at once, which is fine
        # because it keeps no state.
        trio.run(serve_relay, cpus)
        return 0
    if args.role in ("teachers", "students"):
        raise_fd_limit(args.pairs + RESERVED_FDS)
        try:
            result = trio.run(run_client, args)
        except trio.TooSlowError:
            print(f"{args.role} timed out after {args.timeout} s", file=sys.stderr)
            return 1
        print(json.dumps(dataclasses.asdict(result)))
        if result.errors:
            print(
                f"{args.role}: {result.error_count} chats failed, first: "
                + "; ".join(result.errors),
                file=sys.stderr,
            )
            return 1
        return 0

    check_arguments(parser, args)
    try:
        summary = measure(args)
    except FloorError as exc:
        print(f"floor: failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"floor: {summary['server_cpu_us_per_relay']:.1f} us server CPU per relayed "
        f"message ({summary['relayed_messages']} relays, server CPU "
        f"{summary['server_cpu_s']:.2f} s, wall {summary['wall_s']:.1f} s, "
        f"{summary['relays_per_s']:.0f} relays/s)"
    )
    if not summary["ok"]:
        print(
            f"floor: failed: {summary['relayed_messages']} relays, expected "
            f"{summary['expected_relays']}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
