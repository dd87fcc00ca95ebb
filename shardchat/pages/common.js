// Helpers shared by the student and teacher pages: the token from the URL, the
// phoenix.js socket with a clear message when the server rejects it, and small
// DOM builders. The official phoenix.js (served at /vendor/phoenix.js) defines
// the global `Phoenix` before these modules run.

const SOCKET_PATH = "/socket"
const HEALTH_TIMEOUT_MS = 3000

/** Return the `token` query parameter of the page URL, or null. */
export function readToken() {
  const token = new URLSearchParams(window.location.search).get("token")
  return token && token.trim() ? token.trim() : null
}

/**
 * Decode a token's payload ({u: user id, r: role, x: expiry}), or return null
 * for a malformed token. The signature is left to the server to verify.
 */
export function decodeToken(token) {
  const encoded = token.split(".")[0]
  try {
    const base64 = encoded.replace(/-/g, "+").replace(/_/g, "/")
    const payload = JSON.parse(atob(base64.padEnd(Math.ceil(base64.length / 4) * 4, "=")))
    return typeof payload.u === "string" && typeof payload.r === "string" ? payload : null
  } catch {
    return null
  }
}

/** Create an element with attributes, properties (for `on*` handlers) and children. */
export function el(tag, attributes = {}, ...children) {
  const element = document.createElement(tag)
  for (const [name, value] of Object.entries(attributes)) {
    if (value === false || value === null || value === undefined) {
      continue
    }
    if (name.startsWith("on")) {
      element.addEventListener(name.slice(2), value)
    } else if (value === true) {
      element.setAttribute(name, "")
    } else {
      element.setAttribute(name, String(value))
    }
  }
  element.append(...children.filter((child) => child !== null && child !== undefined))
  return element
}

/** Format a time in milliseconds since the epoch as HH:MM. */
export function formatClock(ms) {
  return new Date(ms).toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"})
}

/**
 * Show a page-wide notice until it is hidden or replaced. `kind` is "info",
 * "ok", "warning" or "error".
 */
export function showNotice(kind, text, detail = null) {
  const notice = document.getElementById("notice")
  notice.className = `notice notice-${kind}`
  notice.setAttribute("role", kind === "error" ? "alert" : "status")
  notice.replaceChildren(el("strong", {}, text), detail ? el("p", {}, ...[].concat(detail)) : null)
  notice.hidden = false
}

export function hideNotice() {
  document.getElementById("notice").hidden = true
}

/** Set the connection badge in the page header. */
export function setConnection(state, label) {
  const badge = document.getElementById("connection")
  badge.dataset.state = state
  badge.textContent = label
}

/** Build the notice text that explains how to get a token for `role`. */
export function tokenHint(role) {
  const page = role === "teacher" ? "/teacher" : "/student"
  return [
    "A tutoring site's backend issues this token. For a local server, create one with ",
    el("code", {}, `shardchat token --user ID --role ${role}`),
    " and open ",
    el("code", {}, `${page}?token=TOKEN`),
    ".",
  ]
}

/**
 * Return the token and its user id, or show a notice and return null when
 * phoenix.js or a usable token is missing.
 */
export function requireSession(role) {
  if (typeof window.Phoenix === "undefined") {
    showNotice("error", "The Phoenix client library did not load.", [
      "The server answers /vendor/phoenix.js once its page dependencies are installed: run ",
      el("code", {}, "npm ci --prefix shardchat/pages"),
      " and reload.",
    ])
    setConnection("error", "Not connected")
    return null
  }
  const token = readToken()
  if (token === null) {
    showNotice("error", "This page needs a token in its address.", tokenHint(role))
    setConnection("error", "Not connected")
    return null
  }
  const claims = decodeToken(token)
  if (claims === null) {
    showNotice("error", "The token in the address is malformed.", tokenHint(role))
    setConnection("error", "Not connected")
    return null
  }
  if (claims.r !== role) {
    showNotice("error", `This token is for a ${claims.r}, not a ${role}.`, tokenHint(role))
    setConnection("error", "Not connected")
    return null
  }
  return {token, userId: claims.u}
}

