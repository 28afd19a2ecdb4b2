// shmstream chat page: a list of chats kept in this browser, whose answers survive a
// reload, a dropped connection and a second tab; answers render as markdown (marked, then
// DOMPurify: model output never becomes live HTML); the model comes from GET /v1/models. It speaks the resumable-stream protocol the llama.cpp web UI
// uses: POST a streamed completion with X-Conversation-Id, count the response's bytes up to
// the last complete line, and re-attach with GET /v1/stream/<id>?from=<bytes>; find sessions
// with POST /v1/streams/lookup; Stop is DELETE /v1/stream/<id>.
"use strict";

const API_BASE = new URL("../v1/", document.baseURI); // the page lives at <root>/shmstream/
const KEY_CURRENT = "shmstream.current"; // the current chat's id, shared by all tabs
const KEY_API = "shmstream.apiKey";
const KEY_INDEX = "shmstream.chats"; // [{id, title, updatedAt}], newest first
const KEY_MODEL = "shmstream.model";
const MAX_CHATS = 50; // older chats are forgotten (with their saved answers)
const chatKey = (id) => `shmstream.chat.${id}`;

const FINAL = new Set(["done", "cancelled", "aborted", "failed", "lost", "gone"]);
// What the status line says: words for the person chatting, not protocol internals.
const STATE_LABELS = {
  idle: "ready", waiting: "waiting for the model", running: "answering",
  reconnecting: "reconnecting", done: "done", cancelled: "stopped", aborted: "interrupted",
  failed: "failed", lost: "too old to resume", gone: "no longer on the server",
  key: "API key needed",
};
const POLL_MS = 1000; // lookup while idle: another tab or browser may have started an answer
const PENDING_TIMEOUT_MS = 30000; // a sent message whose session never appeared is gone
const backoffMs = (misses) => Math.min(4000, 250 * 2 ** misses);

const $ = (id) => document.getElementById(id);
const isFinal = (state) => FINAL.has(state);

// --- state ---------------------------------------------------------------------------------
// A chat: {id, turns: [{user, sentAt, before, answer}]}; an answer: {state, text, offset,
// startedAt, error}. `offset` counts the session's bytes up to the last complete line that
// `text` was built from; `startedAt` is the session's started_at, which tells whether saved
// text belongs to the session the server has now. `before` is the newest session the chat
// had when the message was sent, so any tab can tell the new session from the old one.

let chat = null;
let reading = null; // {turn, controller} while this tab reads an answer's bytes
let syncing = false;
let sending = false; // between Send and the message's turn being recorded
let sendAgain = false; // Send was pressed again while the last press was still in flight
let notice = ""; // a transient remark for the status line (reconnecting, resumed, ...)
let needKey = false; // the last API call was refused for want of a (right) key

function newAnswer() {
  return { state: "waiting", text: "", offset: 0, startedAt: null, error: null };
}

