"""The router process.

The router owns the listening socket. For each connection it reads only the
HTTP request head, under a deadline and a size cap. It responds to plain
requests itself (health, stats, chat logs, pages, errors). For a websocket
upgrade it verifies the token, picks the worker by rendezvous hashing and
passes the socket itself to that worker with SCM_RIGHTS, together with every
byte already read. It never reads a websocket frame.
"""

from __future__ import annotations

import array
import base64
import binascii
import itertools
import json
import logging
import os
import re
import secrets
import signal
import socket
from pathlib import Path
from typing import Any

import msgpack
import trio

from shardchat import chatlog, http, phoenix, placement, process, tokens
from shardchat.exceptions import HandshakeError, TokenError
from shardchat.ipc import Link

log = logging.getLogger("shardchat.router")

HEAD_TIMEOUT_S = 10.0
# Unexpected request failures logged with a traceback; later ones are counted.
FAILURES_LOGGED = 10
# Connections accepted per wakeup before other tasks get a turn.
ACCEPT_BATCH = 64
READ_SIZE = 8192
STATS_TIMEOUT_S = 5.0
# phoenix.js sends its authToken option as this Sec-WebSocket-Protocol entry.
BEARER_PREFIX = "base64url.bearer.phx."
CHAT_LOG_PATH = re.compile(r"^/chats/([A-Za-z0-9_-]{1,64})/messages$")
PAGES_DIR = Path(__file__).resolve().parent.parent / "shardchat" / "pages"
# Page routes -> files under the pages directory.
PAGES = {
    "/": "index.html",
    "/student": "student.html",
    "/teacher": "teacher.html",
    "/dashboard": "dashboard.html",
}
# Only page files are served: the npm manifest and lock file in the same
# folder are not.
ASSET_PATH = re.compile(
    r"^/assets/([A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}\.(?:html|js|css|png|svg))$"
)
PHOENIX_JS = Path("node_modules") / "phoenix" / "priv" / "static" / "phoenix.js"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}


