"""The ``shardchat bench`` command: run the reference tutoring workload end to end.

The runner starts a server (or targets a running one), then the teacher bot
processes and then the student bot processes, and shows progress from
``/stats``. Once every student process has exited, it closes the teachers'
standard input so that they exit too. It then reads the server's CPU counters, fetches every
reported chat's log, checks it with ``shardchat.bench.report`` and prints the
summary.

Every process the runner starts is stopped before it returns, also after a
failure, a timeout or Ctrl-C: bots with SIGTERM (they write their result
files on the way out), the server with SIGTERM and, 10 seconds later,
SIGKILL.
"""

from __future__ import annotations

import argparse
import functools
import http.client
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import trio

import shardchat
from shardchat import tokens
from shardchat.bench import report
from shardchat.bench.bots import Layout
from shardchat.exceptions import ConfigurationError

logger = logging.getLogger("shardchat.bench")

SERVER_START_TIMEOUT_S = 30.0
SERVER_STOP_TIMEOUT_S = 10.0
BOT_STOP_TIMEOUT_S = 5.0
TEACHER_EXIT_TIMEOUT_S = 10.0
# The server commits chat logs in batches, so a log read just after its chat
# ended may be incomplete for about 100 ms.
LOG_SETTLE_TIMEOUT_S = 10.0
LOG_RETRY_DELAY_S = 0.2
HTTP_TIMEOUT_S = 5.0
HTTP_CONCURRENCY = 8
POLL_INTERVAL_S = 0.05
PROGRESS_INTERVAL_S = 0.5
PROGRESS_LINE_INTERVAL_S = 2.0
LOG_TAIL_LINES = 20

LISTENING = re.compile(r"listening on (http://\S+)")


