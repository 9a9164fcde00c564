// ember's chat page: conversations in localStorage, replies streamed from /v1/chat/completions.
"use strict";

const STORE_KEY = "ember.chat.v1";
const KEY_KEY = "ember.apiKey";
const DEFAULT_SETTINGS = { temperature: 0.7, top_p: 1, max_tokens: 1024, seed: null };

const $ = (id) => document.getElementById(id);
const state = { store: loadStore(), model: null, controller: null, busy: false };

// ---------- storage ----------

function loadStore() {
  try {
    const raw = JSON.parse(localStorage.getItem(STORE_KEY) || "null");
    if (raw && typeof raw === "object" && raw.conversations) {
      raw.settings = { ...DEFAULT_SETTINGS, ...(raw.settings || {}) };
      // a reply that was streaming when the page closed is incomplete: it is dropped, its question kept
      for (const conv of Object.values(raw.conversations)) conv.messages = conv.messages.filter((m) => !m.pending);
      return raw;
    }
  } catch (e) { /* a damaged store starts afresh */ }
  return { conversations: {}, current: null, settings: { ...DEFAULT_SETTINGS }, lastSystem: "" };
}

function save() {
  try {
    localStorage.setItem(STORE_KEY, JSON.stringify(state.store));
  } catch (e) {
    showAlert(`Could not save the conversations in this browser (${e.name}): export them, then delete old ones.`);
  }
}

function newId() {
  return Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
}

function current() {
  const s = state.store;
  return s.current && s.conversations[s.current] ? s.conversations[s.current] : null;
}

function createConversation() {
  const conv = { id: newId(), title: "New chat", created: Date.now(), updated: Date.now(),
                 system: state.store.lastSystem || "", messages: [] };
  state.store.conversations[conv.id] = conv;
  state.store.current = conv.id;
  save();
  return conv;
}

// ---------- rendering ----------

function renderMarkdown(el, text) {
  el.innerHTML = DOMPurify.sanitize(marked.parse(text, { gfm: true, breaks: true }));
  for (const pre of el.querySelectorAll("pre")) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "copy-code";
    button.textContent = "Copy";
    button.addEventListener("click", () => copyText(pre.querySelector("code")?.innerText ?? pre.innerText, button));
    pre.appendChild(button);
  }
}

function copyText(text, button) {
  const done = () => { button.textContent = "Copied"; setTimeout(() => { button.textContent = "Copy"; }, 1200); };
  if (navigator.clipboard && window.isSecureContext) navigator.clipboard.writeText(text).then(done, () => {});
  else {
    const area = document.createElement("textarea");
    area.value = text;
    document.body.appendChild(area);
    area.select();
    document.execCommand("copy");
    area.remove();
    done();
  }
}

function renderSidebar() {
  const list = $("conversations");
  list.replaceChildren();
  const convs = Object.values(state.store.conversations).sort((a, b) => b.updated - a.updated);
  for (const conv of convs) {
    const li = document.createElement("li");
    li.dataset.id = conv.id;
    li.className = conv.id === state.store.current ? "current" : "";
    const title = document.createElement("span");
    title.className = "title";
    title.textContent = conv.title;
    title.title = conv.title;
    const del = document.createElement("button");
    del.type = "button";
    del.className = "delete";
    del.title = "Delete this conversation";
    del.textContent = "\u00d7";
    del.addEventListener("click", (ev) => { ev.stopPropagation(); deleteConversation(conv.id); });
    li.append(title, del);
    li.addEventListener("click", () => { if (!state.busy) { state.store.current = conv.id; save(); renderAll(); } });
    list.appendChild(li);
  }
}

function messageView(conv, msg, index) {
  const div = document.createElement("div");
  div.className = `msg ${msg.role}`;
  div.dataset.index = String(index);
  const role = document.createElement("div");
  role.className = "role";
  role.textContent = msg.role === "user" ? "You" : (msg.model || state.model || "assistant");
  const content = document.createElement("div");
  content.className = "content";
  if (msg.role === "user") content.textContent = msg.content;
  else renderMarkdown(content, msg.content);
  div.append(role, content);
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = statsText(msg);
  div.appendChild(meta);
  if (msg.error) {
    const err = document.createElement("div");
    err.className = "error";
    err.textContent = msg.error;
    div.appendChild(err);
  }
  div.appendChild(actionsView(conv, msg, index));
  return div;
}

