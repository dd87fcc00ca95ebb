// Conformance of shardchat with the official phoenix.js client (package `phoenix`
// 1.8.x over the `ws` package), against servers that the caller starts:
//
//   SHARDCHAT_URL, SHARDCHAT_SECRET            a server with the default settings
//   SHARDCHAT_IDLE_URL, SHARDCHAT_IDLE_SECRET  a server started with --idle-timeout 1
//
// The URLs are http://HOST:PORT and the secrets are the hex text of each server's
// secret file. tests/test_js_client.py starts both servers and runs this suite.

import assert from "node:assert/strict"
import {createHmac, randomBytes} from "node:crypto"
import {describe, test} from "node:test"

import {Socket} from "phoenix"
import WebSocket from "ws"

const MAIN = serverFromEnv("SHARDCHAT_URL", "SHARDCHAT_SECRET")
const IDLE = serverFromEnv("SHARDCHAT_IDLE_URL", "SHARDCHAT_IDLE_SECRET")

// User ids carry a per-run prefix so that runs against a long-lived server do
// not meet each other's users.
const RUN = randomBytes(3).toString("hex")
const TOKEN_TTL_S = 3600
const STEP_MS = 5000
const POLL_MS = 10
// Relay pushes get no reply, so their phoenix.js timeout only has to outlast
// the test that sent them.
const SEND_TIMEOUT_MS = 1000

function serverFromEnv(urlName, secretName) {
  const url = process.env[urlName]
  const secretHex = process.env[secretName]
  if (!url || !secretHex) {
    throw new Error(
      `${urlName} and ${secretName} must be set: run this suite through ` +
        "tests/test_js_client.py, or start shardchat and export its URL and secret",
    )
  }
  return {
    url: url.replace(/\/+$/, ""),
    socketUrl: `${url.replace(/^http/, "ws").replace(/\/+$/, "")}/socket`,
    secret: Buffer.from(secretHex.trim(), "hex"),
  }
}

function base64url(data) {
  return Buffer.from(data).toString("base64url")
}

/** Mint a user token the way shardchat.tokens.mint does. */
function mintToken(server, userId, role) {
  const expiry = Math.floor(Date.now() / 1000) + TOKEN_TTL_S
  const payload = Buffer.from(JSON.stringify({u: userId, r: role, x: expiry}))
  const signature = createHmac("sha256", server.secret).update(payload).digest()
  return `${base64url(payload)}.${base64url(signature)}`
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms))
}