class Router:
    """Routing state shared by the connection tasks."""

    def __init__(
        self,
        handoffs: list[socket.socket],
        matchmaker: Link,
        secret: bytes,
        data_dir: Path,
        pids: dict[str, Any],
        socket_path: str = "/socket",
        pages_dir: Path = PAGES_DIR,
        insecure_join_identity: bool = False,
    ) -> None:
        self.pages_dir = pages_dir
        self.insecure_join_identity = insecure_join_identity
        for sock in handoffs:
            sock.setblocking(False)
        self.handoff_sockets = handoffs
        self.handoffs = [trio.socket.from_stdlib_socket(sock) for sock in handoffs]
        self.handoff_locks = [trio.Lock() for _ in handoffs]
        self.slots = len(handoffs)
        self.matchmaker = matchmaker
        self.secret = secret
        self.data_dir = data_dir
        self.pids = pids
        base = socket_path.rstrip("/") or ""
        self.websocket_paths = {f"{base}/websocket", base or "/"}
        self._request_ids = itertools.count(1)
        self._pending: dict[int, trio.MemorySendChannel] = {}
        self.handed_off = 0
        self.failures = 0

    # Accepting.

    async def serve(self, listener: socket.socket) -> None:
        """Accept connections; hand off those whose upgrade has fully arrived at once.

        Most clients send the whole request head in the first segment, so it
        is usually readable right after accept. Such an upgrade is checked and
        handed off on the spot, without a task, a timer or a second wait, which
        roughly halves the router's CPU per connection. Anything else (a head
        still arriving, a plain HTTP request, a rejection to send, a full
        hand-off socket) goes to a task of its own.
        """
        listener.setblocking(False)
        async with trio.open_nursery() as nursery:
            while True:
                await trio.lowlevel.wait_readable(listener)
                for _ in range(ACCEPT_BATCH):
                    try:
                        client, address = listener.accept()
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        # EMFILE and friends: wait instead of spinning.
                        log.error("accept failed: %s; retrying in 100 ms", exc)
                        await trio.sleep(0.1)
                        break
                    try:
                        received = self.hand_off_at_once(client, address)
                    except Exception:
                        # One bad connection must never stop the router.
                        self.log_failure(address)
                        client.close()
                        continue
                    if received is not None:
                        nursery.start_soon(
                            self.handle_client,
                            trio.socket.from_stdlib_socket(client),
                            address,
                            received,
                        )

    def hand_off_at_once(self, client: socket.socket, address: Any) -> bytes | None:
        """Hand off an upgrade whose head is already here.

        Returns None when done, else the bytes read so far for the task path.
        """
        client.setblocking(False)
        try:
            received = client.recv(READ_SIZE)
        except BlockingIOError:
            return b""
        except OSError:
            client.close()
            return None
        head_size = http.head_length(received)
        if not head_size or head_size > http.MAX_HEAD_BYTES:
            return received
        try:
            request = http.parse_head(received[:head_size])
            if request.path not in self.websocket_paths:
                return received
            identity, vsn = self.admit(request)
        except HandshakeError:
            return received
        slot, message = self.handoff_message(identity, vsn, received, address)
        try:
            self.handoff_sockets[slot].sendmsg(
                [message],
                [
                    (
                        socket.SOL_SOCKET,
                        socket.SCM_RIGHTS,
                        array.array("i", [client.fileno()]),
                    )
                ],
            )
        except BlockingIOError:
            return received
        except OSError as exc:
            log.error("hand-off to worker slot %d failed: %s", slot, exc)
            return received
        self.handed_off += 1
        client.close()
        return None

    async def handle_client(
        self, client: trio.socket.SocketType, address: Any, received: bytes = b""
    ) -> None:
        handed_off = False
        try:
            handed_off = await self.route(client, address, received)
        except OSError as exc:
            log.debug("client %s: %s", address, exc)
        except Exception:
            # One bad connection must never stop the router.
            self.log_failure(address)
        finally:
            if not handed_off:
                client.close()

    def log_failure(self, address: Any) -> None:
        """Log an unexpected error on one connection, with its traceback the first times."""
        self.failures += 1
        if self.failures <= FAILURES_LOGGED:
            log.exception(
                "client %s: request handling failed; connection closed", address
            )
        elif self.failures % FAILURES_LOGGED == 0:
            log.error(
                "%d requests failed so far; see the first tracebacks", self.failures
            )

    async def route(
        self, client: trio.socket.SocketType, address: Any, initial: bytes = b""
    ) -> bool:
        """Respond to or hand off one connection; return True if it was handed off."""
        received = await self.read_head(client, initial)
        if received is None:
            return False
        head_size = http.head_length(received)
        try:
            request = http.parse_head(bytes(received[:head_size]))
        except HandshakeError as exc:
            await _send(client, http.text_response(exc.status, str(exc)))
            return False
        if request.path in self.websocket_paths:
            return await self.upgrade(client, address, request, bytes(received))
        if request.method != "GET":
            await _send(client, http.text_response(405, "method not allowed"))
        elif request.path == "/healthz":
            await _send(client, http.text_response(200, "ok"))
        elif request.path == "/stats":
            await _send(client, await self.stats_response())
        elif (match := CHAT_LOG_PATH.match(request.path)) is not None:
            await _send(client, await self.chat_log_response(match.group(1)))
        elif request.path in PAGES:
            await _send(client, await self.file_response(PAGES[request.path]))
        elif request.path == "/vendor/phoenix.js":
            await _send(client, await self.phoenix_js_response())
        elif (match := ASSET_PATH.match(request.path)) is not None:
            await _send(client, await self.file_response(match.group(1)))
        else:
            await _send(client, http.text_response(404, f"not found: {request.path}"))
        return False

    async def read_head(
        self, client: trio.socket.SocketType, initial: bytes = b""
    ) -> bytearray | None:
        """Read until the end of the request head, or respond 408/431 and return None."""
        buffer = bytearray(initial)
        with trio.move_on_after(HEAD_TIMEOUT_S):
            while not http.head_length(buffer):
                if len(buffer) > http.MAX_HEAD_BYTES:
                    await _send(
                        client, http.text_response(431, "request head too large")
                    )
                    return None
                data = await client.recv(READ_SIZE)
                if not data:
                    return None
                buffer += data
            if http.head_length(buffer) > http.MAX_HEAD_BYTES:
                await _send(client, http.text_response(431, "request head too large"))
                return None
            return buffer
        await _send(client, http.text_response(408, "request head timed out"))
        return None

    # Websocket hand-off.

    async def upgrade(
        self,
        client: trio.socket.SocketType,
        address: Any,
        request: http.Request,
        received: bytes,
    ) -> bool:
        try:
            identity, vsn = self.admit(request)
        except HandshakeError as exc:
            log.info("client %s: upgrade rejected (%d): %s", address, exc.status, exc)
            await _send(client, http.text_response(exc.status, str(exc)))
            return False
        slot, message = self.handoff_message(identity, vsn, received, address)
        fds = array.array("i", [client.fileno()])
        try:
            async with self.handoff_locks[slot]:
                await self.handoffs[slot].sendmsg(
                    [message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)]
                )
        except OSError as exc:
            log.error("hand-off to worker slot %d failed: %s", slot, exc)
            await _send(client, http.text_response(503, "worker unavailable"))
            return False
        self.handed_off += 1
        # Close only this process's copy; shutdown() would cut the worker's too.
        client.close()
        return True

    def handoff_message(
        self, identity: tokens.Identity, vsn: str, received: bytes, address: Any
    ) -> tuple[int, bytes]:
        """Pick the worker slot and pack what it needs to take the socket over."""
        key = identity.chat_id if identity.chat_id is not None else identity.user_id
        slot = placement.place(key, self.slots)
        message = msgpack.packb(
            {
                "head": received,
                "identity": list(identity),
                "vsn": vsn,
                "peer": f"{address[0]}:{address[1]}",
            }
        )
        return slot, message

    def admit(self, request: http.Request) -> tuple[tokens.Identity, str]:
        """Check an upgrade request; return the identity and serializer version.

        Raises:
            HandshakeError: 400 for a malformed upgrade, 403 for a bad token or
                an unsupported serializer version.
        """
        if request.method != "GET" or not request.is_websocket_upgrade():
            raise HandshakeError(
                400, "expected a websocket upgrade (GET with Upgrade: websocket)"
            )
        vsn = request.query.get("vsn", phoenix.SERIALIZER_V1)
        if vsn not in phoenix.SERIALIZERS:
            raise HandshakeError(
                403,
                f"unsupported serializer vsn {vsn!r}: expected one of {', '.join(phoenix.SERIALIZERS)}",
            )
        token = request.query.get("token") or _bearer_token(request)
        if not token and self.insecure_join_identity:
            # The join payloads name the user, so place by the userId
            # parameter when the client sends one.
            user_id = request.query.get("userId") or secrets.token_hex(8)
            return tokens.Identity(user_id, tokens.ANONYMOUS_ROLE, 0), vsn
        if not token:
            raise HandshakeError(403, "missing token")
        try:
            identity = tokens.verify(self.secret, token)
        except TokenError as exc:
            raise HandshakeError(403, str(exc)) from None
        chat_id = request.query.get("chat")
        if chat_id is not None and identity.chat_id != chat_id:
            raise HandshakeError(403, f"token is not valid for chat {chat_id!r}")
        return identity, vsn

    # Plain endpoints.

    async def stats_response(self) -> bytes:
        try:
            stats = await self.request_stats()
        except trio.TooSlowError:
            return http.text_response(503, "matchmaker did not answer in time")
        stats["cpu_s"] = self.cpu_seconds()
        stats["router"] = {"handed_off": self.handed_off}
        return http.response(
            200, json.dumps(stats).encode(), content_type="application/json"
        )

    async def request_stats(self) -> dict[str, Any]:
        request_id = next(self._request_ids)
        send, receive = trio.open_memory_channel(1)
        self._pending[request_id] = send
        try:
            self.matchmaker.send({"op": "stats", "req": request_id})
            with trio.fail_after(STATS_TIMEOUT_S):
                return await receive.receive()
        finally:
            self._pending.pop(request_id, None)

    async def run_matchmaker_link(self) -> None:
        async for message in self.matchmaker.messages():
            channel = self._pending.get(message.get("req"))
            if channel is not None:
                channel.send_nowait(message["stats"])
        log.error("matchmaker link closed")

    def cpu_seconds(self) -> dict[str, Any]:
        router = process.cpu_seconds(os.getpid()) or 0.0
        matchmaker = process.cpu_seconds(self.pids["matchmaker"]) or 0.0
        workers = [process.cpu_seconds(pid) or 0.0 for pid in self.pids["workers"]]
        total = router + matchmaker + sum(workers)
        return {
            "router": router,
            "matchmaker": matchmaker,
            "workers": workers,
            "workers_total": sum(workers),
            "total": total,
        }

    async def chat_log_response(self, chat_id: str) -> bytes:
        chat = await trio.to_thread.run_sync(
            chatlog.read_chat, self.data_dir, self.slots, chat_id
        )
        if chat is None:
            return http.text_response(404, f"chat not found: {chat_id}")
        return http.response(
            200, json.dumps(chat).encode(), content_type="application/json"
        )

    async def file_response(self, name: str) -> bytes:
        path = self.pages_dir / name
        try:
            body = await trio.to_thread.run_sync(path.read_bytes)
        except FileNotFoundError:
            return http.text_response(404, f"not found: {name}")
        content_type = CONTENT_TYPES.get(path.suffix, "application/octet-stream")
        return http.response(200, body, content_type=content_type)

    async def phoenix_js_response(self) -> bytes:
        path = self.pages_dir / PHOENIX_JS
        try:
            body = await trio.to_thread.run_sync(path.read_bytes)
        except FileNotFoundError:
            return http.text_response(
                503,
                f"phoenix.js is not installed: run `npm ci --prefix {self.pages_dir}` "
                "and reload the page",
            )
        return http.response(200, body, content_type=CONTENT_TYPES[".js"])


