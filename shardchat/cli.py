"""The ``shardchat`` command: serve, token, logs, bench."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import sys
from pathlib import Path

from shardchat import chatlog, process, tokens
from shardchat.exceptions import ConfigurationError, ShardchatError

DEFAULT_DATA_DIR = Path("shardchat-data")


def usable_cores() -> int:
    """Return the number of CPUs this process may run on."""
    count = getattr(os, "process_cpu_count", None)
    if count is not None:
        return count() or 1
    return len(os.sched_getaffinity(0)) or 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardchat", description="Live tutoring chat server over Phoenix Channels."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument(
        "--workers",
        type=int,
        default=usable_cores(),
        help="number of worker processes (default: usable cores, %(default)s)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument(
        "--port",
        type=int,
        default=4000,
        help="TCP port; 0 picks a free one and prints it",
    )
    serve.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="directory for the secret and the chat logs",
    )
    serve.add_argument(
        "--secret-file",
        type=Path,
        help="token signing secret, hex (default: DATA_DIR/secret, "
        "generated with mode 0600 when missing)",
    )
    serve.add_argument(
        "--ws-engine",
        default="wsproto",
        choices=("wsproto", "trio-websocket"),
        help="websocket engine",
    )
    serve.add_argument(
        "--socket-path",
        default="/socket",
        help="Phoenix socket path; PATH/websocket is the endpoint",
    )
    serve.add_argument(
        "--idle-timeout",
        type=float,
        default=60.0,
        help="seconds without a frame before a connection is closed",
    )
    serve.add_argument(
        "--insecure-join-identity",
        action="store_true",
        help="development only: accept connections without a token and take the "
        'user id and role from join payloads ({"userId", "role"}); loopback hosts only',
    )
    serve.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error")
    )

    token = commands.add_parser("token", help="print a signed user token")
    token.add_argument("--user", required=True, help="user id")
    token.add_argument("--role", required=True, choices=tokens.ROLES)
    token.add_argument(
        "--ttl",
        type=int,
        default=tokens.DEFAULT_TTL_S,
        help="lifetime in seconds (default %(default)s)",
    )
    _add_secret_options(token)

    logs = commands.add_parser("logs", help="print a chat's messages in order")
    logs.add_argument("chat_id")
    logs.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    logs.add_argument("--json", action="store_true", help="print JSON instead of text")

    bench = commands.add_parser("bench", help="run the reference tutoring workload")
    from shardchat.bench import runner

    runner.add_arguments(bench)
    return parser


def _add_secret_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--secret-file",
        type=Path,
        help="token signing secret (default: DATA_DIR/secret)",
    )
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)


def run_serve(args: argparse.Namespace) -> int:
    from shardchat import supervisor

    if args.workers < 1:
        raise ConfigurationError(
            f"invalid --workers {args.workers}: must be at least 1"
        )
    if args.idle_timeout <= 0:
        raise ConfigurationError(
            f"invalid --idle-timeout {args.idle_timeout}: must be positive"
        )
    if not 0 <= args.port <= 65535:
        raise ConfigurationError(f"invalid --port {args.port}: must be 0 to 65535")
    if not args.socket_path.startswith("/"):
        raise ConfigurationError(
            f"invalid --socket-path {args.socket_path!r}: must start with /"
        )
    if args.insecure_join_identity and not _is_loopback(args.host):
        raise ConfigurationError(
            f"--insecure-join-identity is refused with --host {args.host}: it lets "
            "any client claim any identity, so it runs on loopback hosts only "
            "(127.0.0.1, ::1, localhost)"
        )
    data_dir = args.data_dir.resolve()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot create --data-dir {data_dir}: {exc}"
        ) from None
    secret_file = args.secret_file or tokens.ensure_secret(data_dir)
    tokens.load_secret(secret_file)  # fail here, not in every child
    process.setup_logging(args.log_level)
    options = supervisor.Options(
        workers=args.workers,
        host=args.host,
        port=args.port,
        data_dir=data_dir,
        secret_file=secret_file.resolve(),
        ws_engine=args.ws_engine,
        socket_path=args.socket_path,
        log_level=args.log_level,
        idle_timeout=args.idle_timeout,
        insecure_join_identity=args.insecure_join_identity,
    )
    if args.insecure_join_identity:
        logging.getLogger("shardchat").warning(
            "INSECURE: --insecure-join-identity is on; connections need no token and "
            "any client may claim any user id and role. Development use only."
        )
    return supervisor.serve(options)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_token(args: argparse.Namespace) -> int:
    secret_file = args.secret_file or args.data_dir / tokens.SECRET_FILE_NAME
    secret = tokens.load_secret(secret_file)
    try:
        token = tokens.mint(secret, args.user, args.role, ttl_s=args.ttl)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    print(token)
    return 0


def run_logs(args: argparse.Namespace) -> int:
    if not args.data_dir.is_dir():
        raise ConfigurationError(f"data directory not found: {args.data_dir}")
    chat = chatlog.read_chat(args.data_dir, None, args.chat_id)
    if chat is None:
        print(
            f"chat not found: {args.chat_id} (searched {args.data_dir})",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps(chat, indent=2))
        return 0
    info = chat["chat"]
    print(
        f"chat {info['id']}: teacher {info['teacher_id']}, student {info['student_id']}, "
        f"{info['message_count']} messages, ended: {info['end_reason'] or 'no'}"
    )
    for message in chat["messages"]:
        print(f"{message['seq']:>5} {message['sender']:<8} {message['body']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return run_serve(args)
        if args.command == "token":
            return run_token(args)
        if args.command == "logs":
            return run_logs(args)
        from shardchat.bench import runner

        return runner.run(args)
    except ShardchatError as exc:
        logging.getLogger("shardchat").debug("command failed", exc_info=True)
        print(f"shardchat: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of the output went away (`shardchat logs ID | head`).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