async function serverIsUp() {
  try {
    const response = await fetch("/healthz", {signal: AbortSignal.timeout(HEALTH_TIMEOUT_MS)})
    return response.ok
  } catch {
    return false
  }
}

/**
 * Open a phoenix.js socket with `params`.
 *
 * A socket that fails before it ever opened was rejected (bad or expired
 * token) or could not reach the server. It is then disconnected, so phoenix.js
 * stops retrying, and `onRejected(message)` is called. Once a socket has
 * opened, phoenix.js reconnects by itself and `onState` follows it with
 * "open" or "reconnecting".
 */
export function openSocket(params, {onRejected, onState}) {
  const socket = new window.Phoenix.Socket(SOCKET_PATH, {params})
  let opened = false
  let rejected = false
  socket.onOpen(() => {
    opened = true
    onState("open")
  })
  socket.onError(async () => {
    if (opened) {
      onState("reconnecting")
      return
    }
    if (rejected) {
      return
    }
    rejected = true
    socket.disconnect()
    const up = await serverIsUp()
    onRejected(
      up
        ? "The server rejected the connection: the token is invalid or expired."
        : "The server cannot be reached. Check that shardchat is running, then reload.",
    )
  })
  socket.onClose(() => {
    if (opened && !rejected) {
      onState("reconnecting")
    }
  })
  socket.connect()
  return socket
}

/**
 * Join `channel`. Call `onOk` on each successful join or rejoin, and
 * `onError` with the server's reason when a join fails or times out.
 */
export function joinChannel(channel, {onOk, onError}) {
  channel
    .join()
    .receive("ok", onOk)
    .receive("error", (response) => {
      onError(response && response.reason ? response.reason : "join failed")
    })
    .receive("timeout", () => onError("the join timed out"))
}

/**
 * Push `event` and resolve with the ok response. Reject with an Error whose
 * message is the server's reason, or "the request timed out".
 */
export function pushRequest(channel, event, payload = {}) {
  return new Promise((resolve, reject) => {
    channel
      .push(event, payload)
      .receive("ok", resolve)
      .receive("error", (response) => reject(new Error(response?.reason ?? "request failed")))
      .receive("timeout", () => reject(new Error("the request timed out")))
  })
}

/**
 * A chat transcript: an ordered list in a scrollable log region. `append`
 * adds one message with its sender label ("You" or the other side).
 */
export class Transcript {
  constructor(label) {
    this.list = el("ol", {
      class: "transcript",
      role: "log",
      "aria-label": label,
      "aria-live": "polite",
    })
    this.empty = el("li", {class: "transcript-empty"}, "No messages yet.")
    this.list.append(this.empty)
  }

  append({mine, sender, text, sentAt = Date.now(), seq = null}) {
    this.empty.remove()
    const meta = el(
      "span",
      {class: "message-meta"},
      el("span", {class: "message-sender"}, sender),
      " ",
      el("time", {datetime: new Date(sentAt).toISOString()}, formatClock(sentAt)),
    )
    const item = el(
      "li",
      {class: mine ? "message message-mine" : "message message-theirs", "data-seq": seq},
      meta,
      el("p", {class: "message-body"}, text),
    )
    this.list.append(item)
    this.list.scrollTop = this.list.scrollHeight
  }

  note(text) {
    this.empty.remove()
    this.list.append(el("li", {class: "transcript-note"}, text))
    this.list.scrollTop = this.list.scrollHeight
  }
}

/** Return the sentence shown for a chat:terminated reason. */
export function endReasonText(reason) {
  const texts = {
    teacher_ended: "The teacher ended the chat.",
    teacher_left: "The teacher left the chat.",
    student_left: "The student left the chat.",
    teacher_disconnected: "The teacher lost the connection.",
    student_disconnected: "The student lost the connection.",
    worker_lost: "The chat server restarted.",
  }
  return texts[reason] ?? `The chat ended (${reason}).`
}
