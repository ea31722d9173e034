// Spicy Avocado's page: sign in with an API key, chat with the fleet's models (OpenAI's
// streamed chat completions), watch the fleet. No framework, no build step, nothing fetched
// from another site. The key lives in sessionStorage and leaves only as a Bearer header.
"use strict";

const KEY_SLOT = "avocado.apiKey";
const FLEET_EVERY_MS = 3000;
const JOB_EVERY_MS = 1000;
const PAUSE_SHOWN_MS = 1500; // a gap between tokens at least this long is shown as a pause
const FINAL = new Set(["success", "failure", "cancelled"]);

const $ = (id) => document.getElementById(id);
const state = { history: [], running: null, fleetTimer: null };

function apiKey() {
  return sessionStorage.getItem(KEY_SLOT);
}

class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function call(path, options = {}) {
  const headers = { ...(options.headers || {}), Authorization: `Bearer ${apiKey()}` };
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    throw new HttpError(response.status, await errorText(response));
  }
  return response;
}

async function errorText(response) {
  try {
    const body = await response.json();
    const error = body.error;
    return typeof error === "string" ? error : (error && error.message) || response.statusText;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  for (const child of children) {
    node.append(child instanceof Node ? child : String(child ?? ""));
  }
  return node;
}

// --- sign in ------------------------------------------------------------------------------

async function signIn(event) {
  event.preventDefault();
  const key = $("key").value.trim();
  $("sign-in-error").textContent = "";
  sessionStorage.setItem(KEY_SLOT, key);
  try {
    await loadModels();
  } catch (error) {
    sessionStorage.removeItem(KEY_SLOT);
    $("sign-in-error").textContent =
      error.status === 401 ? "That key is unknown or revoked." : `Cannot sign in: ${error.message}`;
    return;
  }
  $("key").value = "";
  showApp();
}

function signOut() {
  stopAnswer();
  sessionStorage.removeItem(KEY_SLOT);
  clearInterval(state.fleetTimer);
  state.history = [];
  $("conversation").replaceChildren();
  $("tabs").hidden = true;
  $("view-chat").hidden = true;
  $("view-fleet").hidden = true;
  $("view-sign-in").hidden = false;
}

function showApp() {
  $("view-sign-in").hidden = true;
  $("tabs").hidden = false;
  show("chat");
}

function show(view) {
  for (const tab of document.querySelectorAll(".tab")) {
    tab.classList.toggle("active", tab.dataset.view === view);
  }
  $("view-chat").hidden = view !== "chat";
  $("view-fleet").hidden = view !== "fleet";
  clearInterval(state.fleetTimer);
  if (view === "fleet") {
    refreshFleet();
    state.fleetTimer = setInterval(refreshFleet, FLEET_EVERY_MS);
  } else {
    // Nodes come and go: the models they serve are read again each time the chat is shown.
    loadModels().catch((error) => failedSession(error) || ($("chat-error").textContent = error.message));
    $("prompt").focus();
  }
}

function failedSession(error) {
  if (error.status === 401) {
    signOut();
    $("sign-in-error").textContent = "The key was refused: sign in again.";
    return true;
  }
  return false;
}

// --- chat ---------------------------------------------------------------------------------

async function loadModels() {
  const response = await call("/v1/models");
  const models = (await response.json()).data.map((m) => m.id).sort();
  const select = $("model");
  const chosen = select.value;
  select.replaceChildren(...models.map((id) => el("option", { value: id, textContent: id })));
  if (models.includes(chosen)) select.value = chosen;
  $("send").disabled = models.length === 0;
  $("chat-error").textContent = models.length ? "" : "No node serves a model now.";
}

function answerBox(model) {
  const text = el("div", { className: "text" });
  const meta = el("div", { className: "meta" }, `${model} · queued`);
  const box = el("article", { className: "message assistant streaming" }, text, meta);
  $("conversation").append(box);
  return { box, text, meta };
}

function say(role, content) {
  $("chat-empty")?.remove();
  const box = el("article", { className: `message ${role}` }, el("div", { className: "text" }, content));
  $("conversation").append(box);
  box.scrollIntoView({ block: "end" });
}

async function send(event) {
  event.preventDefault();
  const content = $("prompt").value.trim();
  if (!content || state.running) return;
  $("chat-error").textContent = "";
  $("prompt").value = "";
  say("user", content);
  state.history.push({ role: "user", content });
  const model = $("model").value;
  const view = answerBox(model);
  const run = {
    model,
    view,
    controller: new AbortController(),
    jobId: null,
    job: null,
    tokens: 0,
    sentAt: performance.now(),
    firstAt: null,
    lastAt: null,
    longestPauseMs: 0,
    pausedMs: 0, // gaps of at least PAUSE_SHOWN_MS: not counted in the speed
    usage: null,
    ended: null,
  };
  state.running = run;
  $("send").hidden = true;
  $("stop").hidden = false;
  try {
    await stream(run);
    run.ended = run.ended || "done";
    state.history.push({ role: "assistant", content: view.text.textContent });
  } catch (error) {
    if (run.controller.signal.aborted) {
      run.ended = "stopped";
    } else {
      run.ended = "failed";
      view.box.classList.add("failed");
      if (!failedSession(error)) {
        // What the gateway said goes where the answer would have been.
        const why = el("div", { className: "why" }, error.message);
        view.text.after(why);
      }
    }
  } finally {
    state.running = null;
    $("send").hidden = false;
    $("stop").hidden = true;
    view.box.classList.remove("streaming");
    view.box.dataset.ended = run.ended;
    await followJob(run);
  }
}

async function stream(run) {
  const response = await call("/v1/chat/completions", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({
      model: run.model,
      messages: state.history,
      stream: true,
      stream_options: { include_usage: true },
    }),
    signal: run.controller.signal,
  });
  run.jobId = response.headers.get("X-Avocado-Job-Id");
  run.view.box.dataset.jobId = run.jobId || "";
  const polling = setInterval(() => readJob(run), JOB_EVERY_MS);
  readJob(run);
  try {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        if (onEvent(run, event)) return;
      }
    }
  } finally {
    clearInterval(polling);
  }
}

