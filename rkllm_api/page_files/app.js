// The page at /: the server's state every few seconds and a quick chat. It uses the
// same API as any client, on this origin only; the key (when the server wants one)
// stays in this tab's sessionStorage. Server text is always set as textContent.
"use strict";

const REFRESH_MS = 3000;
const KEY_STORAGE = "rkllm-api-key";
const chat = { messages: [], controller: null };

function $(selector) { return document.querySelector(selector); }

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text === null || text === undefined ? "-" : String(text);
  if (className) td.className = className;
  return td;
}

class KeyNeeded extends Error {}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) headers["Authorization"] = "Bearer " + key;
  const response = await fetch(path, Object.assign({}, options, { headers, credentials: "same-origin" }));
  if (response.status === 401) {
    askForKey(key ? "that key was refused" : "");
    throw new KeyNeeded("an API key is needed");
  }
  if (!response.ok) {
    let message = "the server answered " + response.status;
    try {
      const body = await response.json();
      message = (body.error && (body.error.message || body.error)) || message;
    } catch (ignored) { /* not JSON: keep the status */ }
    throw new Error(message);
  }
  return response;
}

function askForKey(problem) {
  $("#key-form").hidden = false;
  $("#key-error").textContent = problem;
}

// ---------------------------------------------------------------- the overview

async function refresh() {
  try {
    const [models, status] = await Promise.all([
      api("/v1/models").then(r => r.json()), api("/ui/status").then(r => r.json())]);
    $("#server-state").textContent = "version " + status.version +
      (status.shutting_down ? " — shutting down" : "");
    const loaded = new Set(Object.values(status.devices).map(d => d.model).filter(Boolean));
    showModels(models.data, loaded);
    showDevices(status.devices);
    showNpu(status.npu_load);
    showRecent(status.recent);
  } catch (error) {
    if (!(error instanceof KeyNeeded)) $("#server-state").textContent = "unreachable: " + error.message;
  }
}

function showModels(models, loaded) {
  const body = $("#models tbody");
  body.replaceChildren();
  for (const model of models) {
    const row = body.insertRow();
    row.dataset.model = model.id;
    cell(row, model.id);
    cell(row, model.device);
    cell(row, model.context_length);
    cell(row, (model.capabilities || []).join(", "));
    if (loaded.has(model.id)) cell(row, "loaded", "loaded");
    else cell(row, model.available === false ? (model.problem || "unavailable") : "not loaded",
              model.available === false ? "error" : "muted");
  }
  fillPicker(models.filter(m => m.available !== false && !m.parent));
}

function fillPicker(models) {
  const picker = $("#model-picker");
  const chosen = picker.value;
  const ids = models.map(m => m.id);
  if (ids.join("\n") === Array.from(picker.options, o => o.value).join("\n")) return;
  picker.replaceChildren(...ids.map(id => new Option(id, id)));
  if (ids.includes(chosen)) picker.value = chosen;
}

function showDevices(devices) {
  const body = $("#devices tbody");
  body.replaceChildren();
  for (const [name, device] of Object.entries(devices)) {
    const row = body.insertRow();
    cell(row, name);
    cell(row, device.model || "none");
    cell(row, device.busy ? "busy" : (device.model ? "idle " + Math.round(device.idle_seconds) + " s" : "free"));
    cell(row, device.queue_length);
  }
}

function showNpu(load) {
  const box = $("#npu");
  const cores = Object.entries(load || {});
  if (!cores.length) { box.textContent = "no NPU load readable"; return; }
  box.replaceChildren(...cores.map(([core, percent]) => {
    const line = document.createElement("div");
    const bar = document.createElement("span");
    const fill = document.createElement("span");
    bar.className = "bar";
    fill.style.width = Math.min(100, Math.max(0, percent)) + "%";
    bar.append(fill);
    line.append("core " + core, bar, percent + " %");
    return line;
  }));
}

function showRecent(recent) {
  $("#recent-note").hidden = recent !== null;
  const body = $("#recent tbody");
  body.replaceChildren();
  for (const run of recent || []) {
    const row = body.insertRow();
    cell(row, run.model);
    cell(row, run.device);
    cell(row, run.prompt_tokens);
    cell(row, run.generated_tokens);
    cell(row, run.tokens_per_second);
    cell(row, run.prefill_tokens_saved);
    cell(row, run.finish);
  }
}

// ---------------------------------------------------------------- the chat

function newTurn(text) {
  const turn = document.createElement("div");
  turn.className = "turn";
  turn.dataset.state = "streaming";
  const user = document.createElement("div");
  user.className = "user";
  user.textContent = text;
  const thinking = document.createElement("details");
  thinking.className = "thinking";
  thinking.hidden = true;
  const summary = document.createElement("summary");
  summary.textContent = "Thinking";
  const thoughts = document.createElement("pre");
  thinking.append(summary, thoughts);
  const answer = document.createElement("div");
  answer.className = "answer";
  turn.append(user, thinking, answer);
  $("#transcript").append(turn);
  return { turn, thinking, thoughts, answer };
}

// The SSE body of a streamed chat, one parsed data payload at a time.
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send(text) {
  const parts = newTurn(text);
  chat.messages.push({ role: "user", content: text });
  chat.controller = new AbortController();
  setBusy(true);
  let answer = "";
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST", signal: chat.controller.signal,
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: $("#model-picker").value, messages: chat.messages, stream: true }),
    });
    for await (const event of sseEvents(response)) {
      if (event.error) throw new Error(event.error.message || String(event.error));
      const delta = (event.choices && event.choices[0] && event.choices[0].delta) || {};
      if (delta.reasoning_content) {
        parts.thinking.hidden = false;
        parts.thoughts.textContent += delta.reasoning_content;
      }
      if (delta.content) {
        answer += delta.content;
        parts.answer.textContent = answer;
      }
      $("#transcript").scrollTop = $("#transcript").scrollHeight;
    }
    chat.messages.push({ role: "assistant", content: answer });
    parts.turn.dataset.state = "done";
  } catch (error) {
    chat.messages.pop();
    parts.turn.dataset.state = "error";
    const note = document.createElement("div");
    note.className = "error";
    note.textContent = error.name === "AbortError" ? "stopped" : error.message;
    parts.turn.append(note);
  } finally {
    chat.controller = null;
    setBusy(false);
    refresh();
  }
}

function setBusy(busy) {
  $("#send").disabled = busy;
  $("#stop").disabled = !busy;
}

function start() {
  $("#chat-form").addEventListener("submit", event => {
    event.preventDefault();
    const text = $("#prompt").value.trim();
    if (!text || chat.controller || !$("#model-picker").value) return;
    $("#prompt").value = "";
    send(text);
  });
  $("#prompt").addEventListener("keydown", event => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("#chat-form").requestSubmit();
    }
  });
  $("#stop").addEventListener("click", () => chat.controller && chat.controller.abort());
  $("#new-chat").addEventListener("click", () => {
    chat.messages = [];
    $("#transcript").replaceChildren();
  });
  $("#key-form").addEventListener("submit", event => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, $("#key-input").value.trim());
    $("#key-form").hidden = true;
    refresh();
  });
  refresh();
  setInterval(refresh, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", start);
