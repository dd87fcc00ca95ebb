"""Measure a worker's memory per idle presence connection.

Starts ``shardchat serve --workers 1``, opens N websocket connections to it as
students from one trio process, each joined to its own presence:student:<id>
topic and then left idle, and reads the worker's resident set size (VmRSS in
/proc/<pid>/status) before the first connection and after the last has joined.
The difference divided by N is the memory one idle connection costs the worker:
its socket, its websocket state and its channel, with nothing queued.

Both this process and the worker hold one file descriptor per connection, so the
soft RLIMIT_NOFILE is raised towards the hard limit first (children inherit it).
The server runs with a 600 s idle timeout, so no connection needs heartbeats.

    python benchmarks/idle.py --connections 10000 --json idle.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from shardchat import websocket
from shardchat.exceptions import ConnectionClosed, HandshakeError
from shardchat.tokens import load_secret, mint

HOST = "127.0.0.1"
# File descriptors kept free in each process for the interpreter, logs, pipes
# and the server's own sockets.
RESERVED_FDS = 256
SERVER_START_TIMEOUT_S = 30.0
SERVER_STOP_TIMEOUT_S = 15.0
CHILD_STOP_TIMEOUT_S = 5.0
HTTP_TIMEOUT_S = 10.0
JOIN_TIMEOUT_S = 10.0
# A join reply normally comes first; a few other frames are tolerated.
MAX_FRAMES_BEFORE_REPLY = 8
IDLE_TIMEOUT_S = 600
ERRORS_REPORTED = 5
LISTENING = re.compile(r"listening on http://[^\s:]+:(\d+)")


class IdleError(Exception):
    """The server did not start, or its processes could not be read."""


class JoinError(Exception):
    """The server rejected a presence join, or sent no reply in time."""


@dataclasses.dataclass
class Tally:
    """Counts of the connections opened so far, shared by their tasks."""

    total: int
    joined: int = 0
    failed: int = 0
    errors: Counter[str] = dataclasses.field(default_factory=Counter)
    all_settled: trio.Event = dataclasses.field(default_factory=trio.Event)

    def record_joined(self) -> None:
        self.joined += 1
        self._check_settled()

    def record_failure(self, text: str) -> None:
        self.failed += 1
        self.errors[text] += 1
        self._check_settled()

    def _check_settled(self) -> None:
        if self.joined + self.failed >= self.total:
            self.all_settled.set()


# The server's processes.


def raise_fd_limit(needed: int) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE towards needed; return (soft, hard) after it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft, hard


def start_server(data_dir: Path, engine: str) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable,
        "-m",
        "shardchat",
        "serve",
        "--workers",
        "1",
        "--host",
        HOST,
        "--port",
        "0",
        "--data-dir",
        str(data_dir),
        "--idle-timeout",
        str(IDLE_TIMEOUT_S),
        "--ws-engine",
        engine,
        "--log-level",
        "warning",
    ]
    with (
        open(data_dir / "serve.out", "wb") as out,
        open(data_dir / "serve.err", "wb") as err,
    ):
        return subprocess.Popen(argv, stdout=out, stderr=err, start_new_session=True)


def wait_for_port(server: subprocess.Popen[bytes], data_dir: Path) -> int:
    """Return the port from the server's "listening on" line.

    Raises:
        IdleError: the server exited or printed no such line in time.
    """
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        match = LISTENING.search((data_dir / "serve.out").read_text())
        if match:
            return int(match[1])
        if server.poll() is not None:
            raise IdleError(
                f"shardchat serve exited with status {server.returncode}: "
                f"{read_tail(data_dir / 'serve.err')}"
            )
        time.sleep(0.05)
    raise IdleError(f"shardchat serve did not listen within {SERVER_START_TIMEOUT_S} s")


def read_tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text().strip().splitlines()[-lines:])
    except OSError:
        return ""


def list_children(parent: int) -> dict[int, str]:
    """Return the children of parent with the module each runs (``-m NAME``)."""
    children = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as file:
                fields = file.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{entry.name}/cmdline", "rb") as file:
                argv = file.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        # After the command name: state, then ppid.
        if int(fields[1]) != parent:
            continue
        module = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else argv[0]
        children[int(entry.name)] = module
    return children


def find_worker(server_pid: int) -> tuple[int, dict[int, str]]:
    """Return the worker's pid and all the server's children, once the worker runs.

    Raises:
        IdleError: no child running shardchat.worker appeared in time.
    """
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        children = list_children(server_pid)
        for pid, module in children.items():
            if "shardchat.worker" in module:
                return pid, children
        time.sleep(0.1)
    raise IdleError(f"no shardchat.worker process under server pid {server_pid}")


def read_rss(pid: int) -> int:
    """Return a process's VmRSS in bytes.

    Raises:
        IdleError: /proc/<pid>/status cannot be read or has no VmRSS line.
    """
    try:
        with open(f"/proc/{pid}/status") as file:
            for line in file:
                if line.startswith("VmRSS:"):
                    # The kernel reports VmRSS in kB (KiB).
                    return int(line.split()[1]) * 1024
    except OSError as exc:
        raise IdleError(f"cannot read /proc/{pid}/status: {exc}") from exc
    raise IdleError(f"no VmRSS line in /proc/{pid}/status")


def count_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def fetch_worker_connections(port: int) -> int | None:
    """Return the connections the worker reports in /stats, or None if unreadable."""
    connection = http.client.HTTPConnection(HOST, port, timeout=HTTP_TIMEOUT_S)
    try:
        connection.request("GET", "/stats")
        response = connection.getresponse()
        stats = json.loads(response.read())
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        connection.close()
    slots = [slot for slot in stats.get("workers") or [] if isinstance(slot, dict)]
    return sum(slot.get("connections", 0) for slot in slots) if slots else None


def snapshot(
    port: int, server: int, worker: int, children: dict[int, str]
) -> dict[str, Any]:
    """Read the RSS of every server process, the worker's descriptors and /stats."""
    by_process = {f"shardchat serve (pid {server})": read_rss(server)}
    for pid, module in children.items():
        by_process[f"{module} (pid {pid})"] = read_rss(pid)
    return {
        "worker_rss_bytes": read_rss(worker),
        "server_rss_total_bytes": sum(by_process.values()),
        "rss_bytes_by_process": by_process,
        "worker_fds": count_fds(worker),
        "worker_connections_in_stats": fetch_worker_connections(port),
    }