function actionsView(conv, msg, index) {
  const actions = document.createElement("div");
  actions.className = "actions";
  const add = (label, cls, fn) => {
    const b = document.createElement("button");
    b.type = "button";
    b.className = cls;
    b.textContent = label;
    b.disabled = state.busy;
    b.addEventListener("click", fn);
    actions.appendChild(b);
  };
  add("Edit", "edit", () => startEdit(conv, index));
  add("Copy", "copy", (ev) => copyText(msg.content, ev.target));
  if (msg.role === "assistant" && index === conv.messages.length - 1) add("Regenerate", "regenerate", () => regenerate(conv));
  return actions;
}

function statsText(msg) {
  const parts = [];
  const s = msg.stats;
  if (s) {
    parts.push(`${s.tokens} token${s.tokens === 1 ? "" : "s"}`);
    if (s.tokensPerSecond != null) parts.push(`${s.tokensPerSecond.toFixed(1)} tok/s`);
    if (s.ttftMs != null) parts.push(`first token ${Math.round(s.ttftMs)} ms`);
    if (s.finish === "length") parts.push("stopped at max tokens");
    else if (s.finish && s.finish !== "stop") parts.push(`finish: ${s.finish}`);
  }
  if (msg.stopped) parts.push("stopped");
  return parts.join(" \u00b7 ");
}

function renderMessages() {
  const conv = current();
  const box = $("messages");
  box.replaceChildren();
  if (!conv || conv.messages.length === 0) {
    const empty = document.createElement("div");
    empty.className = "empty";
    empty.textContent = "Send a message to start.";
    box.appendChild(empty);
    return;
  }
  conv.messages.forEach((msg, i) => box.appendChild(messageView(conv, msg, i)));
  box.scrollTop = box.scrollHeight;
}

function renderSettings() {
  const s = state.store.settings;
  for (const name of ["temperature", "top_p", "max_tokens", "seed"]) $(name).value = s[name] ?? "";
  $("system").value = current()?.system ?? state.store.lastSystem ?? "";
  $("api-key").value = localStorage.getItem(KEY_KEY) || "";
}

function renderAll() {
  renderSidebar();
  renderMessages();
  renderSettings();
  $("send").hidden = state.busy;
  $("stop").hidden = !state.busy;
}

function showAlert(text) {
  const el = $("alert");
  el.textContent = text;
  el.hidden = !text;
}

// ---------- talking to the server ----------

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = localStorage.getItem(KEY_KEY);
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

/** A readable message for an HTTP error: the server's own words, plus what to do about a missing key. */
async function httpError(res) {
  let message = `${res.status} ${res.statusText}`;
  try {
    const body = await res.json();
    if (body?.error?.message) message = body.error.message;
    else if (typeof body?.detail === "string") message = body.detail;
  } catch (e) { /* not JSON: keep the status line */ }
  if (res.status === 401) {
    showSettings(true, "api-key");
    return `${message}. Enter the server's API key under Settings.`;
  }
  return message;
}

/** The served model's name into the header; false (and the reason shown) when the server does not answer. */
async function loadModel() {
  try {
    const res = await fetch("v1/models", { headers: headers() });
    if (!res.ok) throw new Error(await httpError(res));
    const body = await res.json();
    state.model = body.data?.[0]?.id ?? null;
    $("model").textContent = state.model ?? "no model";
    showAlert("");
    return true;
  } catch (e) {
    $("model").textContent = "not connected";
    showAlert(e instanceof TypeError ? `Cannot reach the server: ${e.message}` : e.message);
    return false;
  }
}

function requestBody(conv) {
  const s = state.store.settings;
  const messages = [];
  if (conv.system.trim()) messages.push({ role: "system", content: conv.system });
  for (const m of conv.messages) if (!m.pending) messages.push({ role: m.role, content: m.content });
  const body = { model: state.model ?? undefined, messages, stream: true, stream_options: { include_usage: true } };
  for (const name of ["temperature", "top_p", "max_tokens", "seed"]) if (s[name] != null) body[name] = s[name];
  return body;
}

