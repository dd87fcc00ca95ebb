"""Entry point of the router process, started by the supervisor."""

import argparse
import socket
from pathlib import Path

import trio

from router import server
from shardchat import process, tokens


def main() -> None:
    parser = argparse.ArgumentParser(prog="router")
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--handoff-fds", required=True, help="comma-separated, by slot")
    parser.add_argument("--matchmaker-fd", type=int, required=True)
    parser.add_argument("--matchmaker-pid", type=int, required=True)
    parser.add_argument("--worker-pids", required=True, help="comma-separated, by slot")
    parser.add_argument("--secret-file", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--socket-path", default="/socket")
    parser.add_argument("--insecure-join-identity", action="store_true")
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args()
    process.prepare_child(args.parent_pid)
    process.setup_logging(args.log_level)
    pids = {
        "matchmaker": args.matchmaker_pid,
        "workers": [int(pid) for pid in args.worker_pids.split(",")],
    }
    trio.run(
        server.run,
        socket.socket(fileno=args.listen_fd),
        [socket.socket(fileno=int(fd)) for fd in args.handoff_fds.split(",")],
        socket.socket(fileno=args.matchmaker_fd),
        tokens.load_secret(args.secret_file),
        args.data_dir,
        pids,
        args.socket_path,
        args.insecure_join_identity,
    )


if __name__ == "__main__":
    main()