function randomId() {
  const bytes = crypto.getRandomValues(new Uint8Array(12)); // randomUUID needs https
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// --- storage: shared with other tabs; a tab never overwrites newer progress --------------

function loadChat(id) {
  try {
    const chatRecord = JSON.parse(localStorage.getItem(chatKey(id)));
    return chatRecord && Array.isArray(chatRecord.turns) ? chatRecord : null;
  } catch {
    return null;
  }
}

function progress(answer) {
  return [isFinal(answer.state) ? 1 : 0, answer.startedAt ?? -1, answer.offset];
}

function isBehind(mine, theirs) {
  const [a, b] = [progress(mine), progress(theirs)];
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return a[i] < b[i];
  return false;
}

function save() {
  const stored = loadChat(chat.id);
  if (stored && stored.turns.length > chat.turns.length) return; // another tab sent more
  if (stored && stored.turns.length === chat.turns.length && chat.turns.length > 0) {
    const [mine, theirs] = [chat.turns.at(-1).answer, stored.turns.at(-1).answer];
    if (isBehind(mine, theirs)) return;
  }
  try {
    localStorage.setItem(chatKey(chat.id), JSON.stringify(chat));
    indexChat(chat);
  } catch { // quota: keep reading; only a reload would lose the unsaved part
    notice = "this browser's storage is full: the answer is not saved";
  }
}

function openChat(id) {
  chat = loadChat(id) ?? { id, turns: [] };
  localStorage.setItem(KEY_CURRENT, id);
  renderAll();
}

// --- the list of chats ------------------------------------------------------------------

function chatIndex() {
  try {
    const index = JSON.parse(localStorage.getItem(KEY_INDEX));
    return Array.isArray(index) ? index.filter((entry) => entry && entry.id) : [];
  } catch {
    return [];
  }
}

function titleOf(chatRecord) {
  const first = chatRecord.turns.find((turn) => turn.user)?.user ?? "";
  const line = first.split("\n")[0].trim();
  return line.length > 60 ? `${line.slice(0, 57)}...` : line || "(untitled)";
}

// Record the chat in the list (newest first); a chat without turns is not listed yet.
function indexChat(chatRecord) {
  if (chatRecord.turns.length === 0) return;
  const title = titleOf(chatRecord);
  const current = chatIndex();
  if (current[0]?.id === chatRecord.id && current[0].title === title) return; // every chunk
  const index = current.filter((entry) => entry.id !== chatRecord.id);
  index.unshift({ id: chatRecord.id, title, updatedAt: Date.now() });
  for (const forgotten of index.splice(MAX_CHATS)) localStorage.removeItem(chatKey(forgotten.id));
  localStorage.setItem(KEY_INDEX, JSON.stringify(index));
  renderChatList();
}

function switchChat(id) {
  $("chats").open = false;
  if (id === chat.id) return;
  stopReading(); // the answer goes on on the server; switching back picks it up
  notice = "";
  openChat(id);
  sync();
}

async function deleteChat(id) {
  if (id === chat.id) {
    const turn = chat.turns.at(-1);
    if (turn && !isFinal(turn.answer.state)) await stop();
    stopReading();
  }
  localStorage.removeItem(chatKey(id));
  localStorage.setItem(KEY_INDEX, JSON.stringify(chatIndex().filter((e) => e.id !== id)));
  if (id === chat.id) openChat(chatIndex()[0]?.id ?? randomId());
  renderChatList();
}

// --- models: the upstream's GET /v1/models, the choice kept in this browser ---------------

async function loadModels() {
  let ids = [];
  try {
    const response = await apiFetch("models");
    if (response.ok) {
      const body = await response.json();
      const entries = Array.isArray(body?.data) ? body.data : body?.models ?? [];
      ids = entries.map((entry) => entry?.id ?? entry?.model ?? entry?.name)
        .filter((id) => typeof id === "string" && id);
    }
  } catch { /* no list: the server's default model answers */ }
  const select = $("model");
  select.replaceChildren(...ids.map((id) => new Option(id, id)));
  const saved = localStorage.getItem(KEY_MODEL);
  if (saved && ids.includes(saved)) select.value = saved;
  $("model-box").hidden = ids.length === 0;
}

const chosenModel = () => ($("model-box").hidden ? null : $("model").value || null);

// --- the API ------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function apiFetch(path, init = {}) {
  const headers = new Headers(init.headers);
  const key = localStorage.getItem(KEY_API);
  if (key) headers.set("Authorization", `Bearer ${key}`);
  const response = await fetch(new URL(path, API_BASE), { cache: "no-store", ...init, headers });
  if (needKey !== (response.status === 401)) {
    needKey = response.status === 401;
    if (needKey) $("key-box").open = true;
    renderStatus();
  }
  return response;
}

async function errorOf(response) {
  let message = `HTTP ${response.status}`;
  try {
    const body = await response.json();
    message = body?.error?.message ?? message;
  } catch { /* not JSON: keep the status */ }
  return new ApiError(response.status, message);
}

const streamPath = () => `stream/${encodeURIComponent(chat.id)}`;

async function lookup() {
  const response = await apiFetch("streams/lookup", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ conversation_ids: [chat.id] }),
  });
  if (!response.ok) throw await errorOf(response);
  const entries = await response.json();
  return entries.filter((entry) => entry.conversation_id === chat.id);
}

