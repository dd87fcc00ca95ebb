"""Chats end to end: claim, relay, terminate, and the disconnect rules."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest
import trio
from phx import PhoenixClient, connect

from shardchat import chatlog, phoenix, placement
from shardchat.exceptions import HandshakeError

PRESENCE = "vsn=2.0.0&token={token}"
CHAT = "vsn=2.0.0&token={token}&chat={chat}"


async def wait_for(predicate, limit_s: float = 10.0, interval: float = 0.05):
    with trio.fail_after(limit_s):
        while True:
            value = predicate()
            if value:
                return value
            await trio.sleep(interval)


class Teacher:
    def __init__(self, client: PhoenixClient, teacher_id: str) -> None:
        self.client = client
        self.id = teacher_id
        self.join_ref = ""

    async def join(self):
        self.join_ref, reply = await self.client.join("presence:teachers")
        assert reply.payload["status"] == "ok"

    async def claim(self):
        return await self.client.request(
            self.join_ref, "presence:teachers", "claim:student"
        )


async def open_teacher(stack: AsyncExitStack, server, teacher_id: str) -> Teacher:
    client = await stack.enter_async_context(
        connect(server, PRESENCE.format(token=server.token(teacher_id, "teacher")))
    )
    teacher = Teacher(client, teacher_id)
    await teacher.join()
    return teacher


async def open_student(stack: AsyncExitStack, server, student_id: str, ready=True):
    client = await stack.enter_async_context(
        connect(server, PRESENCE.format(token=server.token(student_id, "student")))
    )
    topic = f"presence:student:{student_id}"
    join_ref, reply = await client.join(topic)
    assert reply.payload["status"] == "ok"
    if ready:
        reply = await client.request(join_ref, topic, "student:ready")
        assert reply.payload["status"] == "ok", reply
    return client


async def open_chat(
    stack: AsyncExitStack, server, chat: dict
) -> tuple[PhoenixClient, str]:
    client = await stack.enter_async_context(
        connect(server, CHAT.format(token=chat["token"], chat=chat["id"]))
    )
    join_ref, reply = await client.join(f"chats:{chat['id']}")
    assert reply.payload == {"status": "ok", "response": {}}
    return client, join_ref


async def test_chat_full_conversation_logged(server):
    async with AsyncExitStack() as stack:
        teacher = await open_teacher(stack, server, "t1")
        student = await open_student(stack, server, "s1")
        claim = await teacher.claim()
        assert claim.payload["status"] == "ok"
        chat = claim.payload["response"]["chat"]
        assert chat["teacher_id"] == "t1"
        assert chat["student_id"] == "s1"
        pushed = await teacher.client.push_event("presence:teachers", "new:chat:t1")
        assert pushed.payload["id"] == chat["id"]
        student_chat = (
            await student.push_event("presence:student:s1", "new:chat")
        ).payload
        assert student_chat["id"] == chat["id"]
        assert student_chat["token"] != chat["token"]

        topic = f"chats:{chat['id']}"
        teacher_chat, teacher_ref = await open_chat(stack, server, chat)
        student_chat_client, student_ref = await open_chat(stack, server, student_chat)
        await teacher_chat.push_event(topic, "chat:ready")
        await student_chat_client.push_event(topic, "chat:ready")

        for index in range(1, 4):
            teacher_chat.send(
                teacher_ref, "10", topic, "teacher:send", {"message": f"q{index}"}
            )
            received = await student_chat_client.push_event(topic, "student:receive")
            assert received.payload["message"] == f"q{index}"
            assert received.payload["seq"] == 2 * index - 1
            assert received.payload["sent_at"] > 0
            student_chat_client.send(
                student_ref, "11", topic, "student:send", {"message": f"a{index}"}
            )
            answer = await teacher_chat.push_event(topic, "teacher:receive")
            assert answer.payload["message"] == f"a{index}"
            assert answer.payload["seq"] == 2 * index

        reply = await teacher_chat.request(teacher_ref, topic, "chat:terminate")
        assert reply.payload["status"] == "ok"
        ended = await student_chat_client.push_event(topic, "chat:terminated")
        assert ended.payload == {"reason": "teacher_ended"}
        ended = await teacher_chat.push_event(topic, "chat:terminated")
        assert ended.payload == {"reason": "teacher_ended"}

    def logged():
        found = chatlog.read_chat(server.data_dir, 2, chat["id"])
        return found if found and found["chat"]["end_reason"] else None

    log = await wait_for(logged)
    assert [row["body"] for row in log["messages"]] == [
        "q1",
        "a1",
        "q2",
        "a2",
        "q3",
        "a3",
    ]
    assert [row["sender"] for row in log["messages"]] == ["teacher", "student"] * 3
    assert log["chat"]["end_reason"] == "teacher_ended"
    assert log["chat"]["message_count"] == 6
    status, body = server.get(f"/chats/{chat['id']}/messages")
    assert status == 200


async def test_chat_student_cannot_join_other_chat(server):
    async with AsyncExitStack() as stack:
        teacher = await open_teacher(stack, server, "t1")
        await open_student(stack, server, "s1")
        chat = (await teacher.claim()).payload["response"]["chat"]
        intruder = server.token("s2", "student")
        # With its own user token and the chat's id, the router refuses.
        with pytest.raises(HandshakeError) as info:
            async with connect(server, CHAT.format(token=intruder, chat=chat["id"])):
                pass
        assert info.value.status == 403
        # On a presence socket, joining the chat topic is unauthorized.
        client = await stack.enter_async_context(
            connect(server, PRESENCE.format(token=intruder))
        )
        _, reply = await client.join(f"chats:{chat['id']}")
        assert reply.payload["status"] == "error"


async def test_chat_student_cannot_send_teacher_events(server):
    async with AsyncExitStack() as stack:
        teacher = await open_teacher(stack, server, "t1")
        student = await open_student(stack, server, "s1")
        chat = (await teacher.claim()).payload["response"]["chat"]
        student_chat = (
            await student.push_event("presence:student:s1", "new:chat")
        ).payload
        topic = f"chats:{chat['id']}"
        await open_chat(stack, server, chat)
        client, join_ref = await open_chat(stack, server, student_chat)
        reply = await client.request(join_ref, topic, "chat:terminate")
        assert reply.payload == {
            "status": "error",
            "response": {"reason": "unauthorized"},
        }
        reply = await client.request(join_ref, topic, "teacher:send", {"message": "x"})
        assert reply.payload == {
            "status": "error",
            "response": {"reason": "unauthorized"},
        }


async def test_rule_fifo_order(server):
    async with AsyncExitStack() as stack:
        for index in range(4):
            await open_student(stack, server, f"s{index}")
        teacher = await open_teacher(stack, server, "t1")
        served = []
        for _ in range(4):
            reply = await teacher.claim()
            served.append(reply.payload["response"]["chat"]["student_id"])
        assert served == ["s0", "s1", "s2", "s3"]


async def test_rule_teacher_max_five_chats(server):
    async with AsyncExitStack() as stack:
        for index in range(6):
            await open_student(stack, server, f"s{index}")
        teacher = await open_teacher(stack, server, "t1")
        for _ in range(5):
            assert (await teacher.claim()).payload["status"] == "ok"
        reply = await teacher.claim()
        assert reply.payload == {
            "status": "error",
            "response": {"reason": "too many chats"},
        }


async def test_rule_student_ready_twice(server):
    async with AsyncExitStack() as stack:
        client = await open_student(stack, server, "s1")
        reply = await client.request(None, "presence:student:s1", "student:ready")
        assert reply.payload == {
            "status": "error",
            "response": {"reason": "already waiting"},
        }


async def test_rule_waiting_student_disconnect_leaves_queue(server):
    async with AsyncExitStack() as stack:
        student = await open_student(stack, server, "s1")
        await wait_for(lambda: server.stats()["queue_length"] == 1)
        await student.connection.close()
        await wait_for(lambda: server.stats()["queue_length"] == 0)
        teacher = await open_teacher(stack, server, "t1")
        reply = await teacher.claim()
        assert reply.payload == {
            "status": "error",
            "response": {"reason": "no students waiting"},
        }


async def test_rule_student_disconnect_mid_chat_ends_chat(server):
    async with AsyncExitStack() as stack:
        teacher = await open_teacher(stack, server, "t1")
        student = await open_student(stack, server, "s1")
        chat = (await teacher.claim()).payload["response"]["chat"]
        teacher_chat, _ = await open_chat(stack, server, chat)
        await student.connection.close()
        # The student's presence connection closed: the chat ends.
        ended = await teacher_chat.push_event(f"chats:{chat['id']}", "chat:terminated")
        assert ended.payload == {"reason": "student_disconnected"}
        # The teacher's place is free again.
        for index in range(5):
            await open_student(stack, server, f"n{index}")
        for _ in range(5):
            assert (await teacher.claim()).payload["status"] == "ok"

    def logged():
        found = chatlog.read_chat(server.data_dir, 2, chat["id"])
        return found if found and found["chat"]["end_reason"] else None

    assert (await wait_for(logged))["chat"]["end_reason"] == "student_disconnected"


async def test_rule_student_chat_socket_closed_ends_chat(server):
    async with AsyncExitStack() as stack:
        teacher = await open_teacher(stack, server, "t1")
        student = await open_student(stack, server, "s1")
        chat = (await teacher.claim()).payload["response"]["chat"]
        student_chat = (
            await student.push_event("presence:student:s1", "new:chat")
        ).payload
        teacher_chat, _ = await open_chat(stack, server, chat)
        student_chat_client, _ = await open_chat(stack, server, student_chat)
        await student_chat_client.connection.close()
        ended = await teacher_chat.push_event(f"chats:{chat['id']}", "chat:terminated")
        assert ended.payload == {"reason": "student_left"}


async def test_rule_teacher_disconnect_requeues_students_at_head(server):
    async with AsyncExitStack() as stack:
        for student_id in ("s1", "s2", "s3"):
            await open_student(stack, server, student_id)
        teacher = await open_teacher(stack, server, "t1")
        assert (await teacher.claim()).payload["response"]["chat"]["student_id"] == "s1"
        assert (await teacher.claim()).payload["response"]["chat"]["student_id"] == "s2"
        await teacher.client.connection.close()
        await wait_for(lambda: server.stats()["students"]["waiting"] == 3)
        other = await open_teacher(stack, server, "t2")
        order = []
        for _ in range(3):
            order.append(
                (await other.claim()).payload["response"]["chat"]["student_id"]
            )
        assert order == ["s1", "s2", "s3"]


async def test_rule_user_status_reaches_teachers(server):
    async with AsyncExitStack() as stack:
        teacher = await open_teacher(stack, server, "t1")
        for index in range(3):
            await open_student(stack, server, f"s{index}")

        async def three_waiting():
            while True:
                status = await teacher.client.push_event(
                    "presence:teachers", "user:status"
                )
                if status.payload["students"]["waiting"] == 3:
                    return status.payload

        with trio.fail_after(10):
            payload = await three_waiting()
        assert payload["teachers"] == {"total": 1}
        assert payload["students"]["total"] == 3


async def test_single_socket_chats_across_workers(server_factory):
    """Presence and chat topics on one socket each, wherever the router put them."""
    server = server_factory(workers=3)
    async with AsyncExitStack() as stack:
        teacher = await open_teacher(stack, server, "t1")
        students = {}
        for index in range(6):
            students[f"s{index}"] = await open_student(stack, server, f"s{index}")
        chats = []
        for _ in range(5):
            reply = await teacher.claim()
            chats.append(reply.payload["response"]["chat"])
        owners = {chat["id"]: placement.place(chat["id"], 3) for chat in chats}
        assert len(set(owners.values())) > 1

        joined = []
        for chat in chats:
            topic = f"chats:{chat['id']}"
            student = students[chat["student_id"]]
            student_chat = (
                await student.push_event(
                    f"presence:student:{chat['student_id']}", "new:chat"
                )
            ).payload
            teacher_ref, reply = await teacher.client.join(
                topic, {"token": chat["token"]}
            )
            assert reply.payload == {"status": "ok", "response": {}}
            student_ref, reply = await student.join(
                topic, {"token": student_chat["token"]}
            )
            assert reply.payload == {"status": "ok", "response": {}}
            await teacher.client.push_event(topic, "chat:ready")
            await student.push_event(topic, "chat:ready")
            joined.append((chat, topic, student, teacher_ref, student_ref))

        for _chat, topic, student, teacher_ref, student_ref in joined:
            for index in range(1, 3):
                teacher.client.send(
                    teacher_ref, None, topic, "teacher:send", {"message": f"q{index}"}
                )
                received = await student.push_event(topic, "student:receive")
                assert received.payload["message"] == f"q{index}"
                student.send(
                    student_ref, None, topic, "student:send", {"message": f"a{index}"}
                )
                answer = await teacher.client.push_event(topic, "teacher:receive")
                assert answer.payload["message"] == f"a{index}"
                assert answer.payload["seq"] == 2 * index
            reply = await teacher.client.request(teacher_ref, topic, "chat:terminate")
            assert reply.payload["status"] == "ok"
            ended = await student.push_event(topic, "chat:terminated")
            assert ended.payload == {"reason": "teacher_ended"}
            closed = await student.push_event(topic, "phx_close")
            assert closed.join_ref == student_ref

        # A student cannot join another student's chat, even with its own socket.
        chat, topic, *_ = joined[0]
        intruder = students["s5"]
        _, reply = await intruder.join(topic, {"token": chat["token"]})
        assert reply.payload == {
            "status": "error",
            "response": {"reason": "unauthorized"},
        }

    for chat, *_ in joined:

        def logged(chat_id=chat["id"]):
            found = chatlog.read_chat(server.data_dir, 3, chat_id)
            return found if found and found["chat"]["end_reason"] else None

        log = await wait_for(logged)
        assert [row["body"] for row in log["messages"]] == ["q1", "a1", "q2", "a2"]


async def test_chat_rejoin_elsewhere_closes_old_channel(server):
    async with AsyncExitStack() as stack:
        teacher = await open_teacher(stack, server, "t1")
        await open_student(stack, server, "s1")
        chat = (await teacher.claim()).payload["response"]["chat"]
        topic = f"chats:{chat['id']}"
        first, first_ref = await open_chat(stack, server, chat)
        await open_chat(stack, server, chat)
        closed = await first.push_event(topic, "phx_close")
        assert closed.join_ref == first_ref


async def test_channel_limit_counts_forwarded_chats(server_factory):
    """The 100-channel limit holds for one socket whose chats live on several workers."""
    from shardchat import tokens

    server = server_factory(workers=3)
    chats = [
        (
            f"limit{index}",
            tokens.mint(
                server.secret,
                "t1",
                "teacher",
                chat=(f"limit{index}", "t1", f"s{index}"),
            ),
        )
        for index in range(phoenix.MAX_CHANNELS)
    ]
    owners = {placement.place(chat_id, 3) for chat_id, _ in chats}
    assert len(owners) == 3
    async with AsyncExitStack() as stack:
        teacher = await open_teacher(stack, server, "t1")
        refs = {}
        for chat_id, token in chats[:-1]:
            refs[chat_id], reply = await teacher.client.join(
                f"chats:{chat_id}", {"token": token}
            )
            assert reply.payload == {"status": "ok", "response": {}}, chat_id
        last_id, last_token = chats[-1]
        _, reply = await teacher.client.join(f"chats:{last_id}", {"token": last_token})
        assert reply.payload == {
            "status": "error",
            "response": {"reason": "too many channels joined"},
        }
        # Leaving one forwarded chat makes room again.
        holder = placement.place("t1", 3)
        first_id = next(
            chat_id for chat_id, _ in chats if placement.place(chat_id, 3) != holder
        )
        topic = f"chats:{first_id}"
        leave = await teacher.client.request(refs[first_id], topic, "phx_leave")
        assert leave.payload["status"] == "ok"
        await teacher.client.push_event(topic, "phx_close")
        _, reply = await teacher.client.join(f"chats:{last_id}", {"token": last_token})
        assert reply.payload == {"status": "ok", "response": {}}
