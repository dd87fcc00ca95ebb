"""A small Phoenix Channels client for the end-to-end tests."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from shardchat import phoenix, websocket
from shardchat.phoenix import Message

TIMEOUT_S = 10.0


class PhoenixClient:
    """One websocket connection speaking serializer 2.0.0."""

    def __init__(self, connection: websocket.Connection) -> None:
        self.connection = connection
        self._refs = itertools.count(1)
        self.inbox: list[Message] = []

    def next_ref(self) -> str:
        return str(next(self._refs))

    def send(
        self,
        join_ref: str | None,
        ref: str | None,
        topic: str,
        event: str,
        payload: Any,
    ) -> None:
        self.connection.send(
            phoenix.encode_v2(Message(join_ref, ref, topic, event, payload))
        )

    async def receive(self) -> Message:
        with trio.fail_after(TIMEOUT_S):
            return phoenix.decode_v2(await self.connection.receive())

    async def expect(self, predicate) -> Message:
        """Return the first frame (kept or new) matching ``predicate``."""
        for index, message in enumerate(self.inbox):
            if predicate(message):
                return self.inbox.pop(index)
        with trio.fail_after(TIMEOUT_S):
            while True:
                message = await self.receive()
                if predicate(message):
                    return message
                self.inbox.append(message)

    async def request(
        self, join_ref: str | None, topic: str, event: str, payload: Any = None
    ) -> Message:
        """Push and wait for the reply with the same ref."""
        ref = self.next_ref()
        self.send(join_ref, ref, topic, event, {} if payload is None else payload)
        return await self.expect(
            lambda message: message.event == "phx_reply" and message.ref == ref
        )

    async def join(self, topic: str, payload: Any = None) -> tuple[str, Message]:
        join_ref = self.next_ref()
        self.send(
            join_ref, join_ref, topic, "phx_join", {} if payload is None else payload
        )
        reply = await self.expect(
            lambda message: message.event == "phx_reply" and message.ref == join_ref
        )
        return join_ref, reply

    async def push_event(self, topic: str, event: str) -> Message:
        return await self.expect(
            lambda message: message.topic == topic and message.event == event
        )


@asynccontextmanager
async def connect(server, query: str, **options: Any) -> AsyncIterator[PhoenixClient]:
    async with websocket.connect(
        server.host, server.port, f"/socket/websocket?{query}", **options
    ) as connection:
        yield PhoenixClient(connection)