function newestOf(entries) {
  let newest = null;
  for (const entry of entries) {
    if (!newest || entry.started_at > newest.started_at
        || (entry.started_at === newest.started_at && !entry.is_done)) newest = entry;
  }
  return newest;
}

function sameSession(entry, before) {
  return before !== null && entry.started_at === before.started_at
    && (!before.is_done || (entry.is_done && entry.total_bytes === before.total_bytes));
}

// The session holding a turn's answer: a lookup entry, "pending" (not created yet),
// "replaced" (a newer message took the conversation id) or null (evicted or expired).
function sessionOf(turn, entries) {
  const newest = newestOf(entries);
  const startedAt = turn.answer.startedAt;
  if (startedAt !== null) {
    if (!newest) return null;
    return newest.started_at === startedAt ? newest : "replaced";
  }
  if (!newest || sameSession(newest, turn.before)) return "pending";
  return newest;
}

// --- reading a stream: count bytes, parse complete lines ------------------------------------

class LineSplitter {
  constructor() {
    this.pending = new Uint8Array(0);
    this.decoder = new TextDecoder();
  }

  // The complete lines in `bytes` (with what was left over before), as {size, text}.
  *push(bytes) {
    let start = 0;
    for (let end = bytes.indexOf(10); end !== -1; end = bytes.indexOf(10, start)) {
      const line = concat(this.pending, bytes.subarray(start, end + 1));
      this.pending = new Uint8Array(0);
      start = end + 1;
      yield { size: line.length, text: this.decoder.decode(line).replace(/\r?\n$/, "") };
    }
    this.pending = concat(this.pending, bytes.subarray(start));
  }
}

function concat(a, b) {
  if (a.length === 0) return b.slice();
  const joined = new Uint8Array(a.length + b.length);
  joined.set(a);
  joined.set(b, a.length);
  return joined;
}

// One line of an OpenAI chat.completion.chunk stream; pings (":"), event names and blank
// lines change nothing.
function applyLine(answer, line) {
  if (!line.startsWith("data:")) return;
  const data = line.slice(5).replace(/^ /, "");
  if (data === "[DONE]") {
    answer.state = answer.error ? "failed" : "done";
    return;
  }
  let event;
  try {
    event = JSON.parse(data);
  } catch {
    return;
  }
  if (event && event.error) {
    answer.error = event.error.message ?? JSON.stringify(event.error);
    answer.state = "failed";
    return;
  }
  const delta = event?.choices?.[0]?.delta?.content;
  if (typeof delta === "string") answer.text += delta;
}

// Read a response body into the answer until it ends or the answer is final. Throws what
// the read throws (a dropped connection, or our own abort).
async function readBody(response, turn) {
  const answer = turn.answer;
  const reader = response.body.getReader();
  const lines = new LineSplitter();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    for (const line of lines.push(value)) {
      answer.offset += line.size;
      applyLine(answer, line.text);
    }
    save();
    renderTurn(turn);
    if (isFinal(answer.state)) {
      reader.cancel().catch(() => {});
      return;
    }
  }
}

// --- following an answer until it is final --------------------------------------------------

function finish(turn, state, error = null) {
  turn.answer.state = state;
  if (error) turn.answer.error = error;
  notice = "";
  save();
  renderTurn(turn);
}

function restart(answer, startedAt) {
  Object.assign(answer, { text: "", offset: 0, error: null, startedAt });
}

const pause = (ms, signal) => new Promise((resolve) => {
  const done = () => {
    clearTimeout(timer);
    signal.removeEventListener("abort", done);
    resolve();
  };
  const timer = setTimeout(done, ms);
  signal.addEventListener("abort", done);
});