class BenchError(Exception):
    """The benchmark cannot go on because the server did not start or respond."""


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the workload size options, shared with benchmarks/scaling.py."""
    parser.add_argument(
        "--students", type=int, default=1000, help="student bots (default: 1000)"
    )
    parser.add_argument(
        "--teachers", type=int, default=10, help="teacher bots (default: 10)"
    )
    parser.add_argument(
        "--per-teacher",
        type=int,
        default=5,
        help="chats each teacher keeps open (default: 5)",
    )
    parser.add_argument(
        "--messages",
        type=int,
        default=50,
        help="messages each side sends in one chat (default: 50)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to ``parser``."""
    parser.add_argument(
        "--workers",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="worker processes of the server started here (default: usable cores, "
        "%(default)s)",
    )
    add_workload_arguments(parser)

    parser.add_argument(
        "--layout",
        choices=[layout.value for layout in Layout],
        default=Layout.PER_CHAT.value,
        help="per-chat: each bot has a presence socket plus one socket per chat; "
        "single-socket: each bot joins its presence topic and all its chats on "
        "one socket, as phoenix.js clients do (default: per-chat)",
    )
    parser.add_argument(
        "--client-processes",
        type=int,
        default=2,
        help="bot processes: teachers get ceil(N/2), students floor(N/2), "
        "at least one each (default: 2)",
    )

    parser.add_argument(
        "--url",
        help="use the server running at this URL (e.g. http://127.0.0.1:4000) "
        "instead of starting one",
    )
    parser.add_argument(
        "--secret-file",
        type=Path,
        help="the secret of the server at --url (required with --url)",
    )
    parser.add_argument(
        "--ws-engine", help="websocket engine of the server started here"
    )

    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds allowed from starting the server until every bot has exited; "
        f"the log check afterwards has its own {LOG_SETTLE_TIMEOUT_S:.0f} s limit "
        "(default: 300)",
    )
    parser.add_argument("--json", type=Path, help="also write the summary to this file")
    parser.add_argument(
        "--quiet", action="store_true", help="print no progress, only the summary"
    )


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; return 0 if every chat verified, 1 otherwise.

    Raises:
        ConfigurationError: an option is invalid.
    """
    _check_arguments(args)
    workdir = Path(tempfile.mkdtemp(prefix="shardchat-bench-"))
    processes = ProcessGroup()
    ok = False
    try:
        summary = trio.run(_run_benchmark, args, workdir, processes)
        ok = summary["ok"]
    except BaseException as exc:
        # trio may deliver these inside an exception group.
        if _find(exc, KeyboardInterrupt) is not None:
            print("shardchat bench: interrupted", file=sys.stderr)
            return 130
        error = _find(exc, BenchError)
        if error is None:
            raise
        print(f"shardchat bench: failed: {error}", file=sys.stderr)
        return 1
    finally:
        processes.stop_all()
        if ok or not any(workdir.iterdir()):
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(
                f"shardchat bench: logs and results kept in {workdir}", file=sys.stderr
            )
    return 0 if ok else 1


def _find(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find(inner, kind)
            if found is not None:
                return found
    return None


def _check_arguments(args: argparse.Namespace) -> None:
    for name in ("workers", "students", "teachers", "per_teacher", "messages"):
        value = getattr(args, name)
        if value < 1:
            option = "--" + name.replace("_", "-")
            raise ConfigurationError(f"invalid {option} {value}: must be at least 1")
    if args.client_processes < 1:
        raise ConfigurationError(
            f"invalid --client-processes {args.client_processes}: must be at least 1"
        )
    if args.timeout <= 0:
        raise ConfigurationError(f"invalid --timeout {args.timeout}: must be positive")
    if args.url is not None:
        if args.secret_file is None:
            raise ConfigurationError("missing --secret-file: required with --url")
        parts = urllib.parse.urlsplit(args.url)
        if parts.scheme != "http" or not parts.hostname:
            raise ConfigurationError(
                f"invalid --url {args.url!r}: expected http://HOST:PORT"
            )
        # Fail here rather than in every bot process.
        tokens.load_secret(args.secret_file)


@dataclass
class BotProcess:
    """One bot process and where its output goes."""

    role: str
    index: int
    first: int
    count: int
    popen: subprocess.Popen[bytes]
    result_path: Path
    log_path: Path

    @property
    def name(self) -> str:
        return f"{self.role} process {self.index} (pid {self.popen.pid})"


@dataclass
class ProcessGroup:
    """The processes this run started, which ``run`` stops on every exit path."""

    server: subprocess.Popen[bytes] | None = None
    bots: list[BotProcess] = field(default_factory=list)
    files: list[IO[bytes]] = field(default_factory=list)

    def stop_bots(self) -> None:
        """Stop the bots still running: SIGTERM, then SIGKILL if they linger."""
        running = [bot.popen for bot in self.bots if bot.popen.poll() is None]
        _stop_processes(running, BOT_STOP_TIMEOUT_S)

    def stop_all(self) -> None:
        """Stop the bots, then the server; close the output files."""
        self.stop_bots()
        if self.server is not None and self.server.poll() is None:
            _stop_processes([self.server], SERVER_STOP_TIMEOUT_S)
        for file in self.files:
            file.close()
        self.files.clear()


def _stop_processes(processes: list[subprocess.Popen[bytes]], grace_s: float) -> None:
    for popen in processes:
        popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for popen in processes:
        try:
            popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("pid %d ignored SIGTERM; killing it", popen.pid)
            popen.kill()
            popen.wait()


@dataclass(frozen=True)
class Server:
    """The address, secret file and worker count of the server under test."""

    host: str
    port: int
    secret_file: Path
    workers: int | None


class StatsClient:
    """Plain HTTP/1.1 requests to the router, run in threads with bounded concurrency."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.limiter = trio.CapacityLimiter(HTTP_CONCURRENCY)

    async def get_json(self, path: str) -> Any | None:
        """Return the decoded JSON body of GET ``path``, or None on 404.

        Raises:
            BenchError: any other status, or the request failed.
        """
        request = functools.partial(self._get_json, path)
        return await trio.to_thread.run_sync(
            request, limiter=self.limiter, abandon_on_cancel=True
        )

    def _get_json(self, path: str) -> Any | None:
        connection = http.client.HTTPConnection(
            self.host, self.port, timeout=HTTP_TIMEOUT_S
        )
        try:
            connection.request("GET", path, headers={"Connection": "close"})
            response = connection.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise BenchError(f"GET {path} failed: {exc}") from exc
        finally:
            connection.close()
        if response.status == 404:
            return None
        if response.status != 200:
            raise BenchError(f"GET {path} failed: HTTP {response.status}")
        try:
            return json.loads(body)
        except ValueError as exc:
            raise BenchError(f"GET {path} returned invalid JSON: {exc}") from exc


