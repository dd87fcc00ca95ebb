"""Entry point of a worker process, started by the supervisor."""

import argparse
import socket
from pathlib import Path

import trio

from shardchat import process, tokens
from shardchat.worker import server


def main() -> None:
    parser = argparse.ArgumentParser(prog="shardchat.worker")
    parser.add_argument("--slot", type=int, required=True)
    parser.add_argument("--slots", type=int, required=True)
    parser.add_argument("--handoff-fd", type=int, required=True)
    parser.add_argument("--matchmaker-fd", type=int, required=True)
    parser.add_argument("--secret-file", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--ws-engine", default="wsproto")
    parser.add_argument(
        "--peer-fds", default="", help="links to other workers: SLOT:FD,SLOT:FD"
    )
    parser.add_argument("--idle-timeout", type=float, default=server.IDLE_TIMEOUT_S)
    parser.add_argument("--insecure-join-identity", action="store_true")
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args()
    process.prepare_child(args.parent_pid)
    process.setup_logging(args.log_level)
    handoff = socket.socket(fileno=args.handoff_fd)
    matchmaker = socket.socket(fileno=args.matchmaker_fd)
    peers = {}
    for item in filter(None, args.peer_fds.split(",")):
        peer_slot, _, fd = item.partition(":")
        peers[int(peer_slot)] = socket.socket(fileno=int(fd))
    trio.run(
        server.run,
        args.slot,
        args.slots,
        handoff,
        matchmaker,
        tokens.load_secret(args.secret_file),
        args.data_dir,
        args.ws_engine,
        args.idle_timeout,
        peers,
        args.insecure_join_identity,
    )


if __name__ == "__main__":
    main()
