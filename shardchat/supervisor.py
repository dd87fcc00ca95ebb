"""The supervisor: the ``shardchat serve`` process.

Shaped like a classic arbiter. It opens the listening socket and the Unix
socket pairs that connect the children. It spawns the matchmaker, the workers
and the router as fresh interpreters, because a trio process is never forked.
Then it only waits: signal handlers record the signal, and the main loop reaps
children and stops everything in order. A child that dies unexpectedly is
logged and the whole server stops with ``EXIT_CHILD_DIED``, so a service
manager restarts it cleanly. No child is left behind, because each child also
receives SIGTERM if the supervisor itself dies.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from shardchat.exceptions import ConfigurationError

log = logging.getLogger("shardchat.supervisor")

LOCK_FILE_NAME = "serve.lock"
EXIT_OK = 0
EXIT_CHILD_DIED = 3
STOP_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.2
LISTEN_BACKLOG = 4096


@dataclass
class Child:
    """One child process."""

    name: str
    argv: list[str]
    pass_fds: tuple[int, ...]
    process: subprocess.Popen | None = None
    exit_status: int | None = None


@dataclass
class Options:
    """The settings of one ``shardchat serve`` run."""

    workers: int
    host: str
    port: int
    data_dir: Path
    secret_file: Path
    ws_engine: str = "wsproto"
    socket_path: str = "/socket"
    log_level: str = "info"
    idle_timeout: float = 60.0
    insecure_join_identity: bool = False


@dataclass
class Supervisor:
    options: Options
    children: list[Child] = field(default_factory=list)
    signal_received: int | None = None
    port: int = 0

    # Setup.

    def listen(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.options.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.options.host, self.options.port))
        listener.listen(LISTEN_BACKLOG)
        self.port = listener.getsockname()[1]
        return listener

    def spawn_all(self, listener: socket.socket) -> None:
        """Create the socket pairs and start matchmaker, workers and router."""
        options = self.options
        slots = options.workers
        handoff_pairs = [
            socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            for _ in range(slots)
        ]
        matchmaker_pairs = [socket.socketpair() for _ in range(slots)]
        router_pair = socket.socketpair()
        # One link for every pair of workers, for chats joined on another
        # worker's socket: peer_ends[slot][other] is slot's end.
        peer_ends: list[dict[int, socket.socket]] = [{} for _ in range(slots)]
        for low in range(slots):
            for high in range(low + 1, slots):
                peer_ends[low][high], peer_ends[high][low] = socket.socketpair()
        common = [
            "--secret-file",
            str(options.secret_file),
            "--parent-pid",
            str(os.getpid()),
            "--log-level",
            options.log_level,
        ]
        matchmaker = self.spawn(
            "matchmaker",
            [
                "-m",
                "shardchat.matchmaker",
                "--worker-fds",
                ",".join(str(pair[1].fileno()) for pair in matchmaker_pairs),
                "--router-fd",
                str(router_pair[1].fileno()),
                *common,
            ],
            [pair[1].fileno() for pair in matchmaker_pairs] + [router_pair[1].fileno()],
        )
        insecure = (
            ["--insecure-join-identity"] if options.insecure_join_identity else []
        )
        workers = []
        for slot in range(slots):
            handoff, link = handoff_pairs[slot][1], matchmaker_pairs[slot][0]
            peers = peer_ends[slot]
            peer_fds = ",".join(
                f"{other}:{end.fileno()}" for other, end in peers.items()
            )
            workers.append(
                self.spawn(
                    f"worker {slot}",
                    [
                        "-m",
                        "shardchat.worker",
                        "--slot",
                        str(slot),
                        "--slots",
                        str(slots),
                        "--handoff-fd",
                        str(handoff.fileno()),
                        "--matchmaker-fd",
                        str(link.fileno()),
                        "--data-dir",
                        str(options.data_dir),
                        "--ws-engine",
                        options.ws_engine,
                        "--idle-timeout",
                        str(options.idle_timeout),
                        "--peer-fds",
                        peer_fds,
                        *insecure,
                        *common,
                    ],
                    [handoff.fileno(), link.fileno()]
                    + [end.fileno() for end in peers.values()],
                )
            )
        self.spawn(
            "router",
            [
                "-m",
                "router",
                "--listen-fd",
                str(listener.fileno()),
                "--handoff-fds",
                ",".join(str(pair[0].fileno()) for pair in handoff_pairs),
                "--matchmaker-fd",
                str(router_pair[0].fileno()),
                "--matchmaker-pid",
                str(matchmaker.process.pid),
                "--worker-pids",
                ",".join(str(child.process.pid) for child in workers),
                "--data-dir",
                str(options.data_dir),
                "--socket-path",
                options.socket_path,
                *insecure,
                *common,
            ],
            [listener.fileno(), router_pair[0].fileno()]
            + [pair[0].fileno() for pair in handoff_pairs],
        )
        # The children own their ends now.
        for pair in [*handoff_pairs, *matchmaker_pairs, router_pair]:
            for end in pair:
                end.close()
        for ends in peer_ends:
            for end in ends.values():
                end.close()
        listener.close()

    def spawn(self, name: str, arguments: list[str], pass_fds: list[int]) -> Child:
        child = Child(name, [sys.executable, *arguments], tuple(pass_fds))
        child.process = subprocess.Popen(child.argv, pass_fds=child.pass_fds)
        self.children.append(child)
        log.info("[%d] started %s as pid %d", os.getpid(), name, child.process.pid)
        return child

    # Running.

    def record_signal(self, signum: int, _frame: object) -> None:
        self.signal_received = signum

    def run(self) -> int:
        """Wait for a signal or a child's death, then stop all children in order."""
        signal.signal(signal.SIGTERM, self.record_signal)
        signal.signal(signal.SIGINT, self.record_signal)
        exit_code = EXIT_OK
        while self.signal_received is None:
            died = self.reap()
            if died:
                for child in died:
                    log.error(
                        "[%d] %s (pid %d) exited with status %s; stopping the server",
                        os.getpid(),
                        child.name,
                        child.process.pid,
                        child.exit_status,
                    )
                exit_code = EXIT_CHILD_DIED
                break
            time.sleep(POLL_INTERVAL_S)
        if self.signal_received is not None:
            log.info(
                "[%d] received signal %d; stopping", os.getpid(), self.signal_received
            )
        self.stop_all()
        return exit_code

    def reap(self) -> list[Child]:
        died = []
        for child in self.children:
            if child.exit_status is None and child.process.poll() is not None:
                child.exit_status = child.process.returncode
                died.append(child)
        return died

    def stop_all(self) -> None:
        """Stop the router first (no new connections), then workers, then the matchmaker."""
        order = sorted(
            self.children, key=lambda child: _STOP_ORDER[child.name.split()[0]]
        )
        for group in ("router", "worker", "matchmaker"):
            members = [child for child in order if child.name.split()[0] == group]
            for child in members:
                if child.process.poll() is None:
                    child.process.send_signal(signal.SIGTERM)
            for child in members:
                self.wait(child)

    def wait(self, child: Child) -> None:
        try:
            status = child.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.error(
                "[%d] %s (pid %d) did not stop in %.0f s; killing it",
                os.getpid(),
                child.name,
                child.process.pid,
                STOP_TIMEOUT_S,
            )
            child.process.kill()
            status = child.process.wait()
        log.info(
            "[%d] %s (pid %d) exited with status %d",
            os.getpid(),
            child.name,
            child.process.pid,
            status,
        )


