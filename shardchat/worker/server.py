"""The worker process: receives handed-off sockets and runs their connections.

A worker receives each client socket from the router over a Unix
SOCK_SEQPACKET socket: one message carries the request head the router read,
the identity it verified, and the file descriptor itself (SCM_RIGHTS). It
talks to the matchmaker over a msgpack link for everything global: presence,
the queue, claims and the end of chats.
"""

from __future__ import annotations

import array
import collections
import functools
import itertools
import logging
import signal
import socket
from pathlib import Path
from typing import Any

import msgpack
import trio

from shardchat import phoenix, placement, tokens, websocket
from shardchat.chatlog import ChatLog
from shardchat.close_codes import CloseCode
from shardchat.exceptions import ConnectionClosed
from shardchat.ipc import Link
from shardchat.phoenix import Message
from shardchat.worker.chat import Chat
from shardchat.worker.connection import (
    STUDENT_TOPIC_PREFIX,
    TEACHERS_TOPIC,
    ClientConnection,
)
from shardchat.worker.proxy import ProxyWebSocket

log = logging.getLogger("shardchat.worker")

IDLE_TIMEOUT_S = 60.0
SWEEP_INTERVAL_S = 5.0
SHUTDOWN_CLOSE_TIMEOUT_S = 3.0
# Room for a request head up to the router's cap plus the identity fields.
HANDOFF_BUFFER = 64 * 1024
ENDED_CHATS_KEPT = 100_000
STATS_INTERVAL_S = 1.0
# Chats whose message counts go into each stats report (for the dashboard).
STATS_CHATS_LISTED = 200


