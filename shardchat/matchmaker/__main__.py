"""Entry point of the matchmaker process, started by the supervisor."""

import argparse
import socket
from pathlib import Path

import trio

from shardchat import process, tokens
from shardchat.matchmaker import server


def main() -> None:
    parser = argparse.ArgumentParser(prog="shardchat.matchmaker")
    parser.add_argument("--worker-fds", required=True, help="comma-separated, by slot")
    parser.add_argument("--router-fd", type=int, required=True)
    parser.add_argument("--secret-file", type=Path, required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args()
    process.prepare_child(args.parent_pid)
    process.setup_logging(args.log_level)
    worker_sockets = [
        socket.socket(fileno=int(fd)) for fd in args.worker_fds.split(",")
    ]
    trio.run(
        server.run,
        len(worker_sockets),
        worker_sockets,
        socket.socket(fileno=args.router_fd),
        tokens.load_secret(args.secret_file),
    )


if __name__ == "__main__":
    main()