/** Settle with `promise`, or reject once `ms` pass, naming the `awaited` step. */
async function within(promise, ms, awaited) {
  let timer
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${awaited}`)), ms)
  })
  try {
    return await Promise.race([promise, timeout])
  } finally {
    clearTimeout(timer)
  }
}

/** Poll `predicate` until it returns a truthy value, for at most `ms`. */
async function waitUntil(predicate, ms, awaited) {
  const deadline = Date.now() + ms
  for (;;) {
    const value = predicate()
    if (value) {
      return value
    }
    if (Date.now() >= deadline) {
      throw new Error(`timed out after ${ms} ms: ${awaited}`)
    }
    await sleep(POLL_MS)
  }
}

// The sockets of each running test, closed in reverse order when it ends.
const testSockets = new WeakMap()
const DISCONNECT_MS = 3000

/**
 * Create a phoenix.js socket on the `ws` transport, counting its open, close and
 * error callbacks. The socket is disconnected when the test `t` ends.
 */
function openSocket(t, server, options = {}) {
  const socket = new Socket(server.socketUrl, {transport: WebSocket, ...options})
  const record = {socket, opens: 0, closes: [], errors: []}
  socket.onOpen(() => {
    record.opens += 1
  })
  socket.onClose((event) => {
    record.closes.push(event)
  })
  socket.onError((error) => {
    record.errors.push(error)
  })
  if (!testSockets.has(t)) {
    testSockets.set(t, [])
    t.after(() => disconnectAll(testSockets.get(t)))
  }
  testSockets.get(t).push(socket)
  socket.connect()
  return record
}

/**
 * Disconnect `sockets` one at a time, the newest first. A test opens a
 * student's sockets after its teacher's, so the student leaves first and no
 * teacher_left puts it back in the queue for the next test.
 */
async function disconnectAll(sockets) {
  for (const socket of sockets.reverse()) {
    await within(
      new Promise((resolve) => socket.disconnect(resolve)),
      DISCONNECT_MS,
      "socket disconnect",
    )
  }
}

async function connected(t, server, options) {
  const record = openSocket(t, server, options)
  await waitUntil(() => record.opens > 0, STEP_MS, "socket onOpen")
  return record
}

/** Join `channel`; resolve with the ok response, reject on an error or timeout. */
function join(channel) {
  return new Promise((resolve, reject) => {
    channel
      .join(STEP_MS)
      .receive("ok", resolve)
      .receive("error", (response) => {
        reject(new Error(`join ${channel.topic} failed: ${JSON.stringify(response)}`))
      })
      .receive("timeout", () => reject(new Error(`join ${channel.topic} timed out`)))
  })
}

/** Push `event` and resolve with {status, response} once ok or error arrives. */
function request(channel, event, payload = {}) {
  return new Promise((resolve, reject) => {
    channel
      .push(event, payload, STEP_MS)
      .receive("ok", (response) => resolve({status: "ok", response}))
      .receive("error", (response) => resolve({status: "error", response}))
      .receive("timeout", () => {
        reject(new Error(`${event} on ${channel.topic} got no reply`))
      })
  })
}

/** Record every payload of `event` on `channel`, in arrival order. */
function record(channel, event) {
  const payloads = []
  channel.on(event, (payload) => payloads.push(payload))
  return payloads
}

async function joinTeacher(t, server, teacherId) {
  const {socket} = await connected(t, server, {
    params: {token: mintToken(server, teacherId, "teacher")},
  })
  const channel = socket.channel("presence:teachers", {})
  const newChats = record(channel, `new:chat:${teacherId}`)
  const statuses = record(channel, "user:status")
  await join(channel)
  return {id: teacherId, socket, channel, newChats, statuses}
}

async function joinStudent(t, server, studentId) {
  const {socket} = await connected(t, server, {
    params: {token: mintToken(server, studentId, "student")},
  })
  const channel = socket.channel(`presence:student:${studentId}`, {})
  const newChats = record(channel, "new:chat")
  await join(channel)
  return {id: studentId, socket, channel, newChats}
}

/**
 * Open a chat socket for one participant and join the chat's channel. The
 * relay and close events are recorded, and `onReceive` bound, before the join,
 * so none is missed.
 */
async function joinChat(t, server, chat, role, onReceive = null) {
  const {socket} = await connected(t, server, {
    params: {token: chat.token, chat: chat.id},
  })
  const channel = socket.channel(`chats:${chat.id}`, {})
  const receiveEvent = role === "teacher" ? "teacher:receive" : "student:receive"
  const received = record(channel, receiveEvent)
  if (onReceive) {
    channel.on(receiveEvent, (payload) => onReceive(channel, payload))
  }
  const ready = record(channel, "chat:ready")
  const terminated = record(channel, "chat:terminated")
  const closes = []
  channel.onClose((payload) => closes.push(payload))
  await join(channel)
  const joined = await request(channel, `${role}:joined`)
  assert.equal(joined.status, "ok", `${role}:joined reply ${JSON.stringify(joined)}`)
  return {socket, channel, received, ready, terminated, closes}
}

async function fetchJson(server, path) {
  const response = await fetch(`${server.url}${path}`)
  assert.equal(response.status, 200, `GET ${path}`)
  return response.json()
}

/**
 * Wait until no student of an earlier test is waiting, so that the next claim
 * takes the student of this test.
 */
async function waitForEmptyQueue(server) {
  const deadline = Date.now() + STEP_MS
  for (;;) {
    const stats = await fetchJson(server, "/stats")
    if (stats.queue_length === 0) {
      return
    }
    if (Date.now() >= deadline) {
      throw new Error(`queue not drained: ${stats.queue_length} students waiting`)
    }
    await sleep(50)
  }
}

/** Claim the only waiting student and join the chat as both participants. */
async function startChat(t, name) {
  await waitForEmptyQueue(MAIN)
  const teacher = await joinTeacher(t, MAIN, `${RUN}-${name}-teacher`)
  const student = await joinStudent(t, MAIN, `${RUN}-${name}-student`)
  const ready = await request(student.channel, "student:ready")
  assert.equal(ready.status, "ok", `student:ready reply ${JSON.stringify(ready)}`)
  const claim = await request(teacher.channel, "claim:student")
  assert.equal(claim.status, "ok", `claim:student reply ${JSON.stringify(claim)}`)
  const chat = claim.response.chat
  const studentChat = await waitUntil(() => student.newChats[0], STEP_MS, "new:chat")
  const teacherSide = await joinChat(t, MAIN, chat, "teacher")
  const studentSide = await joinChat(t, MAIN, studentChat, "student")
  await waitUntil(() => teacherSide.ready.length > 0, STEP_MS, "teacher chat:ready")
  await waitUntil(() => studentSide.ready.length > 0, STEP_MS, "student chat:ready")
  return {chat, teacher, student, teacherSide, studentSide}
}

describe("connecting", () => {
  test("socket connects with a params token", {timeout: 15_000}, async (t) => {
    const token = mintToken(MAIN, `${RUN}-params-teacher`, "teacher")
    const {socket, errors} = await connected(t, MAIN, {params: {token}})
    await join(socket.channel("presence:teachers", {}))

    assert.equal(socket.isConnected(), true)
    assert.equal(socket.conn.protocol, "")
    assert.deepEqual(errors, [])
  })

  test("socket with an invalid token is rejected with 403", {timeout: 15_000}, async (t) => {
    const record = openSocket(t, MAIN, {params: {token: "not-a-token"}})
    const error = await waitUntil(() => record.errors[0], STEP_MS, "socket onError")

    assert.match(String(error.message), /Unexpected server response: 403/)
    assert.equal(record.opens, 0)
  })

  test("authToken option selects the phoenix subprotocol", {timeout: 15_000}, async (t) => {
    const authToken = mintToken(MAIN, `${RUN}-auth-teacher`, "teacher")
    const {socket, errors} = await connected(t, MAIN, {authToken})
    await join(socket.channel("presence:teachers", {}))

    assert.equal(socket.conn.protocol, "phoenix")
    assert.equal(socket.endPointURL().includes("token="), false)
    assert.deepEqual(errors, [])
  })

  test("authToken option with a bad token is rejected", {timeout: 15_000}, async (t) => {
    const record = openSocket(t, MAIN, {authToken: "bad.token"})
    const error = await waitUntil(() => record.errors[0], STEP_MS, "socket onError")

    assert.match(String(error.message), /Unexpected server response: 403/)
    assert.equal(record.opens, 0)
  })
})

describe("channels", () => {
  test("presence channel joins, leaves and rejoins", {timeout: 15_000}, async (t) => {
    const token = mintToken(MAIN, `${RUN}-rejoin-teacher`, "teacher")
    const {socket} = await connected(t, MAIN, {params: {token}})
    const first = socket.channel("presence:teachers", {})
    await join(first)
    assert.equal(first.state, "joined")

    const closes = []
    first.onClose(() => closes.push(first.topic))
    const left = new Promise((resolve, reject) => {
      first
        .leave(STEP_MS)
        .receive("ok", resolve)
        .receive("timeout", () => reject(new Error("leave timed out")))
    })
    await within(left, STEP_MS, "leave reply")
    assert.equal(first.state, "closed")
    assert.deepEqual(closes, ["presence:teachers"])
    assert.equal(socket.channels.includes(first), false)

    const second = socket.channel("presence:teachers", {})
    await join(second)
    assert.equal(second.state, "joined")
    const claim = await request(second, "claim:student")
    assert.deepEqual(claim, {status: "error", response: {reason: "no students waiting"}})
  })

  test("student joining presence:teachers is unauthorized", {timeout: 15_000}, async (t) => {
    const token = mintToken(MAIN, `${RUN}-intruder`, "student")
    const {socket} = await connected(t, MAIN, {params: {token}})
    const channel = socket.channel("presence:teachers", {})
    const rejected = new Promise((resolve, reject) => {
      channel
        .join(STEP_MS)
        .receive("ok", () => reject(new Error("a student joined presence:teachers")))
        .receive("error", resolve)
        .receive("timeout", () => reject(new Error("join timed out")))
    })
    const response = await within(rejected, STEP_MS, "join error reply")
    // phoenix.js would retry the join on its rejoin timer; leaving stops that.
    channel.leave()

    assert.deepEqual(response, {reason: "unauthorized"})
    assert.equal(socket.isConnected(), true)
  })

  test("student joining another student's topic is unauthorized", {timeout: 15_000}, async (t) => {
    const token = mintToken(MAIN, `${RUN}-nosy`, "student")
    const {socket} = await connected(t, MAIN, {params: {token}})
    const channel = socket.channel(`presence:student:${RUN}-someone-else`, {})
    const rejected = new Promise((resolve, reject) => {
      channel
        .join(STEP_MS)
        .receive("ok", () => reject(new Error("joined another student's topic")))
        .receive("error", resolve)
        .receive("timeout", () => reject(new Error("join timed out")))
    })
    const response = await within(rejected, STEP_MS, "join error reply")
    channel.leave()

    assert.deepEqual(response, {reason: "unauthorized"})
  })
})

describe("heartbeats", () => {
  test("heartbeats get ok replies on topic phoenix", {timeout: 15_000}, async (t) => {
    const token = mintToken(MAIN, `${RUN}-heartbeat-teacher`, "teacher")
    const record = openSocket(t, MAIN, {params: {token}, heartbeatIntervalMs: 100})
    const replies = []
    record.socket.onMessage((message) => {
      if (message.topic === "phoenix" && message.event === "phx_reply") {
        replies.push(message)
      }
    })
    await waitUntil(() => replies.length >= 5, STEP_MS, "five heartbeat replies")

    for (const reply of replies) {
      assert.deepEqual(reply.payload, {status: "ok", response: {}})
    }
    // Without replies phoenix.js would close and reopen the socket after 100 ms.
    assert.equal(record.opens, 1)
    assert.deepEqual(record.closes, [])
    assert.equal(record.socket.isConnected(), true)
  })

  test("socket.ping measures a round trip", {timeout: 15_000}, async (t) => {
    const token = mintToken(MAIN, `${RUN}-ping-teacher`, "teacher")
    const {socket} = await connected(t, MAIN, {params: {token}})
    const rtt = await within(
      new Promise((resolve) => socket.ping(resolve)),
      STEP_MS,
      "ping reply",
    )

    assert.equal(typeof rtt, "number")
  })
})

describe("pushes", () => {
  test("claim with no students waiting gets an error reply", {timeout: 15_000}, async (t) => {
    await waitForEmptyQueue(MAIN)
    const teacher = await joinTeacher(t, MAIN, `${RUN}-lonely-teacher`)
    const claim = await request(teacher.channel, "claim:student")

    assert.deepEqual(claim, {status: "error", response: {reason: "no students waiting"}})
  })

  test("student queue pushes get replies", {timeout: 15_000}, async (t) => {
    await waitForEmptyQueue(MAIN)
    const student = await joinStudent(t, MAIN, `${RUN}-queue-student`)

    const before = await request(student.channel, "queue:position")
    assert.deepEqual(before, {status: "ok", response: {position: null}})
    const ready = await request(student.channel, "student:ready")
    assert.deepEqual(ready, {status: "ok", response: {position: 1}})
    const again = await request(student.channel, "student:ready")
    assert.deepEqual(again, {status: "error", response: {reason: "already waiting"}})
    const position = await request(student.channel, "queue:position")
    assert.deepEqual(position, {status: "ok", response: {position: 1}})
  })

  test("claim delivers the chat to both sides", {timeout: 15_000}, async (t) => {
    await waitForEmptyQueue(MAIN)
    const teacher = await joinTeacher(t, MAIN, `${RUN}-claim-teacher`)
    const student = await joinStudent(t, MAIN, `${RUN}-claim-student`)
    await request(student.channel, "student:ready")
    const claim = await request(teacher.channel, "claim:student")
    assert.equal(claim.status, "ok")
    const chat = claim.response.chat

    assert.equal(chat.teacher_id, teacher.id)
    assert.equal(chat.student_id, student.id)
    const pushed = await waitUntil(() => teacher.newChats[0], STEP_MS, "new:chat:<teacher>")
    assert.deepEqual(pushed, chat)
    const studentChat = await waitUntil(() => student.newChats[0], STEP_MS, "new:chat")
    assert.equal(studentChat.id, chat.id)
    assert.equal(studentChat.teacher_id, teacher.id)
    assert.equal(studentChat.student_id, student.id)
    assert.notEqual(studentChat.token, chat.token)
  })

  test("send without a reply fires the push timeout", {timeout: 15_000}, async (t) => {
    const {teacherSide, studentSide} = await startChat(t, "timeout")
    const outcome = await within(
      new Promise((resolve) => {
        teacherSide.channel
          .push("teacher:send", {message: "hello"}, 300)
          .receive("ok", () => resolve("ok"))
          .receive("error", () => resolve("error"))
          .receive("timeout", () => resolve("timeout"))
      }),
      STEP_MS,
      "teacher:send outcome",
    )

    assert.equal(outcome, "timeout")
    const received = await waitUntil(() => studentSide.received[0], STEP_MS, "student:receive")
    assert.equal(received.message, "hello")
    assert.equal(received.seq, 1)
    assert.equal(typeof received.sent_at, "number")
  })
})

describe("server-side close", () => {
  test("chat:terminate closes both chat channels", {timeout: 15_000}, async (t) => {
    const {teacherSide, studentSide} = await startChat(t, "terminate")
    const reply = await request(teacherSide.channel, "chat:terminate")
    assert.equal(reply.status, "ok")

    for (const side of [teacherSide, studentSide]) {
      await waitUntil(() => side.closes.length > 0, STEP_MS, "channel onClose")
      assert.deepEqual(side.terminated, [{reason: "teacher_ended"}])
      assert.equal(side.channel.state, "closed")
      assert.equal(side.socket.channels.includes(side.channel), false)
      // Only the channel closes: the socket stays open.
      assert.equal(side.socket.isConnected(), true)
    }
  })

  test("idle socket is closed with 1001, reconnects and rejoins", {timeout: 20_000}, async (t) => {
    const token = mintToken(IDLE, `${RUN}-idle-teacher`, "teacher")
    // No heartbeat during the test, so the server's one-second idle timeout fires.
    const record = openSocket(t, IDLE, {params: {token}, heartbeatIntervalMs: 600_000})
    const channel = record.socket.channel("presence:teachers", {})
    let joins = 0
    channel
      .join(STEP_MS)
      .receive("ok", () => {
        joins += 1
      })
    await waitUntil(() => record.opens >= 2 && joins >= 2, 10_000, "reconnect and rejoin")

    assert.equal(record.closes[0].code, 1001)
    assert.equal(record.socket.channels.includes(channel), true)
  })
})

/**
 * Run a teacher bot: claim students until `claims.length` reaches `total`, and
 * run each claimed chat with `teach`. Resolve with every chat's outcome.
 */
async function runTeacher(t, teacher, claims, total, count, deadline) {
  const conversations = []
  while (claims.length < total) {
    if (Date.now() > deadline) {
      throw new Error(`teacher ${teacher.id}: ${claims.length} of ${total} claimed`)
    }
    const claim = await request(teacher.channel, "claim:student")
    if (claim.status === "ok") {
      claims.push(claim.response.chat)
      const conversation = teach(t, claim.response.chat, count)
      // Promise.all below reports a failure; this only keeps it from counting
      // as an unhandled rejection while claims go on.
      conversation.catch(() => {})
      conversations.push(conversation)
    } else if (["no students waiting", "too many chats"].includes(claim.response.reason)) {
      await sleep(20)
    } else {
      throw new Error(`claim:student failed: ${JSON.stringify(claim.response)}`)
    }
  }
  return Promise.all(conversations)
}

/**
 * Send `count` messages at once, wait for the student's answer to each, then
 * end the chat and wait for its channel to close.
 */
async function teach(t, chat, count) {
  const side = await joinChat(t, MAIN, chat, "teacher")
  await waitUntil(() => side.ready.length > 0, STEP_MS, `chat:ready in ${chat.id}`)
  for (let i = 1; i <= count; i += 1) {
    side.channel.push("teacher:send", {message: `${chat.id} question ${i}`}, SEND_TIMEOUT_MS)
  }
  await waitUntil(() => side.received.length >= count, 15_000, `replies in ${chat.id}`)
  const reply = await request(side.channel, "chat:terminate")
  assert.equal(reply.status, "ok", `chat:terminate reply ${JSON.stringify(reply)}`)
  await waitUntil(() => side.closes.length > 0, STEP_MS, `teacher close of ${chat.id}`)
  return {chat, received: side.received}
}

/** Run a student bot's chat: answer each question as it arrives until the chat closes. */
async function learn(t, chat) {
  const answer = (channel, payload) => {
    channel.push("student:send", {message: `answer to ${payload.message}`}, SEND_TIMEOUT_MS)
  }
  const side = await joinChat(t, MAIN, chat, "student", answer)
  // The teacher ends the chat after the last answer, which closes this channel.
  await waitUntil(() => side.closes.length > 0, 30_000, `student close of ${chat.id}`)
  return {chat, received: side.received, terminated: side.terminated}
}

/** Fetch a chat's log once it is ended and contains `count` messages. */
async function committedChatLog(chatId, count) {
  const deadline = Date.now() + STEP_MS
  for (;;) {
    // The log is committed in batches, so the chat may not be there yet (404).
    const response = await fetch(`${MAIN.url}/chats/${chatId}/messages`)
    assert.ok([200, 404].includes(response.status), `GET /chats/${chatId}/messages`)
    const log = response.status === 200 ? await response.json() : null
    if (log && log.chat.ended_at !== null && log.messages.length === count) {
      return log
    }
    if (Date.now() >= deadline) {
      throw new Error(`chat log of ${chatId} incomplete: ${JSON.stringify(log)}`)
    }
    await sleep(50)
  }
}

describe("tutoring workload", () => {
  test("two teachers serve eight students", {timeout: 60_000}, async (t) => {
    const teacherCount = 2
    const studentCount = 8
    const count = 5
    const deadline = Date.now() + 40_000
    await waitForEmptyQueue(MAIN)
    const teachers = []
    for (let i = 1; i <= teacherCount; i += 1) {
      teachers.push(await joinTeacher(t, MAIN, `${RUN}-workload-teacher-${i}`))
    }
    const students = []
    for (let i = 1; i <= studentCount; i += 1) {
      students.push(await joinStudent(t, MAIN, `${RUN}-workload-student-${i}`))
    }

    // Each student's chat starts as soon as its new:chat arrives.
    const learning = students.map(async (student) => {
      const chat = await waitUntil(() => student.newChats[0], 40_000, `new:chat for ${student.id}`)
      return learn(t, chat)
    })
    for (const chat of learning) {
      chat.catch(() => {})
    }
    for (const student of students) {
      const ready = await request(student.channel, "student:ready")
      assert.equal(ready.status, "ok", `student:ready reply ${JSON.stringify(ready)}`)
    }
    const claims = []
    const teaching = teachers.map((teacher) =>
      runTeacher(t, teacher, claims, studentCount, count, deadline),
    )
    const taught = (await Promise.all(teaching)).flat()
    const learned = await Promise.all(learning)

    // Every student got exactly one chat, with one of the teachers.
    assert.equal(claims.length, studentCount)
    const studentIds = claims.map((chat) => chat.student_id).sort()
    assert.deepEqual(studentIds, students.map((student) => student.id).sort())
    for (const chat of claims) {
      assert.ok(teachers.some((teacher) => teacher.id === chat.teacher_id), chat.teacher_id)
    }
    for (const student of students) {
      assert.equal(student.newChats.length, 1, `new:chat count for ${student.id}`)
    }
    for (const teacher of teachers) {
      const claimed = claims.filter((chat) => chat.teacher_id === teacher.id).map((chat) => chat.id)
      const pushed = teacher.newChats.map((chat) => chat.id)
      assert.deepEqual(pushed.sort(), claimed.sort(), `new:chat:${teacher.id} events`)
    }

    // Each direction arrived in order; seq counts both directions from 1.
    const questions = Array.from({length: count}, (_, i) => `question ${i + 1}`)
    for (const {chat, received} of learned) {
      assert.deepEqual(
        received.map((payload) => payload.message),
        questions.map((question) => `${chat.id} ${question}`),
      )
    }
    for (const {chat, received} of taught) {
      assert.deepEqual(
        received.map((payload) => payload.message),
        questions.map((question) => `answer to ${chat.id} ${question}`),
      )
    }
    for (const {chat, received} of taught) {
      const studentSide = learned.find((entry) => entry.chat.id === chat.id)
      const seqs = [...received, ...studentSide.received].map((payload) => payload.seq)
      assert.deepEqual(
        seqs.sort((a, b) => a - b),
        Array.from({length: 2 * count}, (_, i) => i + 1),
        `seq of ${chat.id}`,
      )
      for (const sequence of [received, studentSide.received]) {
        for (let i = 1; i < sequence.length; i += 1) {
          assert.ok(sequence[i].seq > sequence[i - 1].seq, `seq order in ${chat.id}`)
        }
      }
      assert.deepEqual(studentSide.terminated, [{reason: "teacher_ended"}])
    }

    // The chat log contains every message in seq order once the batch commits.
    for (const chat of claims) {
      const log = await committedChatLog(chat.id, 2 * count)
      assert.equal(log.chat.end_reason, "teacher_ended")
      assert.equal(log.chat.message_count, 2 * count)
      assert.deepEqual(
        log.messages.map((message) => message.seq),
        Array.from({length: 2 * count}, (_, i) => i + 1),
      )
    }

    // The teachers' user:status pushes settle on every student finished.
    const settled = (status) =>
      status.students.waiting === 0 &&
      status.students.chatting === 0 &&
      status.students.finished >= studentCount &&
      status.teachers.total >= teacherCount
    await waitUntil(
      () => teachers.every((teacher) => teacher.statuses.some(settled)),
      STEP_MS,
      "user:status with every student finished",
    )
  })
})