class Worker:
    """The state of one worker slot."""

    def __init__(
        self,
        slot: int,
        slots: int,
        secret: bytes,
        data_dir: Path,
        ws_engine: str,
        idle_timeout: float = IDLE_TIMEOUT_S,
    ) -> None:
        self.slot = slot
        self.slots = slots
        self.secret = secret
        self.ws_engine = ws_engine
        self.idle_timeout = idle_timeout
        self.chat_log = ChatLog(data_dir, slot)
        self.matchmaker: Link | None = None
        self.connections: set[ClientConnection] = set()
        self.chats: dict[str, Chat] = {}
        self.ended_chats: collections.OrderedDict[str, str] = collections.OrderedDict()
        # Presence channels: user id -> {connection: join_ref}.
        self.teachers: dict[str, dict[ClientConnection, str | None]] = {}
        self.students: dict[str, dict[ClientConnection, str | None]] = {}
        self.pending: dict[int, tuple[ClientConnection, Message]] = {}
        self._request_ids = itertools.count(1)
        self._connection_ids = itertools.count(1)
        self.handoffs_failed = 0
        self.peers: dict[int, Link] = {}
        self.connections_by_id: dict[int, ClientConnection] = {}
        # Connections of peer workers whose chats live here: (slot, id) -> proxy.
        self.proxies: dict[tuple[int, int], ClientConnection] = {}
        self.frames_forwarded = 0
        self.insecure_join_identity = False
        self.connection_nursery: trio.Nursery | None = None

    # Chats.

    def owns_chat(self, chat_id: str) -> bool:
        return placement.place(chat_id, self.slots) == self.slot

    def chat_owner(self, chat_id: str) -> int:
        return placement.place(chat_id, self.slots)

    def chat_ended(self, chat_id: str) -> bool:
        return chat_id in self.ended_chats

    def get_or_create_chat(
        self,
        chat_id: str,
        teacher_id: str,
        student_id: str,
        created_at: float | None = None,
    ) -> Chat:
        chat = self.chats.get(chat_id)
        if chat is None:
            chat = Chat(chat_id, teacher_id, student_id, self.chat_log, created_at)
            self.chats[chat_id] = chat
        return chat

    def end_chat(self, chat: Chat, reason: str, *, notify_matchmaker: bool) -> None:
        chat.end(reason)
        self.chats.pop(chat.id, None)
        self.ended_chats[chat.id] = reason
        if len(self.ended_chats) > ENDED_CHATS_KEPT:
            self.ended_chats.popitem(last=False)
        if notify_matchmaker:
            self.send_matchmaker(
                {"op": "chat_ended", "chat_id": chat.id, "reason": reason}
            )

    # Presence.

    def presence_joined(
        self, connection: ClientConnection, topic: str, join_ref: str | None
    ) -> None:
        user_id = connection.identity.user_id
        table = self.teachers if topic == TEACHERS_TOPIC else self.students
        table.setdefault(user_id, {})[connection] = join_ref
        self.send_matchmaker(
            {"op": "join", "user": user_id, "role": connection.identity.role}
        )

    def presence_left(self, connection: ClientConnection, topic: str) -> None:
        user_id = connection.identity.user_id
        table = self.teachers if topic == TEACHERS_TOPIC else self.students
        channels = table.get(user_id)
        if channels is None or connection not in channels:
            return
        del channels[connection]
        if not channels:
            del table[user_id]
        self.send_matchmaker(
            {"op": "leave", "user": user_id, "role": connection.identity.role}
        )

    # Matchmaker link.

    def send_matchmaker(self, message: dict[str, Any]) -> None:
        if self.matchmaker is not None:
            self.matchmaker.send(message)

    def request_matchmaker(
        self, connection: ClientConnection, message: Message, op: str
    ) -> None:
        request_id = next(self._request_ids)
        self.pending[request_id] = (connection, message)
        self.send_matchmaker(
            {"op": op, "req": request_id, "user": connection.identity.user_id}
        )

    async def run_matchmaker_link(self, link: Link) -> None:
        self.matchmaker = link
        link.send({"op": "hello", "slot": self.slot})
        async for message in link.messages():
            self.handle_matchmaker(message)
        log.warning("slot %d: matchmaker link closed (matchmaker stopped)", self.slot)

    def handle_matchmaker(self, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "reply":
            entry = self.pending.pop(message["req"], None)
            if entry is None:
                return
            connection, request = entry
            connection.send_message(
                phoenix.reply(request, message["status"], message["response"])
            )
        elif op == "push":
            self.push_presence(
                message["user"], message["role"], message["event"], message["payload"]
            )
        elif op == "status":
            self.broadcast_teachers("user:status", message["payload"])
        elif op == "open_chat":
            chat = message["chat"]
            if chat["id"] not in self.ended_chats:
                self.get_or_create_chat(
                    chat["id"],
                    chat["teacher_id"],
                    chat["student_id"],
                    chat["created_at"],
                )
        elif op == "end_chat":
            chat = self.chats.get(message["chat_id"])
            if chat is not None:
                self.end_chat(chat, message["reason"], notify_matchmaker=False)
            else:
                self.ended_chats[message["chat_id"]] = message["reason"]
        else:
            log.warning("slot %d: unknown matchmaker op %r", self.slot, op)

    def push_presence(self, user_id: str, role: str, event: str, payload: Any) -> None:
        if role == "teacher":
            channels = self.teachers.get(user_id, {})
            topic = TEACHERS_TOPIC
        else:
            channels = self.students.get(user_id, {})
            topic = STUDENT_TOPIC_PREFIX + user_id
        for connection, join_ref in list(channels.items()):
            connection.push(join_ref, topic, event, payload)

    def broadcast_teachers(self, event: str, payload: Any) -> None:
        for channels in self.teachers.values():
            for connection, join_ref in channels.items():
                connection.push(join_ref, TEACHERS_TOPIC, event, payload)

    # Peer workers.

    def send_peer(self, slot: int, message: dict[str, Any]) -> None:
        link = self.peers.get(slot)
        if link is not None:
            link.send(message)

    def forward(
        self, connection: ClientConnection, slot: int, message: Message
    ) -> None:
        """Send a client frame for a chat owned by ``slot`` to that worker."""
        link = self.peers.get(slot)
        if link is None or link.closed:
            if message.ref is not None:
                connection.reply_error(message, "chat worker unavailable")
            return
        if slot not in connection.proxied_to:
            connection.proxied_to += (slot,)
            link.send(
                {
                    "op": "proxy_open",
                    "conn": connection.id,
                    "identity": list(connection.identity),
                    "vsn": connection.codec.version,
                }
            )
        link.send({"op": "proxy_in", "conn": connection.id, "message": list(message)})
        self.frames_forwarded += 1

    async def run_peer_link(self, slot: int, link: Link) -> None:
        self.peers[slot] = link
        async for message in link.messages():
            self.handle_peer(slot, link, message)
        log.error("slot %d: link to worker slot %d closed", self.slot, slot)
        self.peers.pop(slot, None)
        for key in [key for key in self.proxies if key[0] == slot]:
            self.proxies.pop(key).release_all()

    def handle_peer(self, slot: int, link: Link, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "proxy_in":
            proxy = self.proxies.get((slot, message["conn"]))
            if proxy is not None:
                proxy.handle(Message(*message["message"]))
        elif op == "proxy_out":
            connection = self.connections_by_id.get(message["conn"])
            if connection is not None:
                try:
                    connection.websocket.send(message["text"])
                except ConnectionClosed:
                    return
                connection.frames_sent += 1
        elif op == "proxy_open":
            key = (slot, message["conn"])
            identity = tokens.Identity(*message["identity"])
            websocket_proxy = ProxyWebSocket(link, message["conn"])
            proxy = ClientConnection(
                self,
                websocket_proxy,
                identity,
                phoenix.CODECS[message["vsn"]],
                message["conn"],
            )
            proxy.on_topic_closed = websocket_proxy.topic_closed
            self.proxies[key] = proxy
        elif op == "proxy_topic_closed":
            connection = self.connections_by_id.get(message["conn"])
            if connection is not None:
                connection.forwarded_topic_closed(message["topic"])
        elif op == "proxy_close":
            proxy = self.proxies.pop((slot, message["conn"]), None)
            if proxy is not None:
                proxy.release_all()
        else:
            log.warning(
                "slot %d: unknown op %r from worker slot %d", self.slot, op, slot
            )

    # Connections.

    async def run_handoffs(self, handoff: socket.socket, nursery: trio.Nursery) -> None:
        """Receive handed-off sockets and start a connection task for each."""
        channel = trio.socket.from_stdlib_socket(handoff)
        fd_space = socket.CMSG_SPACE(array.array("i", [0]).itemsize)
        while True:
            data, ancillary, flags, _ = await channel.recvmsg(HANDOFF_BUFFER, fd_space)
            if not data and not ancillary:
                log.warning(
                    "slot %d: router hand-off socket closed (router stopped)", self.slot
                )
                return
            fds = _received_fds(ancillary)
            if flags & socket.MSG_CTRUNC or not fds:
                # At the open-file limit the kernel drops the descriptor.
                self.handoffs_failed += 1
                log.error(
                    "slot %d: hand-off arrived without its socket (flags=%#x, "
                    "%d lost so far); check the open-file limit",
                    self.slot,
                    flags,
                    self.handoffs_failed,
                )
                for fd in fds:
                    socket.close(fd)
                continue
            for extra in fds[1:]:
                socket.close(extra)
            sock = socket.socket(fileno=fds[0])
            handoff_message = msgpack.unpackb(data, raw=False)
            nursery.start_soon(self.serve_socket, sock, handoff_message)

    async def serve_socket(self, sock: socket.socket, handoff: dict[str, Any]) -> None:
        identity = tokens.Identity(*handoff["identity"])
        codec = phoenix.CODECS[handoff["vsn"]]
        # A partial, not a closure: it is kept for the connection's lifetime
        # and costs less memory.
        handler = functools.partial(self.run_connection, identity, codec)
        await websocket.serve(
            sock,
            handoff.pop("head"),
            handler,
            engine=self.ws_engine,
            select_subprotocol=_select_subprotocol,
            nursery=self.connection_nursery,
        )

    async def run_connection(
        self,
        identity: tokens.Identity,
        codec: phoenix.Codec,
        websocket_connection: websocket.Connection,
    ) -> None:
        connection = ClientConnection(
            self, websocket_connection, identity, codec, next(self._connection_ids)
        )
        self.connections.add(connection)
        self.connections_by_id[connection.id] = connection
        try:
            await connection.run()
        finally:
            self.connections.discard(connection)
            del self.connections_by_id[connection.id]

    async def sweep_idle(self) -> None:
        """Close connections silent for longer than the idle timeout."""
        while True:
            await trio.sleep(min(SWEEP_INTERVAL_S, self.idle_timeout / 4))
            deadline = trio.current_time() - self.idle_timeout
            for connection in list(self.connections):
                if connection.last_seen < deadline:
                    log.info(
                        "slot %d: connection %d idle for %.0f s; closing",
                        self.slot,
                        connection.id,
                        self.idle_timeout,
                    )
                    self.connection_nursery.start_soon(
                        connection.websocket.close, CloseCode.GOING_AWAY, "idle timeout"
                    )

    async def close_all(self, code: CloseCode, reason: str) -> None:
        async with trio.open_nursery() as nursery:
            for connection in list(self.connections):
                nursery.start_soon(connection.websocket.close, code, reason)

    async def report_stats(self) -> None:
        """Send this worker's counters to the matchmaker once a second."""
        while True:
            await trio.sleep(STATS_INTERVAL_S)
            self.send_matchmaker({"op": "worker_stats", "stats": self.stats()})

    def stats(self) -> dict[str, Any]:
        return {
            "slot": self.slot,
            "connections": len(self.connections),
            "chats": len(self.chats),
            "messages": self.chat_log.messages_logged,
            "chat_messages": {
                chat_id: chat.seq
                for chat_id, chat in itertools.islice(
                    self.chats.items(), STATS_CHATS_LISTED
                )
            },
            "handoffs_failed": self.handoffs_failed,
            "frames_forwarded": self.frames_forwarded,
            "proxies": len(self.proxies),
        }


def _select_subprotocol(request: websocket.HandshakeRequest) -> str | None:
    # phoenix.js sends its authToken as a second subprotocol and expects
    # "phoenix" to be selected.
    return "phoenix" if "phoenix" in request.subprotocols else None


def _received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % array.array("i").itemsize
            fds.extend(array.array("i", data[:usable]))
    return fds


async def run(
    slot: int,
    slots: int,
    handoff: socket.socket,
    matchmaker: socket.socket,
    secret: bytes,
    data_dir: Path,
    ws_engine: str,
    idle_timeout: float = IDLE_TIMEOUT_S,
    peers: dict[int, socket.socket] | None = None,
    insecure_join_identity: bool = False,
) -> None:
    """Run a worker until SIGTERM, then close connections and flush the log."""
    worker = Worker(slot, slots, secret, data_dir, ws_engine, idle_timeout)
    worker.insecure_join_identity = insecure_join_identity
    link = Link(matchmaker, f"worker {slot} -> matchmaker")
    log.info("slot %d: worker started (engine %s)", slot, ws_engine)
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as flusher_nursery:
            flusher_nursery.start_soon(worker.chat_log.run_flusher)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(link.run_writer)
                nursery.start_soon(worker.run_matchmaker_link, link)
                for peer_slot, peer_socket in (peers or {}).items():
                    peer = Link(peer_socket, f"worker {slot} -> worker {peer_slot}")
                    nursery.start_soon(peer.run_writer)
                    nursery.start_soon(worker.run_peer_link, peer_slot, peer)
                connections = await nursery.start(_connection_nursery)
                worker.connection_nursery = connections
                nursery.start_soon(worker.run_handoffs, handoff, connections)
                nursery.start_soon(worker.sweep_idle)
                nursery.start_soon(worker.report_stats)
                async for signum in signals:
                    log.info("slot %d: received signal %d; stopping", slot, signum)
                    break
                with trio.move_on_after(SHUTDOWN_CLOSE_TIMEOUT_S):
                    await worker.close_all(CloseCode.GOING_AWAY, "server shutting down")
                nursery.cancel_scope.cancel()
            flusher_nursery.cancel_scope.cancel()
    worker.chat_log.close()
    log.info(
        "slot %d: worker stopped; %d chat log rows written",
        slot,
        worker.chat_log.rows_written,
    )


async def _connection_nursery(task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with trio.open_nursery() as nursery:
        task_status.started(nursery)
        await trio.sleep_forever()