def stop_process(process: subprocess.Popen[Any], timeout_s: float) -> None:
    """Stop a process by its pid: SIGTERM, then SIGKILL after timeout_s."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout_s)


def stop_leftover_children(children: dict[int, str]) -> None:
    """SIGKILL any child of the server still alive after the server has stopped.

    The children get SIGTERM when the server dies, so this is only a backstop.
    """
    deadline = time.monotonic() + CHILD_STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        alive = [pid for pid in children if is_alive(pid)]
        if not alive:
            return
        time.sleep(0.1)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def is_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            state = file.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state != b"Z"


# The client side.


async def join_presence(connection: websocket.Connection, topic: str) -> None:
    """Join topic as a Phoenix channel and wait for the ok reply.

    Raises:
        JoinError: the reply is an error, or none came within JOIN_TIMEOUT_S.
    """
    connection.send(json.dumps(["1", "1", topic, "phx_join", {}]))
    with trio.move_on_after(JOIN_TIMEOUT_S):
        for _ in range(MAX_FRAMES_BEFORE_REPLY):
            frame = json.loads(await connection.receive())
            if frame[3] != "phx_reply" or frame[1] != "1":
                continue
            if frame[4].get("status") != "ok":
                raise JoinError(f"join {topic} rejected: {frame[4].get('response')}")
            return
    raise JoinError(f"no reply to the join of {topic} within {JOIN_TIMEOUT_S} s")


async def hold_connection(
    index: int,
    settings: argparse.Namespace,
    secret: bytes,
    limiter: trio.CapacityLimiter,
    tally: Tally,
) -> None:
    """Open one student connection, join its presence topic and keep it open.

    The limiter bounds connections being opened, not those held.
    """
    student_id = f"idle-{index}"
    token = mint(secret, student_id, "student")
    resource_path = f"/socket/websocket?vsn=2.0.0&token={token}"
    async with contextlib.AsyncExitStack() as stack:
        async with limiter:
            try:
                connection = await stack.enter_async_context(
                    websocket.connect(
                        HOST,
                        settings.port,
                        resource_path,
                        connect_timeout=settings.connect_timeout,
                    )
                )
                await join_presence(connection, f"presence:student:{student_id}")
            except (
                OSError,
                TimeoutError,
                HandshakeError,
                ConnectionClosed,
                JoinError,
                ValueError,
                IndexError,
            ) as exc:
                tally.record_failure(f"{type(exc).__name__}: {exc}")
                return
        tally.record_joined()
        await trio.sleep_forever()


async def open_and_measure(
    settings: argparse.Namespace,
    secret: bytes,
    measure: Callable[[], dict[str, Any]],
) -> tuple[Tally, float, dict[str, Any]]:
    """Open every connection, call measure() while all are held, then close them.

    Returns the tally, the seconds taken to open the connections and what
    measure() returned.
    """
    tally = Tally(total=settings.connections)
    limiter = trio.CapacityLimiter(settings.concurrency)
    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        for index in range(settings.connections):
            nursery.start_soon(hold_connection, index, settings, secret, limiter, tally)
        with trio.move_on_after(settings.timeout):
            await tally.all_settled.wait()
        open_s = time.monotonic() - started
        await trio.sleep(settings.settle)
        measurement = measure()
        # Cancelling closes every connection at once, without close handshakes.
        nursery.cancel_scope.cancel()
    return tally, open_s, measurement


# Main.


def run(settings: argparse.Namespace, limit_note: str | None) -> dict[str, Any]:
    """Start the server, measure it and stop it; return the summary.

    Raises:
        IdleError: the server did not start or its worker cannot be read.
    """
    data_dir = Path(tempfile.mkdtemp(prefix="shardchat-idle-"))
    server = None
    children: dict[int, str] = {}
    try:
        server = start_server(data_dir, settings.ws_engine)
        settings.port = wait_for_port(server, data_dir)
        worker, children = find_worker(server.pid)
        secret = load_secret(data_dir / "secret")

        time.sleep(settings.settle)
        before = snapshot(settings.port, server.pid, worker, children)
        tally, open_s, after = trio.run(
            open_and_measure,
            settings,
            secret,
            functools.partial(snapshot, settings.port, server.pid, worker, children),
        )
    finally:
        if server is not None:
            stop_process(server, SERVER_STOP_TIMEOUT_S)
            stop_leftover_children(children)
        shutil.rmtree(data_dir, ignore_errors=True)
    return summarize(settings, limit_note, worker, before, after, tally, open_s)


def summarize(
    settings: argparse.Namespace,
    limit_note: str | None,
    worker: int,
    before: dict[str, Any],
    after: dict[str, Any],
    tally: Tally,
    open_s: float,
) -> dict[str, Any]:
    delta = after["worker_rss_bytes"] - before["worker_rss_bytes"]
    return {
        "ok": tally.joined == settings.connections and tally.failed == 0,
        "connections_requested": settings.requested,
        "connections_attempted": settings.connections,
        "connections_joined": tally.joined,
        "connections_failed": tally.failed,
        "errors": dict(tally.errors.most_common(ERRORS_REPORTED)),
        "fd_limit_note": limit_note,
        "open_s": open_s,
        "concurrency": settings.concurrency,
        "ws_engine": settings.ws_engine,
        "worker_pid": worker,
        "worker_rss_before_bytes": before["worker_rss_bytes"],
        "worker_rss_after_bytes": after["worker_rss_bytes"],
        "worker_rss_delta_bytes": delta,
        "server_rss_total_before_bytes": before["server_rss_total_bytes"],
        "server_rss_total_after_bytes": after["server_rss_total_bytes"],
        "bytes_per_connection": delta / tally.joined if tally.joined else None,
        "before": before,
        "after": after,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--connections",
        type=int,
        default=10000,
        help="idle presence connections to open (default: 10000)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=200,
        help="connections being opened at once (default: 200)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        help="seconds allowed for one connection's TCP connect and handshake "
        "(default: 10)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=180.0,
        help="seconds allowed to open every connection (default: 180)",
    )

    parser.add_argument(
        "--settle",
        type=float,
        default=1.0,
        help="seconds to wait before each RSS reading (default: 1)",
    )

    parser.add_argument(
        "--ws-engine",
        choices=websocket.ENGINES,
        default=websocket.DEFAULT_ENGINE,
        help="websocket engine of the server (default: %(default)s)",
    )
    parser.add_argument("--json", type=Path, help="also write the summary to this file")
    return parser


def fit_to_fd_limit(settings: argparse.Namespace) -> str | None:
    """Raise RLIMIT_NOFILE, lowering settings.connections if the hard limit is short.

    Returns a note saying so, or None when the requested count fits.
    """
    settings.requested = settings.connections
    needed = settings.connections + RESERVED_FDS
    soft, hard = raise_fd_limit(needed)
    if soft >= needed:
        return None
    settings.connections = max(0, soft - RESERVED_FDS)
    return (
        f"the RLIMIT_NOFILE hard limit is {hard}, below the {needed} descriptors "
        f"needed for {settings.requested} connections; opening "
        f"{settings.connections} connections instead"
    )


def print_summary(summary: dict[str, Any]) -> None:
    mib = 1024 * 1024
    per_connection = summary["bytes_per_connection"]
    print(
        f"idle: {summary['connections_joined']} presence connections joined on one "
        f"worker in {summary['open_s']:.1f} s ({summary['connections_failed']} failed)"
    )
    print(
        f"idle: worker RSS {summary['worker_rss_before_bytes'] / mib:.1f} MiB before, "
        f"{summary['worker_rss_after_bytes'] / mib:.1f} MiB after, "
        f"{summary['worker_rss_delta_bytes'] / mib:+.1f} MiB, "
        + (f"{per_connection:.0f} bytes per connection" if per_connection else "")
    )
    print(
        f"idle: all server processes {summary['server_rss_total_before_bytes'] / mib:.1f}"
        f" MiB before, {summary['server_rss_total_after_bytes'] / mib:.1f} MiB after"
    )
    print(
        f"idle: worker descriptors {summary['before']['worker_fds']} -> "
        f"{summary['after']['worker_fds']}, connections in /stats "
        f"{summary['after']['worker_connections_in_stats']}"
    )
    for text, count in summary["errors"].items():
        print(f"idle: {count} x {text}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    settings = parser.parse_args(argv)
    for name in ("connections", "concurrency"):
        if getattr(settings, name) < 1:
            parser.error(
                f"invalid --{name} {getattr(settings, name)}: must be at least 1"
            )
    limit_note = fit_to_fd_limit(settings)
    if limit_note:
        print(f"idle: {limit_note}", file=sys.stderr)
    if settings.connections < 1:
        print("idle: failed: no descriptors left for any connection", file=sys.stderr)
        return 1

    try:
        summary = run(settings, limit_note)
    except IdleError as exc:
        print(f"idle: failed: {exc}", file=sys.stderr)
        return 1
    if settings.json:
        settings.json.write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
