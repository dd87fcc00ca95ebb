// The dashboard: polls GET /stats every second and shows who is online, the
// queue, the chats in progress and each worker's load. Rates (messages and CPU
// per second) come from the difference between polls over a short window,
// because workers report their counters to the matchmaker only once a second.

import {el, hideNotice, setConnection, showNotice} from "./common.js"

const POLL_MS = 1000
const FETCH_TIMEOUT_MS = 3000
const RATE_WINDOW_MS = 5000
const MAX_CHAT_ROWS = 50
// When /stats carries no per-chat message count, the count is read from the
// chat log of at most this many chats per poll.
const MAX_LOG_READS = 12

const STUDENT_STATUSES = [
  {key: "waiting", label: "Waiting"},
  {key: "chatting", label: "Chatting"},
  {key: "finished", label: "Finished"},
  {key: "idle", label: "Not ready"},
]

// Successive polls: {at: ms, workers: [messages or null], cpu: cpu_s object}.
const samples = []

const $ = (id) => document.getElementById(id)

async function fetchJson(path) {
  const response = await fetch(path, {signal: AbortSignal.timeout(FETCH_TIMEOUT_MS)})
  if (!response.ok) {
    throw new Error(`GET ${path} failed with HTTP status ${response.status}`)
  }
  return response.json()
}

function formatNumber(value, digits = 0) {
  return value === null || value === undefined || Number.isNaN(value)
    ? "–"
    : value.toLocaleString(undefined, {
        minimumFractionDigits: digits,
        maximumFractionDigits: digits,
      })
}

function formatAge(seconds) {
  if (seconds === null || seconds === undefined) {
    return "–"
  }
  const whole = Math.max(0, Math.floor(seconds))
  const hours = Math.floor(whole / 3600)
  const minutes = Math.floor((whole % 3600) / 60)
  const rest = whole % 60
  if (hours > 0) {
    return `${hours} h ${String(minutes).padStart(2, "0")} min`
  }
  if (minutes > 0) {
    return `${minutes} min ${String(rest).padStart(2, "0")} s`
  }
  return `${rest} s`
}

/** Record this poll and drop samples older than the rate window. */
function addSample(stats) {
  const now = Date.now()
  samples.push({
    at: now,
    workers: (stats.workers ?? []).map((worker) => (worker ? worker.messages : null)),
    cpu: stats.cpu_s ?? null,
  })
  while (samples.length > 2 && now - samples[0].at > RATE_WINDOW_MS) {
    samples.shift()
  }
}

/** Per-second rate of `pick(sample)` over the window, or null if unknown. */
function rate(pick) {
  if (samples.length < 2) {
    return null
  }
  const first = samples[0]
  const last = samples[samples.length - 1]
  const before = pick(first)
  const after = pick(last)
  const seconds = (last.at - first.at) / 1000
  // A restarted worker starts its counters again from zero.
  if (before === null || after === null || after < before || seconds <= 0) {
    return null
  }
  return (after - before) / seconds
}

function renderPeople(stats) {
  const chats = stats.chats ?? []
  const teachersTotal = stats.teachers?.total ?? 0
  const busy = new Set(chats.map((chat) => chat.teacher_id)).size
  $("teachers-total").textContent = formatNumber(teachersTotal)
  $("teachers-detail").textContent = `${busy} in chats · ${Math.max(0, teachersTotal - busy)} free`

  const students = stats.students ?? {}
  const total = students.total ?? 0
  const counts = {
    waiting: students.waiting ?? 0,
    chatting: students.chatting ?? 0,
    finished: students.finished ?? 0,
  }
  counts.idle = Math.max(0, total - counts.waiting - counts.chatting - counts.finished)
  $("students-total").textContent = formatNumber(total)
  $("students-bar").replaceChildren(
    ...STUDENT_STATUSES.filter(({key}) => counts[key] > 0).map(({key}) =>
      el("span", {class: `swatch-${key}`, style: `width: ${(100 * counts[key]) / total}%`}),
    ),
  )
  $("students-legend").replaceChildren(
    ...STUDENT_STATUSES.map(({key, label}) =>
      el("li", {class: `swatch-${key}`}, `${label} ${counts[key]}`),
    ),
  )
  $("queue-length").textContent = formatNumber(stats.queue_length)
  $("chats-total").textContent = formatNumber(stats.chats_in_progress ?? chats.length)
}

/** Return a chat's message count from /stats, or null when /stats has none. */
function statsMessageCount(chat) {
  for (const count of [chat.message_count, chat.messages]) {
    if (typeof count === "number") {
      return count
    }
  }
  return null
}

