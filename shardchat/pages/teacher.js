// The teacher page: live counts from user:status, "Claim next student", and one
// chat pane per claimed student (up to MAX_CHATS side by side), each on its own
// chat socket as the protocol places every chat on its worker.

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

// The server's limit of chats per teacher ("too many chats" beyond it).
const MAX_CHATS = 5

const CLAIM_ERRORS = {
  "no students waiting": "No students are waiting right now.",
  "too many chats": `You already have ${MAX_CHATS} chats open. End one to claim another.`,
  "not connected": "This page is not connected to the queue yet.",
}

const elements = {
  user: document.getElementById("user"),
  claim: document.getElementById("claim"),
  claimStatus: document.getElementById("claim-status"),
  chats: document.getElementById("chats"),
  noChats: document.getElementById("no-chats"),
  counts: {
    teachers: document.getElementById("count-teachers"),
    waiting: document.getElementById("count-waiting"),
    chatting: document.getElementById("count-chatting"),
    finished: document.getElementById("count-finished"),
  },
}

const state = {
  joined: false,
  claiming: false,
  countsPushed: false,
  channel: null,
  // Chat id -> pane, in the order the chats were claimed.
  panes: new Map(),
}

function liveChats() {
  return [...state.panes.values()].filter((pane) => !pane.ended).length
}

function updateClaimButton() {
  elements.claim.disabled = !state.joined || state.claiming || liveChats() >= MAX_CHATS
  elements.noChats.hidden = state.panes.size > 0
}

/**
 * Fill the counts from GET /stats until the first user:status push arrives,
 * because the server pushes user:status only when the counts change.
 */
async function loadInitialCounts() {
  try {
    const response = await fetch("/stats", {signal: AbortSignal.timeout(3000)})
    if (response.ok && !state.countsPushed) {
      showCounts(await response.json())
    }
  } catch {
    // The counts stay blank until the next user:status push.
  }
}

function showCounts({teachers, students}) {
  elements.counts.teachers.textContent = teachers.total
  elements.counts.waiting.textContent = students.waiting
  elements.counts.chatting.textContent = students.chatting
  elements.counts.finished.textContent = students.finished
}

async function claimNext() {
  state.claiming = true
  updateClaimButton()
  elements.claimStatus.textContent = "Claiming…"
  try {
    const {chat} = await pushRequest(state.channel, "claim:student")
    elements.claimStatus.textContent = `Claimed ${chat.student_id}.`
    openChat(chat)
  } catch (error) {
    elements.claimStatus.textContent =
      CLAIM_ERRORS[error.message] ?? `Claim failed: ${error.message}.`
  } finally {
    state.claiming = false
    updateClaimButton()
  }
}

/** Remove the oldest ended panes so that a new one fits in MAX_CHATS. */
function makeRoom() {
  for (const pane of state.panes.values()) {
    if (state.panes.size < MAX_CHATS) {
      return
    }
    if (pane.ended) {
      closePane(pane)
    }
  }
}

function closePane(pane) {
  pane.socket.disconnect()
  pane.element.remove()
  state.panes.delete(pane.chat.id)
  updateClaimButton()
}

function setPaneState(pane, kind, label) {
  pane.stateBadge.dataset.state = kind
  pane.stateBadge.textContent = label
}

function setComposerEnabled(pane, enabled) {
  pane.textarea.disabled = !enabled
  pane.send.disabled = !enabled
}

function buildPane(chat) {
  const titleId = `chat-title-${chat.id}`
  const inputId = `message-${chat.id}`
  const transcript = new Transcript(`Messages with ${chat.student_id}`)
  const stateBadge = el("span", {class: "chat-state", "data-state": "waiting"}, "Connecting…")
  const textarea = el("textarea", {
    id: inputId,
    rows: 2,
    maxlength: 2000,
    placeholder: "Message. Enter sends.",
    disabled: true,
  })
  const send = el("button", {type: "submit", class: "button primary", disabled: true}, "Send")
  const form = el(
    "form",
    {class: "composer"},
    el("label", {class: "visually-hidden", for: inputId}, `Message to ${chat.student_id}`),
    textarea,
    send,
  )
  const endButton = el("button", {type: "button", class: "button danger"}, "End chat")
  const actions = el("div", {class: "pane-actions"}, endButton)
  const element = el(
    "article",
    {class: "card chat", "aria-labelledby": titleId, "data-chat": chat.id},
    el("header", {class: "chat-header"}, el("h2", {id: titleId}, chat.student_id), stateBadge),
    transcript.list,
    form,
    actions,
  )
  return {
    chat,
    element,
    transcript,
    stateBadge,
    textarea,
    send,
    form,
    endButton,
    actions,
    ended: false,
  }
}