// Find the turn's session and open it at the answer's offset (at 0 when the saved text may
// come from another session). Returns a 200 response; "pending" while the session does not
// exist yet; null when there is nothing to read now (the answer may have become final).
async function reattach(turn, signal, live) {
  const answer = turn.answer;
  const session = sessionOf(turn, await lookup());
  if (session === "pending") {
    if (Date.now() - turn.sentAt > PENDING_TIMEOUT_MS) finish(turn, "gone");
    return "pending";
  }
  if (session === null || session === "replaced") {
    // DELETE evicts a session at once: one we were reading that vanished was stopped.
    finish(turn, session === "replaced" || live ? "cancelled" : "gone");
    return null;
  }
  if (answer.startedAt === null) {
    // Bytes read in this page came from this session; saved ones may be another's.
    if (!live) restart(answer, null);
    answer.startedAt = session.started_at;
  }
  if (answer.offset > session.total_bytes) restart(answer, session.started_at);
  if (session.is_done && answer.offset >= session.total_bytes) {
    finish(turn, session.state ?? "done");
    return null;
  }
  if (answer.offset > 0) notice = "reconnected: the answer continues";
  if (answer.state === "waiting") answer.state = "running";
  renderTurn(turn);
  const response = await apiFetch(`${streamPath()}?from=${answer.offset}`, { signal });
  if (response.ok) return response;
  const error = await errorOf(response);
  if (response.status === 400 && /offset lost/i.test(error.message)) {
    finish(turn, "lost", error.message);
    return null;
  }
  if (response.status === 404) return null; // ended meanwhile: the next lookup says how
  throw error;
}

// Read the turn's answer, re-attaching after drops with a backoff, until it is final or
// this tab stops following (Stop, New chat, another tab's new message).
async function follow(turn, controller, response = null) {
  reading = { turn, controller };
  renderControls();
  let live = response !== null;
  let misses = 0;
  try {
    while (!isFinal(turn.answer.state) && !controller.signal.aborted) {
      const before = turn.answer.offset;
      let waitMs;
      try {
        if (response === null) response = await reattach(turn, controller.signal, live);
        if (response instanceof Response) {
          await readBody(response, turn);
          live = true;
          if (!isFinal(turn.answer.state)) notice = "the connection ended early; checking";
        }
        waitMs = response === "pending" ? 300 : null;
      } catch (error) {
        if (controller.signal.aborted) return;
        if (error instanceof ApiError && (error.status === 401 || error.status === 403)) return;
        if (error instanceof ApiError && error.status < 500 && error.status !== 429) {
          finish(turn, "failed", error.message);
          return;
        }
        notice = "connection lost; reconnecting";
        console.debug(`shmstream: ${error.message}`);
      }
      response = null;
      if (isFinal(turn.answer.state)) break;
      misses = turn.answer.offset > before ? 0 : misses + 1;
      renderTurn(turn);
      await pause(waitMs ?? backoffMs(misses), controller.signal);
    }
  } finally {
    if (reading?.controller === controller) reading = null;
    if (isFinal(turn.answer.state)) notice = "";
    renderControls();
    renderTurn(turn);
  }
}

// --- user actions ----------------------------------------------------------------------------

function history(upTo) {
  const messages = [];
  for (const turn of chat.turns) {
    if (turn.user !== null) messages.push({ role: "user", content: turn.user });
    if (turn === upTo) break;
    if (turn.answer.text) messages.push({ role: "assistant", content: turn.answer.text });
  }
  return messages;
}

// Send the message box's text; it stays in the box if the server cannot be reached.
async function send() {
  const text = $("message").value.trim();
  const last = chat.turns.at(-1);
  if (sending) {
    // Not lost: if this press's predecessor fails (say, for want of the API key just
    // typed in), this one is tried when it is over; if it succeeds, this was a repeat.
    sendAgain = true;
    return;
  }
  if (!text || reading || (last && !isFinal(last.answer.state))) return;
  let before;
  sending = true;
  sendAgain = false;
  try {
    before = newestOf(await lookup()); // so every tab can tell our new session from it
  } catch (error) {
    notice = `cannot reach the server: ${error.message}`;
    renderStatus();
    if (sendAgain) setTimeout(send, 0);
    return;
  } finally {
    sending = false;
  }
  sendAgain = false;
  $("message").value = "";
  const turn = { user: text, sentAt: Date.now(), before, answer: newAnswer() };
  notice = "";
  chat.turns.push(turn);
  save();
  renderAll();
  const controller = new AbortController();
  reading = { turn, controller };
  renderControls();
  let response;
  try {
    response = await apiFetch("chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Conversation-Id": chat.id },
      body: JSON.stringify({
        messages: history(turn), stream: true, ...(chosenModel() ? { model: chosenModel() } : {}),
      }),
      signal: controller.signal,
    });
  } catch {
    if (!controller.signal.aborted) follow(turn, controller); // the session may exist anyway
    return;
  }
  if (!response.ok) {
    reading = null;
    finish(turn, "failed", (await errorOf(response)).message);
    renderControls();
    return;
  }
  turn.answer.state = "running";
  lookup().then((entries) => { // remember which session this is, for a resume after reload
    const session = sessionOf(turn, entries);
    if (turn.answer.startedAt === null && typeof session === "object" && session !== null) {
      turn.answer.startedAt = session.started_at;
      save();
    }
  }).catch(() => {});
  follow(turn, controller, response);
}