def _bearer_token(request: http.Request) -> str | None:
    for item in request.headers.get("sec-websocket-protocol", "").split(","):
        item = item.strip()
        if item.startswith(BEARER_PREFIX):
            encoded = item[len(BEARER_PREFIX) :]
            try:
                return base64.urlsafe_b64decode(
                    encoded + "=" * (-len(encoded) % 4)
                ).decode()
            except (binascii.Error, ValueError):
                # ValueError covers non-ASCII text and UnicodeDecodeError.
                return None
    return None


async def _send(client: trio.socket.SocketType, data: bytes) -> None:
    with trio.move_on_after(HEAD_TIMEOUT_S):
        view = memoryview(data)
        while view:
            sent = await client.send(view)
            view = view[sent:]


async def run(
    listener: socket.socket,
    handoffs: list[socket.socket],
    matchmaker: socket.socket,
    secret: bytes,
    data_dir: Path,
    pids: dict[str, Any],
    socket_path: str,
    insecure_join_identity: bool = False,
) -> None:
    """Run the router until SIGTERM."""
    link = Link(matchmaker, "router -> matchmaker")
    router = Router(
        handoffs,
        link,
        secret,
        data_dir,
        pids,
        socket_path,
        insecure_join_identity=insecure_join_identity,
    )
    log.info("router started for %d worker slots", len(handoffs))
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.run_writer)
            nursery.start_soon(router.run_matchmaker_link)
            nursery.start_soon(router.serve, listener)
            async for signum in signals:
                log.info("received signal %d; stopping", signum)
                break
            nursery.cancel_scope.cancel()
    log.info("router stopped after %d hand-offs", router.handed_off)