function endPane(pane, note) {
  pane.ended = true
  setPaneState(pane, "ended", "Ended")
  setComposerEnabled(pane, false)
  pane.transcript.note(note)
  const close = el("button", {type: "button", class: "button"}, "Close")
  close.addEventListener("click", () => closePane(pane))
  pane.actions.replaceChildren(close)
  updateClaimButton()
}

/** Show a pane for a claimed chat and join it over its own chat socket. */
function openChat(chat) {
  if (state.panes.has(chat.id)) {
    return
  }
  makeRoom()
  const pane = buildPane(chat)
  state.panes.set(chat.id, pane)
  elements.chats.append(pane.element)
  updateClaimButton()

  pane.socket = openSocket(
    {token: chat.token, chat: chat.id},
    {
      onRejected: (message) => endPane(pane, message),
      onState: (socketState) => {
        if (socketState === "reconnecting" && !pane.ended) {
          setPaneState(pane, "waiting", "Reconnecting…")
          setComposerEnabled(pane, false)
        }
      },
    },
  )
  const channel = pane.socket.channel(`chats:${chat.id}`, {})
  pane.channel = channel

  channel.on("chat:ready", () => {
    setPaneState(pane, "live", "Live")
    setComposerEnabled(pane, true)
  })
  channel.on("teacher:receive", (payload) => {
    pane.transcript.append({
      mine: false,
      sender: chat.student_id,
      text: payload.message,
      sentAt: payload.sent_at,
      seq: payload.seq,
    })
  })
  channel.on("chat:terminated", ({reason}) => endPane(pane, endReasonText(reason)))
  // The server closes the channel after chat:terminated; the socket is then unused.
  channel.onClose(() => pane.socket.disconnect())
  joinChannel(channel, {
    onOk: () => {
      if (!pane.ended) {
        setPaneState(pane, "waiting", "Waiting for the student…")
        channel.push("teacher:joined", {})
      }
    },
    onError: (reason) => {
      channel.leave()
      endPane(pane, `Could not join the chat: ${reason}.`)
    },
  })

  pane.form.addEventListener("submit", (event) => {
    event.preventDefault()
    sendMessage(pane)
  })
  pane.textarea.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault()
      pane.form.requestSubmit()
    }
  })
  pane.endButton.addEventListener("click", () => endChat(pane))
}

function sendMessage(pane) {
  const text = pane.textarea.value.trim()
  if (!text || pane.ended) {
    return
  }
  pane.channel.push("teacher:send", {message: text}).receive("error", (response) => {
    pane.transcript.note(`Not sent: ${response?.reason ?? "rejected"}.`)
  })
  pane.transcript.append({mine: true, sender: "You", text})
  pane.textarea.value = ""
  pane.textarea.focus()
}

async function endChat(pane) {
  pane.endButton.disabled = true
  try {
    // chat:terminated follows the reply and ends the pane.
    await pushRequest(pane.channel, "chat:terminate")
  } catch (error) {
    pane.transcript.note(`Could not end the chat: ${error.message}.`)
    pane.endButton.disabled = false
  }
}

function start({token, userId}) {

  const socket = openSocket(
    {token},
    {
      onRejected: (message) => {
        setConnection("error", "Not connected")
        showNotice("error", message, tokenHint("teacher"))
      },
      onState: (socketState) => {
        if (socketState === "reconnecting") {
          setConnection("reconnecting", "Reconnecting…")
          state.joined = false
          updateClaimButton()
        }
      },
    },
  )
  const channel = socket.channel("presence:teachers", {})
  state.channel = channel
  channel.on("user:status", (status) => {
    state.countsPushed = true
    showCounts(status)
  })
  // A claim's chat also arrives as this push, e.g. when its reply timed out.
  channel.on(`new:chat:${userId}`, openChat)
  joinChannel(channel, {
    onOk: () => {
      setConnection("open", "Connected")
      hideNotice()
      elements.user.replaceChildren("Signed in as ", el("strong", {}, userId))
      elements.user.hidden = false
      state.joined = true
      updateClaimButton()
      loadInitialCounts()
    },
    onError: (reason) => {
      setConnection("error", "Not joined")
      showNotice(
        "error",
        `The server did not let this page join as a teacher: ${reason}.`,
        tokenHint("teacher"),
      )
    },
  })
  elements.claim.addEventListener("click", claimNext)
}

const session = requireSession("teacher")
if (session) {
  start(session)
}