/** Read the message counts that /stats lacks from the chat logs of `chats`. */
async function readLogCounts(chats) {
  const missing = chats.filter((chat) => statsMessageCount(chat) === null).slice(0, MAX_LOG_READS)
  const counts = new Map()
  await Promise.all(
    missing.map(async (chat) => {
      try {
        const log = await fetchJson(`/chats/${encodeURIComponent(chat.id)}/messages`)
        counts.set(chat.id, log.messages.length)
      } catch {
        // A chat whose log is not written yet shows no count.
      }
    }),
  )
  return counts
}

function emptyRow(columns, text) {
  return el("tr", {class: "table-empty"}, el("td", {colspan: columns}, text))
}

function renderChats(chats, logCounts) {
  const body = $("chats-body")
  if (chats.length === 0) {
    body.replaceChildren(emptyRow(6, "No chats in progress."))
    return
  }
  const nowS = Date.now() / 1000
  const rows = chats.slice(0, MAX_CHAT_ROWS).map((chat) => {
    const count = statsMessageCount(chat) ?? logCounts.get(chat.id) ?? null
    const age = typeof chat.created_at === "number" ? nowS - chat.created_at : null
    return el(
      "tr",
      {"data-chat": chat.id},
      el("td", {class: "id"}, chat.id),
      el("td", {}, chat.teacher_id),
      el("td", {}, chat.student_id),
      el("td", {class: "number"}, formatNumber(chat.worker)),
      el("td", {class: "number"}, formatNumber(count)),
      el("td", {class: "number"}, formatAge(age)),
    )
  })
  if (chats.length > MAX_CHAT_ROWS) {
    rows.push(emptyRow(6, `and ${chats.length - MAX_CHAT_ROWS} more chats`))
  }
  body.replaceChildren(...rows)
}

function renderWorkers(stats) {
  const workers = stats.workers ?? []
  const body = $("workers-body")
  if (workers.length === 0) {
    body.replaceChildren(emptyRow(7, "No workers reported."))
    return
  }
  let totalRate = 0
  const rows = workers.map((worker, slot) => {
    const messagesRate = rate((sample) => sample.workers[slot] ?? null)
    const cpuRate = rate((sample) => sample.cpu?.workers?.[slot] ?? null)
    totalRate += messagesRate ?? 0
    if (worker === null) {
      return el(
        "tr",
        {},
        el("td", {}, `${slot}`),
        el("td", {colspan: 6, class: "muted"}, "No report yet (starting or restarting)."),
      )
    }
    return el(
      "tr",
      {"data-slot": slot},
      el("td", {}, `${worker.slot ?? slot}`),
      el("td", {class: "number"}, formatNumber(worker.connections)),
      el("td", {class: "number"}, formatNumber(worker.chats)),
      el("td", {class: "number"}, formatNumber(worker.messages)),
      el("td", {class: "number"}, formatNumber(messagesRate, 1)),
      el("td", {class: "number"}, cpuRate === null ? "–" : `${formatNumber(100 * cpuRate, 1)} %`),
      el("td", {class: "number"}, formatNumber(worker.handoffs_failed)),
    )
  })
  body.replaceChildren(...rows)
  $("messages-rate").textContent =
    samples.length < 2
      ? "measuring message rate…"
      : `${formatNumber(totalRate, 1)} messages/s logged`

  const router = rate((sample) => sample.cpu?.router ?? null)
  const matchmaker = rate((sample) => sample.cpu?.matchmaker ?? null)
  const parts = []
  if (router !== null) {
    parts.push(`Router CPU ${formatNumber(100 * router, 1)} %`)
  }
  if (matchmaker !== null) {
    parts.push(`matchmaker CPU ${formatNumber(100 * matchmaker, 1)} %`)
  }
  if (typeof stats.uptime_s === "number") {
    parts.push(`up ${formatAge(stats.uptime_s)}`)
  }
  $("processes").textContent = parts.join(" · ")
}

async function poll() {
  try {
    const stats = await fetchJson("/stats")
    const chats = [...(stats.chats ?? [])].sort((a, b) => (a.created_at ?? 0) - (b.created_at ?? 0))
    const logCounts = await readLogCounts(chats.slice(0, MAX_CHAT_ROWS))
    addSample(stats)
    renderPeople(stats)
    renderChats(chats, logCounts)
    renderWorkers(stats)
    $("updated").textContent = `Updated ${new Date().toLocaleTimeString()}, every second.`
    setConnection("open", "Live")
    hideNotice()
  } catch (error) {
    setConnection("error", "Stale")
    showNotice(
      "warning",
      "Could not load the server statistics.",
      `${error.message}. Retrying every second.`,
    )
  } finally {
    setTimeout(poll, POLL_MS)
  }
}

poll()