// This tab stops reading (the answer goes on on the server).
function stopReading() {
  reading?.controller.abort();
  reading = null;
}

async function stop() {
  const turn = chat.turns.at(-1);
  if (!turn) return;
  try {
    await apiFetch(streamPath(), { method: "DELETE" });
  } catch { /* stop reading anyway */ }
  stopReading();
  finish(turn, "cancelled");
  renderControls();
}

// A new, empty chat; the current one stays in the list (a running answer goes on on the
// server, and switching back picks it up).
function newChat() {
  if (chat.turns.length === 0) return;
  stopReading();
  notice = "";
  openChat(randomId());
}

// Bring this tab up to date: follow the last answer if it is not final, or pick up a
// session that another browser started on this chat.
async function sync() {
  if (reading || syncing || !chat) return;
  syncing = true;
  try {
    const turn = chat.turns.at(-1);
    if (turn && !isFinal(turn.answer.state)) {
      follow(turn, new AbortController());
      return;
    }
    const newest = newestOf(await lookup());
    if (newest && !newest.is_done && newest.started_at !== turn?.answer.startedAt && !reading) {
      const adopted = { user: null, sentAt: Date.now(), before: null, answer: newAnswer() };
      chat.turns.push(adopted);
      save();
      renderAll();
      follow(adopted, new AbortController());
    }
  } catch { /* the next poll tries again */ } finally {
    syncing = false;
  }
}

// Another tab changed the shared storage.
function onStorage(event) {
  if (event.key === KEY_CURRENT && event.newValue && event.newValue !== chat.id) {
    stopReading();
    openChat(event.newValue);
    sync();
  } else if (event.key === chatKey(chat.id) && event.newValue) {
    const stored = loadChat(chat.id);
    if (!stored) return;
    if (reading && stored.turns.length === chat.turns.length) return; // we read it ourselves
    stopReading();
    chat = stored;
    renderAll();
    sync();
  } else if (event.key === KEY_API) {
    $("api-key").value = event.newValue ?? "";
  } else if (event.key === KEY_INDEX) {
    renderChatList();
  }
}

// --- rendering ---------------------------------------------------------------------------------

const turnElements = new Map(); // turn -> {answer, error}

function renderAll() {
  const transcript = $("transcript");
  transcript.querySelectorAll(".turn").forEach((element) => element.remove());
  turnElements.clear();
  $("empty").hidden = chat.turns.length > 0;
  for (const turn of chat.turns) {
    const article = document.createElement("article");
    article.className = "turn";
    const user = document.createElement("p");
    user.className = "user";
    user.textContent = turn.user ?? "(sent from another window)";
    const answer = document.createElement("div");
    answer.className = "answer";
    const error = document.createElement("p");
    error.className = "answer-error";
    article.append(user, answer, error);
    transcript.append(article);
    turnElements.set(turn, { answer, error });
    renderTurn(turn, false);
  }
  renderControls();
  renderStatus();
  renderChatList();
}