// One SSE event; true at the end of the stream.
function onEvent(run, event) {
  const data = event
    .split("\n")
    .filter((line) => line.startsWith("data:"))
    .map((line) => line.slice(5).trimStart())
    .join("\n");
  if (!data) return false;
  if (data === "[DONE]") return true;
  const chunk = JSON.parse(data);
  if (chunk.error) throw new Error(chunk.error.message || String(chunk.error));
  if (chunk.usage) run.usage = chunk.usage;
  const piece = chunk.choices?.[0]?.delta?.content;
  if (piece) {
    const now = performance.now();
    if (run.lastAt !== null) {
      const gap = now - run.lastAt;
      run.longestPauseMs = Math.max(run.longestPauseMs, gap);
      if (gap >= PAUSE_SHOWN_MS) run.pausedMs += gap;
    }
    run.firstAt = run.firstAt ?? now;
    run.lastAt = now;
    run.tokens += 1;
    run.view.text.textContent += piece;
    run.view.box.scrollIntoView({ block: "end" });
    showMeta(run);
  }
  return false;
}

async function readJob(run) {
  if (!run.jobId) return;
  try {
    const response = await call(`/jobs/${encodeURIComponent(run.jobId)}`);
    run.job = await response.json();
    showMeta(run);
  } catch {
    // The stream says what matters; the job's state is shown once it can be read.
  }
}

// After the stream: read the job until its state is final (a stop takes effect at the worker's
// next chunk), so the attempts and the node shown are the job's last word.
async function followJob(run) {
  for (let i = 0; i < 30 && run.jobId; i += 1) {
    await readJob(run);
    if (run.job && FINAL.has(run.job.state)) break;
    await new Promise((resolve) => setTimeout(resolve, JOB_EVERY_MS));
  }
  showMeta(run);
}

// The speed of the writing: from the first token to the last, pauses left out.
function tokensPerSecond(run) {
  const tokens = run.usage?.completion_tokens || run.tokens;
  const writingMs = run.lastAt - run.firstAt - run.pausedMs;
  if (!run.firstAt || writingMs <= 0) return null;
  return tokens / (writingMs / 1000);
}

function showMeta(run) {
  const parts = [run.model];
  const job = run.job;
  if (job?.worker) parts.push(`node ${job.worker}`);
  else if (!run.ended) parts.push("waiting for a node");
  const paused = run.longestPauseMs >= PAUSE_SHOWN_MS;
  const pause = `${(run.longestPauseMs / 1000).toFixed(1)} s`;
  if (job?.attempts > 1 && paused) {
    parts.push(`${job.attempts} attempts (a node stopped mid-answer; it went on after ${pause})`);
  } else if (job?.attempts) {
    parts.push(job.attempts === 1 ? "1 attempt" : `${job.attempts} attempts`);
    if (paused) parts.push(`paused ${pause}`);
  }
  const rate = tokensPerSecond(run);
  if (rate !== null) parts.push(`${rate.toFixed(1)} tokens/s`);
  const ended = { stopped: "stopped", failed: "failed" }[run.ended];
  if (job) parts.push(job.state);
  if (ended && job?.state !== "cancelled" && job?.state !== "failure") parts.push(ended);
  if (!job && !ended) parts.push("queued");
  const meta = run.view.meta;
  meta.textContent = parts.join(" · ");
  meta.dataset.worker = job?.worker || "";
  meta.dataset.attempts = job?.attempts ?? "";
  meta.dataset.state = job?.state || "";
  meta.title = run.jobId ? `job ${run.jobId}` : "";
}

function stopAnswer() {
  const run = state.running;
  if (!run) return;
  run.ended = "stopped";
  // Aborting the request alone cancels the job too; the DELETE says so at once.
  if (run.jobId) call(`/jobs/${encodeURIComponent(run.jobId)}`, { method: "DELETE" }).catch(() => {});
  run.controller.abort();
}

// --- fleet --------------------------------------------------------------------------------

function cells(row, values) {
  row.replaceChildren(...values.map((v) => el("td", {}, v)));
  return row;
}

// A row of one cell across the table: why a part cannot be read, or that it is empty.
function note(table, className, text) {
  const width = table.querySelectorAll("thead th").length;
  return el("tr", { className }, el("td", { colSpan: width }, text));
}

function fill(tableId, part, toRow, empty) {
  const table = $(tableId);
  const body = table.querySelector("tbody");
  if (part.error) {
    body.replaceChildren(note(table, "error", `cannot be read: ${part.error}`));
    return;
  }
  const rows = part.items.map((item) => toRow(item));
  if (!rows.length) rows.push(note(table, "empty", empty));
  body.replaceChildren(...rows);
}

function ago(iso) {
  if (!iso) return "–";
  const s = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  return s < 60 ? `${s} s ago` : s < 3600 ? `${Math.round(s / 60)} min ago` : new Date(iso).toLocaleString();
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "no cutoff";
  const m = Math.floor(seconds / 60);
  return m >= 60 ? `${Math.floor(m / 60)} h ${m % 60} min` : `${m} min ${Math.round(seconds % 60)} s`;
}

function list(values) {
  return values.length ? values.join(", ") : "–";
}

function nodeRow(node) {
  const row = cells(el("tr"), [
    node.worker,
    node.backend,
    list(node.models),
    list(node.loaded),
    `${node.running} of ${node.slots}`,
    node.draining ? "draining" : "serving",
    duration(node.time_left_s),
    ago(node.seen_at),
  ]);
  row.dataset.worker = node.worker;
  if (node.draining) row.classList.add("draining");
  return row;
}

function modelRow(model) {
  return cells(el("tr"), [
    model.name,
    model.nodes.length,
    list(model.loaded_on),
    model.backlog.interactive ?? "?",
    model.backlog.batch ?? "?",
  ]);
}

function answerRow(answer) {
  return cells(el("tr"), [
    ago(answer.at),
    answer.model ?? "–",
    answer.worker ?? "–",
    answer.attempts,
    answer.tokens,
    answer.tokens_per_s ?? "–",
  ]);
}

// A job id, short; the whole id when hovered.
function shortId(id) {
  return el("span", { title: id, className: "job-id" }, `${id.slice(0, 8)}…`);
}

function failureRow(failure) {
  return cells(el("tr"), [
    ago(failure.updated_at),
    shortId(failure.job_id),
    failure.model ?? "–",
    failure.worker ?? "–",
    failure.attempts,
    failure.error ?? "",
  ]);
}

function letterRow(letter) {
  return cells(el("tr"), [
    letter.dead_lettered_at ? ago(letter.dead_lettered_at) : "–",
    letter.task ?? "–",
    letter.reason,
    letter.original_routing_key,
    letter.deaths,
  ]);
}

async function refreshFleet() {
  let fleet;
  try {
    fleet = await (await call("/ui/api/fleet")).json();
  } catch (error) {
    if (!failedSession(error)) $("fleet-error").textContent = `The fleet cannot be read: ${error.message}`;
    return;
  }
  $("fleet-error").textContent = "";
  $("fleet-at").textContent = `read at ${new Date(fleet.at).toLocaleTimeString()}`;
  fill("nodes", fleet.nodes, nodeRow, "No live node: start a worker.");
  fill("models", fleet.models, modelRow, "No model is served.");
  fill("answers", fleet.answers, answerRow, "No answer yet.");
  const admin = "failures" in fleet;
  $("admin-parts").hidden = !admin;
  $("admin-note").hidden = admin;
  if (admin) {
    fill("failures", fleet.failures, failureRow, "No failure.");
    const letters = fleet.dead_letters;
    const part = letters.error ? letters : { items: letters.items.newest, error: null };
    $("dead-count").textContent = letters.error ? "?" : letters.items.count;
    fill("dead-letters", part, letterRow, "No dead letter.");
  }
}

// --- start --------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("sign-in-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", signOut);
  $("chat-form").addEventListener("submit", send);
  $("stop").addEventListener("click", stopAnswer);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => show(tab.dataset.view));
  }
  if (apiKey()) {
    loadModels().then(showApp, (error) => failedSession(error) || showApp());
  }
});
