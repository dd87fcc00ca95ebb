"""The matchmaker process: a trio shell around the matchmaking state machine.

Each worker and the router hold a msgpack link to this process. Events from
the links go to ``core.Matchmaker`` one at a time; its effects come back as
data and become messages here. Status pushes are coalesced: a timer sends the
counts at most once per ``STATUS_INTERVAL_S``, so a burst of 1000 joins costs
one push per teacher, not 1000.
"""

from __future__ import annotations

import logging
import secrets
import signal
import socket
import time
from typing import Any

import trio

from shardchat import placement, tokens
from shardchat.ipc import Link
from shardchat.matchmaker import core
from shardchat.matchmaker.core import Role

log = logging.getLogger("shardchat.matchmaker")

STATUS_INTERVAL_S = 0.05


class MatchmakerServer:
    """Routes link messages to the core and effects to the links."""

    def __init__(
        self, slots: int, secret: bytes, token_ttl_s: int = tokens.DEFAULT_TTL_S
    ):
        self.slots = slots
        self.secret = secret
        self.token_ttl_s = token_ttl_s
        self.core = core.Matchmaker(
            slots, place=placement.place, new_chat_id=_new_chat_id
        )
        self.workers: dict[int, Link] = {}
        self.worker_stats: dict[int, dict[str, Any]] = {}
        self.started_at = time.time()

    # Worker links.

    async def serve_worker(self, link: Link, expected_slot: int) -> None:
        async for message in link.messages():
            op = message["op"]
            if op == "hello":
                slot = message["slot"]
                if slot != expected_slot:
                    log.error(
                        "worker link %d reported slot %d; using %d",
                        expected_slot,
                        slot,
                        expected_slot,
                    )
                self.workers[expected_slot] = link
                log.info("worker slot %d connected", expected_slot)
            else:
                self.handle_worker(expected_slot, message)
        log.warning(
            "worker slot %d link closed; dropping its users and chats", expected_slot
        )
        self.workers.pop(expected_slot, None)
        self.worker_stats.pop(expected_slot, None)
        self.apply(expected_slot, self.core.worker_lost(expected_slot))

    def handle_worker(self, slot: int, message: dict[str, Any]) -> None:
        op = message["op"]
        matchmaker = self.core
        if op == "join":
            effects = matchmaker.join(message["user"], Role(message["role"]), slot)
            if message["role"] == "teacher":
                # A teacher who just joined gets the current counts at once
                # instead of waiting for the next change.
                self.send(
                    slot,
                    {
                        "op": "push",
                        "user": message["user"],
                        "role": "teacher",
                        "event": "user:status",
                        "payload": matchmaker.counts().to_payload(),
                    },
                )
        elif op == "leave":
            effects = matchmaker.leave(message["user"], Role(message["role"]), slot)
        elif op == "ready":
            effects = matchmaker.ready(message["req"], message["user"])
        elif op == "claim":
            effects = matchmaker.claim(message["req"], message["user"])
        elif op == "position":
            position = matchmaker.queue_positions().get(message["user"])
            response = {"position": None if position is None else position[0]}
            effects = [core.ReplyOk(message["req"], response)]
        elif op == "chat_ended":
            effects = matchmaker.chat_ended(message["chat_id"], message["reason"])
        elif op == "worker_stats":
            self.worker_stats[slot] = message["stats"]
            return
        else:
            log.warning("worker slot %d sent unknown op %r", slot, op)
            return
        self.apply(slot, effects)

    def apply(self, source: int, effects: list[Any]) -> None:
        """Turn the core's effects into link messages; ``source`` asked for them."""
        for effect in effects:
            if isinstance(effect, core.ChatAssigned):
                self.assign(source, effect)
            elif isinstance(effect, core.ReplyOk):
                self.send(
                    source,
                    {
                        "op": "reply",
                        "req": effect.request_id,
                        "status": "ok",
                        "response": effect.response,
                    },
                )
            elif isinstance(effect, core.ReplyError):
                self.send(
                    source,
                    {
                        "op": "reply",
                        "req": effect.request_id,
                        "status": "error",
                        "response": {"reason": effect.reason},
                    },
                )
            elif isinstance(effect, core.EndChat):
                self.send(
                    effect.chat.worker,
                    {
                        "op": "end_chat",
                        "chat_id": effect.chat.id,
                        "reason": effect.reason,
                    },
                )

    def assign(self, source: int, effect: core.ChatAssigned) -> None:
        chat = effect.chat
        ids = (chat.id, chat.teacher_id, chat.student_id)
        # The chat's worker hears of the chat first, so it usually has the
        # chat before a participant's join arrives; tokens cover the rest.
        self.send(
            chat.worker,
            {
                "op": "open_chat",
                "chat": {
                    "id": chat.id,
                    "teacher_id": chat.teacher_id,
                    "student_id": chat.student_id,
                    "created_at": chat.created_at,
                },
            },
        )
        teacher_chat = self.chat_payload(chat, chat.teacher_id, "teacher", ids)
        student_chat = self.chat_payload(chat, chat.student_id, "student", ids)
        self.send(
            source,
            {
                "op": "reply",
                "req": effect.request_id,
                "status": "ok",
                "response": {"chat": teacher_chat},
            },
        )
        for slot in effect.teacher_workers:
            self.send(
                slot,
                {
                    "op": "push",
                    "user": chat.teacher_id,
                    "role": "teacher",
                    "event": f"new:chat:{chat.teacher_id}",
                    "payload": teacher_chat,
                },
            )
        for slot in effect.student_workers:
            self.send(
                slot,
                {
                    "op": "push",
                    "user": chat.student_id,
                    "role": "student",
                    "event": "new:chat",
                    "payload": student_chat,
                },
            )

    def chat_payload(
        self, chat: core.Chat, user_id: str, role: str, ids: tuple[str, str, str]
    ) -> dict[str, str]:
        token = tokens.mint(
            self.secret, user_id, role, ttl_s=self.token_ttl_s, chat=ids
        )
        return {
            "id": chat.id,
            "teacher_id": chat.teacher_id,
            "student_id": chat.student_id,
            "token": token,
        }

    def send(self, slot: int, message: dict[str, Any]) -> None:
        link = self.workers.get(slot)
        if link is None:
            log.debug("no link to worker slot %d; dropped %s", slot, message["op"])
            return
        link.send(message)

    async def push_status(self) -> None:
        while True:
            await trio.sleep(STATUS_INTERVAL_S)
            counts = self.core.take_status()
            if counts is None:
                continue
            message = {"op": "status", "payload": counts.to_payload()}
            for slot in self.core.teacher_workers():
                self.send(slot, message)

    # Router link.

    async def serve_router(self, link: Link) -> None:
        async for message in link.messages():
            if message["op"] == "stats":
                link.send({"op": "reply", "req": message["req"], "stats": self.stats()})
        log.info("router link closed")

    def stats(self) -> dict[str, Any]:
        snapshot = self.core.snapshot()
        snapshot["teachers_chats"] = snapshot.pop("teachers")
        snapshot.update(snapshot.pop("counts"))
        snapshot["chats_in_progress"] = len(snapshot["chats"])
        snapshot["workers"] = [
            self.worker_stats.get(slot) for slot in range(self.slots)
        ]
        # Message counts live on the chats' workers, which report them.
        counts: dict[str, int] = {}
        for stats in self.worker_stats.values():
            counts.update(stats.get("chat_messages", {}))
        for chat in snapshot["chats"]:
            chat["message_count"] = counts.get(chat["id"], 0)
        for stats in snapshot["workers"]:
            if stats is not None:
                stats.pop("chat_messages", None)
        snapshot["uptime_s"] = time.time() - self.started_at
        snapshot["server_time"] = time.time()
        return snapshot


def _new_chat_id() -> str:
    return secrets.token_hex(8)


async def run(
    slots: int,
    worker_sockets: list[socket.socket],
    router_socket: socket.socket,
    secret: bytes,
) -> None:
    """Run the matchmaker until SIGTERM."""
    server = MatchmakerServer(slots, secret)
    links = [
        Link(sock, f"matchmaker -> worker {slot}")
        for slot, sock in enumerate(worker_sockets)
    ]
    router = Link(router_socket, "matchmaker -> router")
    log.info("matchmaker started for %d worker slots", slots)
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            for slot, link in enumerate(links):
                nursery.start_soon(link.run_writer)
                nursery.start_soon(server.serve_worker, link, slot)
            nursery.start_soon(router.run_writer)
            nursery.start_soon(server.serve_router, router)
            nursery.start_soon(server.push_status)
            async for signum in signals:
                log.info("received signal %d; stopping", signum)
                break
            nursery.cancel_scope.cancel()
    log.info("matchmaker stopped")