_STOP_ORDER = {"router": 0, "worker": 1, "matchmaker": 2}


def serve(options: Options) -> int:
    """Run ``shardchat serve``: listen, spawn, print the address, supervise.

    Raises:
        ConfigurationError: the data directory is in use by another server,
            or the address cannot be listened on.
    """
    lock = lock_data_dir(options.data_dir)
    supervisor = Supervisor(options)
    try:
        listener = supervisor.listen()
    except OSError as exc:
        lock.close()
        raise ConfigurationError(
            f"cannot listen on {options.host}:{options.port}: {exc.strerror or exc}"
        ) from None
    host = options.host if ":" not in options.host else f"[{options.host}]"
    supervisor.spawn_all(listener)
    print(f"shardchat listening on http://{host}:{supervisor.port}", flush=True)
    try:
        return supervisor.run()
    finally:
        lock.close()


def lock_data_dir(data_dir: Path):
    """Hold an exclusive lock on the data directory while the server runs.

    Two servers writing the same chat log files would mix their chats, so a
    second one is rejected. The kernel drops the lock when the process ends,
    even by SIGKILL, so a stale lock file never blocks a restart.
    """
    path = data_dir / LOCK_FILE_NAME
    lock = open(path, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise ConfigurationError(
            f"data directory {data_dir} is in use by another shardchat serve "
            f"(pid {holder}); stop it or choose another --data-dir"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock
