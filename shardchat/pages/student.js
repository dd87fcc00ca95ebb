// The student page: join the queue with "Ready", follow the queue position,
// and chat with the teacher who claims this student.

import {
  Transcript,
  el,
  endReasonText,
  hideNotice,
  joinChannel,
  openSocket,
  pushRequest,
  requireSession,
  setConnection,
  showNotice,
  tokenHint,
} from "./common.js"

const POSITION_POLL_MS = 2000

const Status = Object.freeze({
  IDLE: "idle",
  WAITING: "waiting",
  CHATTING: "chatting",
})

const elements = {
  user: document.getElementById("user"),
  ready: document.getElementById("ready"),
  queueText: document.getElementById("queue-text"),
  position: document.getElementById("position"),
  chat: document.getElementById("chat"),
  chatTitle: document.getElementById("chat-title"),
  chatState: document.getElementById("chat-state"),
  transcript: document.getElementById("transcript"),
  composer: document.getElementById("composer"),
  answer: document.getElementById("answer"),
  send: document.getElementById("send"),
}

const state = {
  status: Status.IDLE,
  joined: false,
  channel: null,
  pollTimer: null,
  chat: null,
}

function setStatus(status, positionText = "") {
  state.status = status
  elements.position.textContent = positionText
  if (status === Status.WAITING) {
    elements.position.dataset.waiting = ""
  } else {
    delete elements.position.dataset.waiting
  }
  elements.ready.disabled = !state.joined || status !== Status.IDLE
  if (status === Status.WAITING) {
    elements.queueText.textContent =
      "You are in the queue. A chat opens here when a teacher claims you."
    schedulePositionPoll()
  } else {
    clearTimeout(state.pollTimer)
    state.pollTimer = null
  }
  if (status === Status.CHATTING) {
    elements.queueText.textContent = "You are chatting with a teacher."
  }
}

function positionText(position) {
  return position === 1 ? "You are next in line." : `You are number ${position} in the queue.`
}

function schedulePositionPoll() {
  clearTimeout(state.pollTimer)
  state.pollTimer = setTimeout(pollPosition, POSITION_POLL_MS)
}

async function pollPosition() {
  state.pollTimer = null
  if (state.status !== Status.WAITING) {
    return
  }
  try {
    const {position} = await pushRequest(state.channel, "queue:position")
    if (state.status !== Status.WAITING) {
      return
    }
    if (position === null) {
      // Claimed (new:chat follows) or dropped from the queue with a lost connection.
      elements.queueText.textContent = "You are not in the queue. Press Ready to join it."
      setStatus(Status.IDLE)
      return
    }
    elements.position.textContent = positionText(position)
  } catch (error) {
    elements.position.textContent = `Queue position unavailable: ${error.message}.`
  }
  if (state.status === Status.WAITING) {
    schedulePositionPoll()
  }
}

async function becomeReady() {
  elements.ready.disabled = true
  try {
    const {position} = await pushRequest(state.channel, "student:ready")
    if (state.status === Status.IDLE) {
      setStatus(Status.WAITING, positionText(position))
    }
  } catch (error) {
    if (error.message === "already waiting") {
      setStatus(Status.WAITING, "You are already in the queue.")
    } else if (error.message === "already in a chat") {
      elements.queueText.textContent = "You are already in a chat."
      elements.ready.disabled = false
    } else {
      showNotice("warning", `Could not join the queue: ${error.message}.`)
      elements.ready.disabled = false
    }
  }
}

function setChatState(kind, label) {
  elements.chatState.dataset.state = kind
  elements.chatState.textContent = label
}

function setComposerEnabled(enabled) {
  elements.answer.disabled = !enabled
  elements.send.disabled = !enabled
}

/** Open the chat socket for a new:chat push and show the chat pane. */
function openChat(chat) {
  if (state.chat && state.chat.id === chat.id) {
    return
  }
  if (state.chat) {
    state.chat.socket.disconnect()
  }
  setStatus(Status.CHATTING)
  const transcript = new Transcript(`Messages with ${chat.teacher_id}`)
  elements.transcript.replaceChildren(transcript.list)
  elements.chatTitle.textContent = `Chat with ${chat.teacher_id}`
  elements.chat.hidden = false
  setChatState("waiting", "Connecting…")
  setComposerEnabled(false)

  const current = {id: chat.id, socket: null, channel: null, transcript, ended: false}
  state.chat = current
  const socket = openSocket(
    {token: chat.token, chat: chat.id},
    {
      onRejected: (message) => {
        setChatState("error", "Not connected")
        transcript.note(message)
      },
      onState: (socketState) => {
        if (socketState === "reconnecting" && !current.ended) {
          setChatState("waiting", "Reconnecting…")
          setComposerEnabled(false)
        }
      },
    },
  )
  const channel = socket.channel(`chats:${chat.id}`, {})
  current.socket = socket
  current.channel = channel

  channel.on("chat:ready", () => {
    setChatState("live", "Live")
    setComposerEnabled(true)
    elements.answer.focus()
  })
  channel.on("student:receive", (payload) => {
    transcript.append({
      mine: false,
      sender: chat.teacher_id,
      text: payload.message,
      sentAt: payload.sent_at,
      seq: payload.seq,
    })
  })
  channel.on("chat:terminated", ({reason}) => {
    current.ended = true
    setChatState("ended", "Ended")
    setComposerEnabled(false)
    transcript.note(endReasonText(reason))
    elements.queueText.textContent = "The chat has ended. Press Ready to talk to a teacher again."
    setStatus(Status.IDLE)
  })
  // The server closes the channel after chat:terminated; the socket is then unused.
  channel.onClose(() => socket.disconnect())
  joinChannel(channel, {
    onOk: () => {
      if (!current.ended) {
        setChatState("waiting", "Waiting for the teacher…")
        channel.push("student:joined", {})
      }
    },
    onError: (reason) => {
      current.ended = true
      setChatState("error", "Not joined")
      transcript.note(`Could not join the chat: ${reason}.`)
      channel.leave()
      socket.disconnect()
      setStatus(Status.IDLE)
    },
  })
}

function sendAnswer(event) {
  event.preventDefault()
  const text = elements.answer.value.trim()
  const current = state.chat
  if (!text || !current || current.ended) {
    return
  }
  current.channel.push("student:send", {message: text}).receive("error", (response) => {
    current.transcript.note(`Not sent: ${response?.reason ?? "rejected"}.`)
  })
  current.transcript.append({mine: true, sender: "You", text})
  elements.answer.value = ""
  elements.answer.focus()
}

function start({token, userId}) {

  const socket = openSocket(
    {token},
    {
      onRejected: (message) => {
        setConnection("error", "Not connected")
        showNotice("error", message, tokenHint("student"))
        state.joined = false
        setStatus(Status.IDLE)
      },
      onState: (socketState) => {
        if (socketState === "reconnecting") {
          setConnection("reconnecting", "Reconnecting…")
          state.joined = false
          elements.ready.disabled = true
        }
      },
    },
  )
  const channel = socket.channel(`presence:student:${userId}`, {})
  state.channel = channel
  channel.on("new:chat", openChat)
  joinChannel(channel, {
    onOk: () => {
      setConnection("open", "Connected")
      hideNotice()
      elements.user.replaceChildren("Signed in as ", el("strong", {}, userId))
      elements.user.hidden = false
      state.joined = true
      setStatus(state.status, elements.position.textContent)
    },
    onError: (reason) => {
      setConnection("error", "Not joined")
      showNotice(
        "error",
        `The server did not let this page join the queue: ${reason}.`,
        tokenHint("student"),
      )
    },
  })

  elements.ready.addEventListener("click", becomeReady)
  elements.composer.addEventListener("submit", sendAnswer)
  elements.answer.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault()
      elements.composer.requestSubmit()
    }
  })
}

const session = requireSession("student")
if (session) {
  start(session)
}