function renderChatList() {
  const index = chatIndex();
  if (chat && !index.some((entry) => entry.id === chat.id)) {
    index.unshift({ id: chat.id, title: "New chat", updatedAt: Date.now() });
  }
  const items = index.map((entry) => {
    const item = document.createElement("li");
    const open = document.createElement("button");
    open.type = "button";
    open.className = "chat-open";
    open.textContent = entry.title;
    open.title = `chat ${entry.id}`;
    open.dataset.id = entry.id;
    if (entry.id === chat?.id) open.setAttribute("aria-current", "true");
    open.addEventListener("click", () => switchChat(entry.id));
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "chat-delete";
    remove.textContent = "×";
    remove.title = "Delete this chat from this browser";
    remove.setAttribute("aria-label", `Delete chat ${entry.title}`);
    remove.addEventListener("click", () => deleteChat(entry.id));
    item.append(open, remove);
    return item;
  });
  $("chat-list").replaceChildren(...items);
  $("chats").querySelector("summary").textContent = `Chats (${chatIndex().length})`;
}

// Markdown to safe DOM: marked builds HTML from the model's text, DOMPurify removes every
// script, handler and dangerous URL from it before it is inserted.
function renderMarkdown(element, text) {
  if (element.dataset.source === text) return; // unchanged: keep selection and scrolling
  element.dataset.source = text;
  if (window.marked && window.DOMPurify) {
    element.innerHTML = window.DOMPurify.sanitize(
      window.marked.parse(text, { gfm: true, breaks: true }),
      { USE_PROFILES: { html: true }, FORBID_ATTR: ["style"] });
  } else {
    element.textContent = text; // the libraries did not load: plain text, still safe
  }
}

function renderTurn(turn, withStatus = true) {
  const elements = turnElements.get(turn);
  if (!elements) return;
  renderMarkdown(elements.answer, turn.answer.text);
  elements.answer.dataset.state = turn.answer.state;
  elements.error.textContent = turn.answer.error ?? "";
  elements.error.hidden = !turn.answer.error;
  if (withStatus && turn === chat.turns.at(-1)) {
    renderStatus();
    renderControls();
  }
}

function renderStatus() {
  const answer = chat.turns.at(-1)?.answer;
  let state = answer?.state ?? "idle";
  const details = [];
  if (needKey) {
    state = "key";
    details.push("this server needs an API key: paste it below");
  } else {
    if (!isFinal(state) && notice.startsWith("connection lost")) state = "reconnecting";
    if (notice && !isFinal(state)) details.push(notice);
    if (state === "lost") details.push("the server no longer holds its beginning; ask again");
    if (state === "gone") details.push("finished answers are kept for a few minutes");
    if (state === "aborted") details.push("the server stopped this answer; ask again");
  }
  $("status").dataset.state = state;
  $("state").textContent = STATE_LABELS[state] ?? state;
  $("status-detail").textContent = details.join(" · ");
}

function renderControls() {
  const answer = chat.turns.at(-1)?.answer;
  const busy = Boolean(answer && !isFinal(answer.state));
  $("stop").hidden = !busy;
  $("send").disabled = busy;
}

// --- start ---------------------------------------------------------------------------------------

function start() {
  $("api-key").value = localStorage.getItem(KEY_API) ?? "";
  $("api-key").addEventListener("input", (event) => {
    const key = event.target.value.trim();
    if (key) localStorage.setItem(KEY_API, key);
    else localStorage.removeItem(KEY_API);
    sync();
  });
  $("key-form").addEventListener("submit", (event) => event.preventDefault());
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  $("message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("model").addEventListener("change", (event) => {
    localStorage.setItem(KEY_MODEL, event.target.value);
  });
  if (window.DOMPurify) {
    window.DOMPurify.addHook("afterSanitizeAttributes", (node) => {
      if (node.tagName === "A") { // links from an answer open apart from the chat
        node.setAttribute("target", "_blank");
        node.setAttribute("rel", "noopener noreferrer");
      }
    });
  }
  window.addEventListener("storage", onStorage);
  window.addEventListener("focus", sync);
  document.addEventListener("visibilitychange", () => { if (!document.hidden) sync(); });
  setInterval(() => { if (!document.hidden) sync(); }, POLL_MS);
  openChat(localStorage.getItem(KEY_CURRENT) || randomId());
  loadModels();
  sync();
}

start();