/** Lines of a server-sent event stream, as the parsed JSON of each `data:` line until [DONE]. */
async function* sseEvents(res) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let nl;
    while ((nl = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, nl).trim();
      buffer = buffer.slice(nl + 1);
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

/** Streams the assistant's reply to the conversation's messages into a new message, then saves it. */
async function generate(conv) {
  const msg = { role: "assistant", content: "", model: state.model, pending: true };
  conv.messages.push(msg);
  conv.updated = Date.now();
  const body = requestBody(conv);
  setBusy(true);
  showAlert("");
  renderMessages();
  const view = $("messages").lastElementChild;
  view.classList.add("streaming");
  const content = view.querySelector(".content");
  const started = performance.now();
  let first = null, chunks = 0, usage = null, finish = null, scheduled = false;
  const paint = () => {
    scheduled = false;
    renderMarkdown(content, msg.content);
    $("messages").scrollTop = $("messages").scrollHeight;
  };
  state.controller = new AbortController();
  try {
    const res = await fetch("v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body),
                                                     signal: state.controller.signal });
    if (!res.ok) throw new Error(await httpError(res));
    for await (const event of sseEvents(res)) {
      if (event.error) throw new Error(event.error.message || "the server ended the reply with an error");
      if (event.usage) usage = event.usage;
      const choice = event.choices?.[0];
      if (!choice) continue;
      if (choice.finish_reason) finish = choice.finish_reason;
      const delta = choice.delta?.content;
      if (delta) {
        if (first === null) first = performance.now();
        chunks += 1;
        msg.content += delta;
        if (!scheduled) { scheduled = true; requestAnimationFrame(paint); }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") msg.stopped = true;
    else msg.error = e instanceof TypeError ? `Cannot reach the server: ${e.message}` : e.message;
  }
  const ended = performance.now();
  const tokens = usage?.completion_tokens ?? chunks;
  msg.stats = { tokens, finish, ttftMs: first === null ? null : first - started,
                tokensPerSecond: first !== null && tokens > 1 && ended > first ? (tokens - 1) / ((ended - first) / 1000)
                                 : null };
  delete msg.pending;
  state.controller = null;
  conv.updated = Date.now();
  save();
  setBusy(false);
  renderAll();
}

function setBusy(busy) {
  state.busy = busy;
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("status").textContent = busy ? "generating\u2026" : "";
}

// ---------- actions ----------

async function send(text) {
  if (state.busy || !text.trim()) return;
  const conv = current() ?? createConversation();
  if (conv.messages.length === 0) conv.title = text.trim().replace(/\s+/g, " ").slice(0, 48);
  conv.messages.push({ role: "user", content: text });
  save();
  renderSidebar();
  await generate(conv);
}

async function regenerate(conv) {
  if (state.busy) return;
  if (conv.messages.at(-1)?.role === "assistant") conv.messages.pop();
  await generate(conv);
}

function startEdit(conv, index) {
  if (state.busy) return;
  const msg = conv.messages[index];
  const view = $("messages").querySelector(`.msg[data-index="${index}"]`);
  const editor = document.createElement("textarea");
  editor.className = "editor";
  editor.value = msg.content;
  const save_ = document.createElement("button");
  save_.type = "button";
  save_.className = "primary save-edit";
  save_.textContent = msg.role === "user" ? "Save & send" : "Save";
  const cancel = document.createElement("button");
  cancel.type = "button";
  cancel.textContent = "Cancel";
  cancel.addEventListener("click", renderMessages);
  save_.addEventListener("click", async () => {
    msg.content = editor.value;
    delete msg.error;
    if (msg.role === "user") {
      conv.messages.length = index + 1;  // the replies after an edited question no longer answer it
      if (index === 0) conv.title = editor.value.trim().replace(/\s+/g, " ").slice(0, 48) || conv.title;
      save();
      renderSidebar();
      await generate(conv);
    } else {
      delete msg.stats;
      save();
      renderMessages();
    }
  });
  const actions = document.createElement("div");
  actions.className = "actions";
  actions.append(save_, cancel);
  view.querySelector(".content").replaceWith(editor);
  view.querySelector(".actions").replaceWith(actions);
  editor.focus();
}

function deleteConversation(id) {
  if (state.busy && id === state.store.current) return;
  delete state.store.conversations[id];
  if (state.store.current === id) state.store.current = null;
  save();
  renderAll();
}

function showSettings(open, focus) {
  $("settings").hidden = !open;
  $("toggle-settings").setAttribute("aria-expanded", String(open));
  if (open && focus) $(focus).focus();
}

function exportConversations() {
  const data = { format: "ember-chat", version: 1, exported: new Date().toISOString(),
                 conversations: Object.values(state.store.conversations) };
  const url = URL.createObjectURL(new Blob([JSON.stringify(data, null, 2)], { type: "application/json" }));
  const a = document.createElement("a");
  a.href = url;
  a.download = `ember-conversations-${new Date().toISOString().slice(0, 10)}.json`;
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

/** Conversations from an exported file, checked; a new id where one is taken, so nothing is overwritten. */
function importConversations(text) {
  let data;
  try { data = JSON.parse(text); } catch (e) { throw new Error(`the file is not JSON (${e.message})`); }
  const list = Array.isArray(data) ? data : data?.conversations;
  if (!Array.isArray(list)) throw new Error("the file has no \"conversations\" list: export one from this page");
  const roles = new Set(["user", "assistant"]);
  list.forEach((c, i) => {
    if (!c || !Array.isArray(c.messages)
        || !c.messages.every((m) => m && roles.has(m.role) && typeof m.content === "string"))
      throw new Error(`conversation ${i + 1} is not valid: each needs "messages" with a user or assistant role and text`);
  });
  for (const c of list) {
    const id = typeof c.id === "string" && !state.store.conversations[c.id] ? c.id : newId();
    state.store.conversations[id] = { id, title: String(c.title || "Imported chat"), created: Number(c.created) || Date.now(),
                                      updated: Number(c.updated) || Date.now(), system: String(c.system || ""),
                                      messages: c.messages.map(({ role, content, stats, stopped, error, model }) =>
                                        ({ role, content, stats, stopped, error, model })) };
    state.store.current = id;
  }
  save();
  return list.length;
}

// ---------- wiring ----------

function bindSettings() {
  const numeric = { temperature: parseFloat, top_p: parseFloat, max_tokens: (v) => parseInt(v, 10), seed: (v) => parseInt(v, 10) };
  for (const [name, parse] of Object.entries(numeric)) {
    $(name).addEventListener("change", () => {
      const raw = $(name).value.trim();
      const value = raw === "" ? null : parse(raw);
      state.store.settings[name] = Number.isFinite(value) ? value : null;
      save();
    });
  }
  $("system").addEventListener("input", () => {
    state.store.lastSystem = $("system").value;
    const conv = current();
    if (conv) conv.system = $("system").value;
    save();
  });
  $("api-key").addEventListener("change", async () => {
    const key = $("api-key").value.trim();
    if (key) localStorage.setItem(KEY_KEY, key); else localStorage.removeItem(KEY_KEY);
    if (await loadModel()) showSettings(false);
  });
  $("settings").addEventListener("submit", (ev) => ev.preventDefault());
  $("toggle-settings").addEventListener("click", () => {
    showSettings($("settings").hidden);
  });
}

function bindComposer() {
  const input = $("input");
  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = input.value;
    if (!text.trim() || state.busy) return;
    input.value = "";
    send(text);
  });
  input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("new-chat").addEventListener("click", () => {
    if (state.busy) return;
    createConversation();
    renderAll();
    input.focus();
  });
  $("export").addEventListener("click", exportConversations);
  $("import").addEventListener("change", async (ev) => {
    const file = ev.target.files?.[0];
    ev.target.value = "";
    if (!file) return;
    try {
      const n = importConversations(await file.text());
      showAlert("");
      $("status").textContent = `imported ${n} conversation${n === 1 ? "" : "s"}`;
    } catch (e) {
      showAlert(`Cannot import ${file.name}: ${e.message}`);
    }
    renderAll();
  });
}

window.addEventListener("DOMContentLoaded", () => {
  bindSettings();
  bindComposer();
  renderAll();
  loadModel();
  $("input").focus();
});
