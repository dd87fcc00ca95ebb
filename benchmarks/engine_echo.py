"""Measure a websocket engine's server CPU time per echoed message.

The server runs serve() with an echo handler in a subprocess pinned to CPU 0.
This process, pinned to CPU 1, opens --connections client connections with
shardchat.websocket.connect() on 127.0.0.1, and each one sends a Phoenix-style
chat message and waits for its echo, over and over. After a warm-up, the server
reports its time.process_time() and message count over --duration seconds, and
the CPU time per message is their quotient. The client is always the wsproto
client, so only the server engine changes between runs.

    python benchmarks/engine_echo.py --engine wsproto --connections 100 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shardchat.exceptions import ConnectionClosed
from shardchat.websocket import ENGINES, Connection, connect, serve

SERVER_CPU = 0
CLIENT_CPU = 1
WARM_UP_SECONDS = 0.5
MESSAGE = (
    '["3","17","chat:lesson:4711","new_msg",'
    '{"body":"Could you explain the second step of the proof again?"}]'
)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--engine", choices=ENGINES, default="wsproto", help="server engine"
    )
    parser.add_argument(
        "--connections", type=int, default=100, help="client connections"
    )
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def pin_to_cpu(cpu: int) -> bool:
    """Pin this process to cpu, or return False when the machine lacks that CPU."""
    if cpu not in os.sched_getaffinity(0):
        return False
    os.sched_setaffinity(0, {cpu})
    return True


# Server process


class EchoServer:
    def __init__(self, engine: str) -> None:
        self.engine = engine
        self.messages = 0

    async def echo(self, connection: Connection) -> None:
        while True:
            message = await connection.receive()
            assert isinstance(message, str)
            connection.send(message)
            self.messages += 1

    async def run(self) -> None:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1024)
            listener.setblocking(False)
            print(listener.getsockname()[1], flush=True)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.accept_connections, listener, nursery)
                await self.report_on_commands()
                nursery.cancel_scope.cancel()

    async def accept_connections(
        self, listener: socket.socket, nursery: trio.Nursery
    ) -> None:
        while True:
            await trio.lowlevel.wait_readable(listener)
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                continue
            nursery.start_soon(self.serve_one, sock)

    async def serve_one(self, sock: socket.socket) -> None:
        await serve(sock, b"", self.echo, engine=self.engine)

    async def report_on_commands(self) -> None:
        """Record the figures at a "start" line on stdin, and print them at "stop"."""
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        buffer = b""
        start = (0.0, 0.0, 0)
        async with stdin:
            while True:
                while b"\n" not in buffer:
                    data = await stdin.receive_some()
                    if not data:
                        return
                    buffer += data
                line, buffer = buffer.split(b"\n", 1)
                if line == b"start":
                    start = (time.process_time(), time.perf_counter(), self.messages)
                elif line == b"stop":
                    result = {
                        "server_cpu_seconds": time.process_time() - start[0],
                        "wall_seconds": time.perf_counter() - start[1],
                        "messages": self.messages - start[2],
                    }
                    print(json.dumps(result), flush=True)
                    return


# Client process


class EchoClients:
    def __init__(self, port: int, connections: int) -> None:
        self.port = port
        self.connections = connections
        self.opened = 0
        self.all_open = trio.Event()
        self.echoes = 0

    async def ping_pong(self) -> None:
        async with connect("127.0.0.1", self.port, "/socket/websocket") as client:
            self.opened += 1
            if self.opened == self.connections:
                self.all_open.set()
            try:
                while True:
                    client.send(MESSAGE)
                    await client.receive()
                    self.echoes += 1
            except ConnectionClosed:
                pass


async def read_line(stream: trio.abc.ReceiveStream, buffer: bytearray) -> bytes:
    while b"\n" not in buffer:
        data = await stream.receive_some()
        if not data:
            raise RuntimeError("benchmark server exited early")
        buffer += data
    end = buffer.index(b"\n")
    line = bytes(buffer[:end])
    del buffer[: end + 1]
    return line


async def measure(arguments: argparse.Namespace) -> dict[str, object]:
    command = [sys.executable, __file__, "--serve", "--engine", arguments.engine]
    process = await trio.lowlevel.open_process(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert process.stdin is not None
    assert process.stdout is not None
    buffer = bytearray()
    try:
        with trio.fail_after(10):
            port = int(await read_line(process.stdout, buffer))
        clients = EchoClients(port, arguments.connections)
        async with trio.open_nursery() as nursery:
            for _ in range(arguments.connections):
                nursery.start_soon(clients.ping_pong)
            with trio.fail_after(30):
                await clients.all_open.wait()
            await trio.sleep(WARM_UP_SECONDS)

            await process.stdin.send_all(b"start\n")
            client_cpu = time.process_time()
            await trio.sleep(arguments.duration)
            await process.stdin.send_all(b"stop\n")
            client_cpu = time.process_time() - client_cpu
            with trio.fail_after(10):
                server = json.loads(await read_line(process.stdout, buffer))
            nursery.cancel_scope.cancel()
    finally:
        process.kill()
        await process.wait()

    messages = server["messages"]
    return {
        "engine": arguments.engine,
        "connections": arguments.connections,
        "message_bytes": len(MESSAGE),
        "duration_seconds": server["wall_seconds"],
        "messages": messages,
        "messages_per_second": messages / server["wall_seconds"],
        "server_cpu_seconds": server["server_cpu_seconds"],
        "server_cpu_us_per_message": server["server_cpu_seconds"] / messages * 1e6,
        "client_cpu_us_per_message": client_cpu / messages * 1e6,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
    }


def main() -> None:
    arguments = parse_arguments()
    if arguments.serve:
        pin_to_cpu(SERVER_CPU)
        trio.run(EchoServer(arguments.engine).run)
        return

    pinned = pin_to_cpu(CLIENT_CPU)
    if not pinned:
        print("warning: CPU 1 is not available, so server and client share a CPU")
    result = trio.run(measure, arguments)
    result["pinned"] = pinned
    print(
        f"{result['engine']}: {result['server_cpu_us_per_message']:.1f} us server "
        f"CPU per message, {result['client_cpu_us_per_message']:.1f} us client CPU, "
        f"{result['messages_per_second']:.0f} messages/s over "
        f"{result['connections']} connections"
    )
    if arguments.json is not None:
        arguments.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