async def _run_benchmark(
    args: argparse.Namespace, workdir: Path, processes: ProcessGroup
) -> dict[str, Any]:
    problems: list[str] = []
    deadline = trio.current_time() + args.timeout
    if args.url is not None:
        server = _describe_server_at(args.url, args.secret_file)
    else:
        server = await _start_server(args, workdir, processes)
    client = StatsClient(server.host, server.port)
    stats_before = await _read_first_stats(client, server)

    started_at = time.time()
    teachers, students = _start_bots(args, server, workdir, processes)
    students_done_at = await _drive_workload(
        args, client, processes, teachers, students, deadline, problems
    )
    server_status = processes.server.poll() if processes.server else None
    if server_status is not None:
        raise BenchError(
            f"server exited with status {server_status} during the run\n"
            + _tail(workdir / "server.log")
        )

    # The CPU counters are read before anything stops the server.
    server_cpu = await _measure_server_cpu(client, stats_before, problems)
    merged = report.merge_results(_read_results(processes.bots, problems))
    logs = await _fetch_logs(client, merged, args.messages, problems)

    workers = server.workers
    if workers is None:
        workers = _count_workers(stats_before.get("workers"))
    workload = report.Workload(
        students=args.students,
        teachers=args.teachers,
        per_teacher=args.per_teacher,
        messages=args.messages,
        workers=workers,
        ws_engine=args.ws_engine,
        layout=args.layout,
    )
    verification = report.verify_run(merged, logs, workload)
    finished_at = merged.students_finished_at or students_done_at
    summary = report.build_summary(
        workload,
        merged,
        verification,
        wall_s=finished_at - started_at if finished_at else None,
        server_cpu_s=server_cpu,
        extra_problems=problems,
    )
    print(report.format_summary(summary), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


async def _read_first_stats(client: StatsClient, server: Server) -> dict[str, Any]:
    try:
        stats = await client.get_json("/stats")
    except BenchError as exc:
        raise BenchError(f"server at {server.host}:{server.port}: {exc}") from exc
    if not isinstance(stats, dict):
        raise BenchError(f"server at {server.host}:{server.port} has no /stats")
    return stats


async def _measure_server_cpu(
    client: StatsClient, stats_before: dict[str, Any], problems: list[str]
) -> dict[str, Any] | None:
    """Return the server CPU seconds spent since ``stats_before``, by role."""
    try:
        stats_after = await client.get_json("/stats")
    except BenchError as exc:
        problems.append(f"server CPU unknown: {exc}")
        return None
    if not isinstance(stats_after, dict) or "cpu_s" not in stats_after:
        problems.append("server CPU unknown: /stats has no cpu_s")
        return None
    return report.cpu_usage(stats_before.get("cpu_s"), stats_after["cpu_s"])


def _count_workers(value: Any) -> int | None:
    # /stats gives the worker count, or one entry per worker.
    if isinstance(value, int):
        return value
    if isinstance(value, list):
        return len(value)
    return None


def _describe_server_at(url: str, secret_file: Path) -> Server:
    parts = urllib.parse.urlsplit(url)
    return Server(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 80,
        secret_file=secret_file,
        workers=None,
    )


def _child_environment() -> dict[str, str]:
    # The children must import this same shardchat even when it is not
    # installed, as when the command runs from a source checkout.
    environment = dict(os.environ)
    package_root = str(Path(shardchat.__file__).resolve().parent.parent)
    path = environment.get("PYTHONPATH")
    environment["PYTHONPATH"] = (
        package_root if not path else package_root + os.pathsep + path
    )
    environment["PYTHONUNBUFFERED"] = "1"
    return environment


async def _start_server(
    args: argparse.Namespace, workdir: Path, processes: ProcessGroup
) -> Server:
    data_dir = workdir / "data"
    command = [
        sys.executable, "-m", "shardchat", "serve",
        "--workers", str(args.workers),
        "--host", "127.0.0.1",
        "--port", "0",
        "--data-dir", str(data_dir),
    ]  # fmt: skip
    if args.ws_engine:
        command += ["--ws-engine", args.ws_engine]
    stdout_path = workdir / "server.out"
    log_path = workdir / "server.log"
    stdout = stdout_path.open("wb")
    stderr = log_path.open("wb")
    processes.files += [stdout, stderr]
    # A plain Popen, so that stop_all can stop it outside the event loop.
    processes.server = subprocess.Popen(  # noqa: ASYNC220 - returns once started
        command,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        env=_child_environment(),
    )
    _say(args, f"started server (pid {processes.server.pid}), log in {log_path}")

    with trio.move_on_after(SERVER_START_TIMEOUT_S):
        while True:
            match = LISTENING.search(stdout_path.read_text(errors="replace"))
            if match is not None:
                break
            status = processes.server.poll()
            if status is not None:
                raise BenchError(
                    f"server exited with status {status} before listening\n"
                    + _tail(log_path)
                )
            await trio.sleep(POLL_INTERVAL_S)
    if match is None:
        raise BenchError(
            f"server printed no 'listening on' line within "
            f"{SERVER_START_TIMEOUT_S:.0f} s\n" + _tail(log_path)
        )

    parts = urllib.parse.urlsplit(match.group(1))
    _say(args, f"server listening on {match.group(1)}")
    return Server(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 80,
        secret_file=data_dir / "secret",
        workers=args.workers,
    )


def _split(count: int, parts: int) -> list[tuple[int, int]]:
    """Split ``range(count)`` into at most ``parts`` runs of near-equal length."""
    parts = max(1, min(parts, count))
    base, extra = divmod(count, parts)
    runs = []
    first = 0
    for index in range(parts):
        size = base + (1 if index < extra else 0)
        runs.append((first, size))
        first += size
    return runs


def _start_bots(
    args: argparse.Namespace, server: Server, workdir: Path, processes: ProcessGroup
) -> tuple[list[BotProcess], list[BotProcess]]:
    teacher_processes = max(1, math.ceil(args.client_processes / 2))
    student_processes = max(1, args.client_processes // 2)
    environment = _child_environment()
    started: dict[str, list[BotProcess]] = {"teacher": [], "student": []}
    for role, count, parts in (
        ("teacher", args.teachers, teacher_processes),
        ("student", args.students, student_processes),
    ):
        for index, (first, size) in enumerate(_split(count, parts)):
            bot = _start_bot_process(
                args, server, workdir, processes, environment, role, index, first, size
            )
            started[role].append(bot)
    _say(
        args,
        f"started {len(started['teacher'])} teacher and "
        f"{len(started['student'])} student bot processes",
    )
    return started["teacher"], started["student"]


def _start_bot_process(
    args: argparse.Namespace,
    server: Server,
    workdir: Path,
    processes: ProcessGroup,
    environment: dict[str, str],
    role: str,
    index: int,
    first: int,
    count: int,
) -> BotProcess:
    result_path = workdir / f"{role}-{index}.json"
    log_path = workdir / f"{role}-{index}.log"
    command = [
        sys.executable, "-m", "shardchat.bench.bots",
        "--role", role,
        "--first", str(first),
        "--count", str(count),
        "--host", server.host,
        "--port", str(server.port),
        "--secret-file", str(server.secret_file),
        "--per-teacher", str(args.per_teacher),
        "--messages", str(args.messages),
        "--layout", args.layout,
        "--result", str(result_path),
    ]  # fmt: skip
    log = log_path.open("wb")
    processes.files.append(log)
    # Teachers exit when their stdin closes; students need none.
    stdin = subprocess.PIPE if role == "teacher" else subprocess.DEVNULL
    popen = subprocess.Popen(
        command, stdin=stdin, stdout=log, stderr=log, env=environment
    )
    bot = BotProcess(role, index, first, count, popen, result_path, log_path)
    processes.bots.append(bot)
    return bot


async def _drive_workload(
    args: argparse.Namespace,
    client: StatsClient,
    processes: ProcessGroup,
    teachers: list[BotProcess],
    students: list[BotProcess],
    deadline: float,
    problems: list[str],
) -> float | None:
    """Wait for the bots to finish, showing progress; return when students ended.

    A run past ``deadline`` stops every bot and adds a problem that lists
    the processes still running and the last ``/stats`` counts.
    """
    progress = Progress(args, client)
    students_done_at = None
    with trio.move_on_at(deadline) as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(progress.run)
            await _wait_for_exit(students)
            students_done_at = time.time()

            for teacher in teachers:
                if teacher.popen.stdin is not None:
                    teacher.popen.stdin.close()
            with trio.move_on_after(TEACHER_EXIT_TIMEOUT_S):
                await _wait_for_exit(teachers)
            lingering = [t.name for t in teachers if t.popen.poll() is None]
            if lingering:
                problems.append(
                    f"{', '.join(lingering)} still running "
                    f"{TEACHER_EXIT_TIMEOUT_S:.0f} s after stdin closed"
                )
            nursery.cancel_scope.cancel()
    progress.finish()

    if scope.cancelled_caught:
        running = [bot.name for bot in processes.bots if bot.popen.poll() is None]
        problems.append(
            f"timed out after {args.timeout:.0f} s with {', '.join(running)} "
            f"still running; last /stats: {progress.describe_last()}"
        )
    # Bots that are still running write their results when stopped.
    processes.stop_bots()
    return students_done_at


async def _wait_for_exit(bots: list[BotProcess]) -> None:
    # Runs until the processes exit or the caller's deadline cancels it.
    # Popen has no awaitable exit, so polling is the plain way.
    while any(bot.popen.poll() is None for bot in bots):  # noqa: ASYNC110
        await trio.sleep(POLL_INTERVAL_S)


class Progress:
    """The progress line, from ``/stats`` every half second, on stderr."""

    def __init__(self, args: argparse.Namespace, client: StatsClient) -> None:
        self.client = client
        self.quiet = args.quiet
        self.tty = sys.stderr.isatty()
        self.started = trio.current_time()
        self.last_line_at = -math.inf
        self.last_stats: dict[str, Any] | None = None
        self.last_error: str | None = None
        self.drawn = False

    async def run(self) -> None:
        # Runs until the workload is over and the caller cancels it.
        while True:
            try:
                self.last_stats = await self.client.get_json("/stats")
                self.last_error = None
            except BenchError as exc:
                self.last_error = str(exc)
            self._show()
            await trio.sleep(PROGRESS_INTERVAL_S)

    def describe_last(self) -> str:
        stats = self.last_stats
        if stats is None:
            return self.last_error or "none"
        # The server counts connected students only, so students that are
        # done and gone drop out of every count.
        students = stats.get("students") or {}
        return (
            f"students connected {students.get('total')} "
            f"(waiting {students.get('waiting')}, "
            f"chatting {students.get('chatting')}, "
            f"finished {students.get('finished')}), "
            f"chats in progress {stats.get('chats_in_progress')}"
        )

    def _show(self) -> None:
        if self.quiet:
            return
        now = trio.current_time()
        line = f"{now - self.started:6.1f} s  {self.describe_last()}"
        if self.tty:
            sys.stderr.write("\r" + line + "\x1b[K")
            sys.stderr.flush()
            self.drawn = True
        elif now - self.last_line_at >= PROGRESS_LINE_INTERVAL_S:
            print(line, file=sys.stderr, flush=True)
            self.last_line_at = now

    def finish(self) -> None:
        if self.drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _read_results(bots: list[BotProcess], problems: list[str]) -> list[dict[str, Any]]:
    results = []
    for bot in bots:
        status = bot.popen.poll()
        if status not in (0, None):
            problems.append(
                f"{bot.name} exited with status {status}\n" + _tail(bot.log_path)
            )
        try:
            results.append(json.loads(bot.result_path.read_text()))
        except (OSError, ValueError) as exc:
            problems.append(f"{bot.name} wrote no readable result: {exc}")
    return results


async def _fetch_logs(
    client: StatsClient,
    merged: report.MergedResults,
    messages: int,
    problems: list[str],
) -> dict[str, Any]:
    """Fetch every reported chat's log, retrying while it is still being committed."""
    logs: dict[str, Any] = {}
    failures: dict[str, str] = {}

    async def fetch(chat_id: str) -> None:
        path = f"/chats/{urllib.parse.quote(chat_id, safe='')}/messages"
        try:
            logs[chat_id] = await client.get_json(path)
            failures.pop(chat_id, None)
        except BenchError as exc:
            failures[chat_id] = str(exc)

    pending = list(merged.chats)
    deadline = trio.current_time() + LOG_SETTLE_TIMEOUT_S
    while pending:
        async with trio.open_nursery() as nursery:
            for chat_id in pending:
                nursery.start_soon(fetch, chat_id)
        pending = [
            chat_id
            for chat_id in pending
            if not report.is_log_settled(
                merged.chats[chat_id], logs.get(chat_id), messages
            )
        ]
        if trio.current_time() >= deadline:
            break
        await trio.sleep(LOG_RETRY_DELAY_S)

    problems.extend(failures.values())
    return logs


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    tail = lines[-LOG_TAIL_LINES:]
    return "\n".join(f"    | {line}" for line in tail) or "    | (empty log)"


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(f"shardchat bench: {text}", file=sys.stderr, flush=True)
