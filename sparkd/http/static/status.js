// sparkd status page: streams /api/events (server-sent events) and renders the live status.
// Plain browser JavaScript, no build step, no dependencies. All data is written with
// textContent (never innerHTML): model names and engine log lines are not markup.
"use strict";

const KEY_STORAGE = "sparkd-admin-key";
const COLORS = ["#3182ce", "#38a169", "#d69e2e", "#805ad5", "#dd6b20", "#319795", "#d53f8c", "#718096"];
let latest = null;
let receivedAt = 0;
let controller = null;

function $(id) { return document.getElementById(id); }

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === "class") node.className = value;
    else if (name === "style") Object.assign(node.style, value);  // CSSOM: allowed by the page's CSP, unlike style attributes
    else node.setAttribute(name, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  seconds = Math.max(0, Math.round(seconds));
  if (seconds < 60) return seconds + "s";
  if (seconds < 3600) return Math.floor(seconds / 60) + "m" + String(seconds % 60).padStart(2, "0") + "s";
  if (seconds < 86400) return Math.floor(seconds / 3600) + "h" + String(Math.floor(seconds % 3600 / 60)).padStart(2, "0") + "m";
  return Math.floor(seconds / 86400) + "d" + Math.floor(seconds % 86400 / 3600) + "h";
}

function clock(epoch) {
  return new Date(epoch * 1000).toLocaleTimeString();
}

function setConnection(kind, text) {
  const node = $("connection");
  node.className = "connection " + kind;
  node.textContent = text;
}

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { "Authorization": "Bearer " + key } : {};
}

// -- the event stream -----------------------------------------------------------------

async function connect() {
  if (controller) controller.abort();
  controller = new AbortController();
  setConnection("connecting", "connecting…");
  let response;
  try {
    response = await fetch("/api/events", { headers: authHeaders(), cache: "no-store", signal: controller.signal });
  } catch (error) {
    return retry("cannot reach sparkd");
  }
  if (response.status === 401 || response.status === 403) {
    let message = "sparkd refused the status stream (" + response.status + ").";
    try { message = (await response.json()).error.message; } catch (ignored) { /* keep the generic text */ }
    $("auth").hidden = false;
    $("auth-message").textContent = message;
    setConnection("down", "admin key needed");
    return;
  }
  if (!response.ok || !response.body) return retry("status stream failed (" + response.status + ")");
  $("auth").hidden = true;
  setConnection("live", "live");
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        handleEvent(block);
      }
    }
  } catch (error) {
    if (error.name === "AbortError") return;
  }
  retry("stream ended");
}

function retry(reason) {
  setConnection("down", "reconnecting (" + reason + ")");
  setTimeout(connect, 2000);
}

function handleEvent(block) {
  let type = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) type = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  if (type !== "status" || !data.length) return;
  latest = JSON.parse(data.join("\n"));
  receivedAt = Date.now() / 1000;
  render(latest);
}

// -- rendering ------------------------------------------------------------------------------

function render(status) {
  const server = status.server || {};
  $("server").textContent = "v" + server.version + " · instance " + server.instance + " · policy " + server.policy +
    " · up " + duration(server.now - server.started_at);
  renderLease(status);
  renderModels(status);
  renderFailures(status);
  renderEvents(status);
  renderSwap(status);
  renderUsage(status);
}

function renderSwap(status) {
  const swap = status.swap;
  if (!swap) return;
  const quanta = status.models.filter((model) => model.quantum_left_s != null)
    .map((model) => model.name + " keeps the GPU " + duration(model.quantum_left_s) + " more while it has work");
  $("swap-text").textContent = "swaps: policy " + swap.policy + " · swap_cost_factor " + swap.cost_factor +
    " · min_uptime " + duration(swap.min_uptime_s) + (quanta.length ? " · " + quanta.join(", ") : "");
}

function renderUsage(status) {
  const rows = (status.usage_today || []).map((row) => el("tr", { "data-key": row.key },
    el("td", {}, row.key), el("td", {}, row.model), el("td", { class: "num" }, String(row.requests)),
    el("td", { class: "num" }, String(row.errors)), el("td", { class: "num" }, String(row.prompt_tokens)),
    el("td", { class: "num" }, String(row.completion_tokens)), el("td", { class: "num" }, duration(row.queue_wait_s))));
  $("usage-rows").replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: "7", class: "muted" }, "no requests today"))]));
}

function renderLease(status) {
  const lease = status.lease;
  const bar = $("lease-bar");
  bar.replaceChildren();
  Object.entries(lease.holders).forEach(([name, share], index) => {
    bar.append(el("div", { style: { width: (share * 100).toFixed(2) + "%", background: COLORS[index % COLORS.length] }, title: name + " " + share },
      name));
  });
  const box = $("lease");
  box.querySelectorAll(".lease-budget").forEach((node) => node.remove());
  box.append(el("div", { class: "lease-budget", style: { left: (lease.budget * 100).toFixed(2) + "%" }, title: "budget " + lease.budget }));
  $("lease-text").textContent = "claimed " + lease.claimed.toFixed(2) + " of a budget of " + lease.budget.toFixed(2) +
    " (free " + lease.free.toFixed(2) + ")";
  const queue = status.queue;
  const counts = Object.fromEntries(status.models.map((model) => [model.name, model.queued]));
  const waiting = (queue.models || []).map((name) => name + ": " + counts[name]);
  $("queue-text").textContent = "queue: " + queue.depth + " waiting (limit " + queue.limit + ")" +
    (waiting.length ? " · " + waiting.join(", ") : "");
}

function progressCell(model) {
  if (!["starting", "waking", "pulling"].includes(model.state)) return "";
  let fraction = null;
  let text = model.progress ? model.progress.phase : model.state;
  if (model.progress && model.progress.fraction !== null && model.progress.fraction !== undefined) {
    text += " " + Math.round(model.progress.fraction * 100) + "%";
  }
  if (model.eta_s && model.loading_for_s !== null) {
    fraction = Math.min(0.99, model.loading_for_s / model.eta_s);
    text += " · " + duration(model.loading_for_s) + " of ~" + duration(model.eta_s) +
      " · ETA " + duration(Math.max(0, model.eta_s - model.loading_for_s));
  } else if (model.progress && model.progress.fraction !== null && model.progress.fraction !== undefined) {
    fraction = model.progress.fraction;
    if (model.loading_for_s !== null) text += " · " + duration(model.loading_for_s);
  } else if (model.loading_for_s !== null) {
    text += " · " + duration(model.loading_for_s) + " (no ETA yet: first load)";
  }
  const bar = el("div", { class: "progress" }, el("div", { style: { width: ((fraction || 0) * 100).toFixed(1) + "%" } }));
  return el("div", {}, bar, el("span", { class: "progress-text" }, text));
}

function actionButton(model, action) {
  const button = el("button", { type: "button", "data-model": model.name, "data-action": action }, action);
  button.addEventListener("click", () => act(model.name, action));
  return button;
}

function renderModels(status) {
  const rows = status.models.map((model) => {
    const state = el("span", { class: "state state-" + model.state }, model.state);
    const reason = model.reason ? el("span", { class: "reason" }, model.reason) : null;
    const actions = el("td", {});
    if (["stopped", "failed", "sleeping"].includes(model.state)) actions.append(actionButton(model, "start"));
    if (["ready", "starting", "sleeping", "failed", "draining"].includes(model.state)) actions.append(actionButton(model, "stop"));
    return el("tr", { "data-model": model.name, "data-state": model.state },
      el("td", { class: "name" }, model.name, model.lifecycle !== "normal" ? el("span", { class: "reason" }, model.lifecycle) : null),
      el("td", { class: "state-cell" }, state, reason),
      el("td", { class: "num" }, model.claim.toFixed(2)),
      el("td", { class: "num in-flight" }, model.in_flight),
      el("td", { class: "num queued" }, model.queued),
      el("td", { class: "num" }, duration(model.uptime_s)),
      el("td", { class: "num" }, model.idle_s === null ? "–" : duration(model.idle_s)),
      el("td", { class: "progress-cell" }, progressCell(model)),
      actions);
  });
  $("model-rows").replaceChildren(...rows);
}

function renderFailures(status) {
  const box = $("failures");
  const failures = (status.failures || []).slice().reverse();
  if (!failures.length) {
    box.replaceChildren(el("p", { class: "muted" }, "none"));
    return;
  }
  box.replaceChildren(...failures.slice(0, 10).map((failure) => el("div", { class: "failure", "data-model": failure.model },
    el("strong", {}, failure.model), " ", el("span", { class: "muted" }, clock(failure.at)), el("div", {}, failure.message),
    failure.log_lines && failure.log_lines.length ? el("pre", {}, failure.log_lines.join("\n")) : null)));
}

function renderEvents(status) {
  const items = (status.recent || []).slice().reverse().map((event) => el("li", { "data-model": event.model },
    el("span", { class: "muted" }, clock(event.at) + " "), el("strong", {}, event.model), " " + event.from + " → " + event.to,
    event.reason ? el("span", { class: "muted" }, " (" + event.reason + ")") : null));
  $("events").replaceChildren(...items);
}

// -- actions ----------------------------------------------------------------------------------

async function act(model, action) {
  $("action-result").textContent = action + " " + model + "…";
  try {
    const response = await fetch("/api/models/" + encodeURIComponent(model) + "/" + action, { method: "POST", headers: authHeaders() });
    const body = await response.json();
    $("action-result").textContent = response.ok ? model + ": " + body.state : body.error.message;
  } catch (error) {
    $("action-result").textContent = action + " " + model + " failed: " + error;
  }
}

$("auth-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORAGE, $("auth-key").value.trim());
  $("auth-key").value = "";
  connect();
});

// Between events, keep the clocks (uptime, idle, loading) moving.
setInterval(() => {
  if (!latest) return;
  const age = Date.now() / 1000 - receivedAt;
  if (age < 1.5) return;
  const moved = JSON.parse(JSON.stringify(latest));
  moved.server.now += age;
  for (const model of moved.models) {
    if (model.uptime_s !== null) model.uptime_s += age;
    if (model.idle_s !== null) model.idle_s += age;
    if (model.loading_for_s !== null) model.loading_for_s += age;
  }
  render(moved);
}, 1000);

// -- weight pulls (sparkctl pull, or a start pulling first): polled, they are not scheduler events --

function megabytes(bytes) {
  return (bytes / 1e6).toFixed(1) + " MB";
}

function pullText(pull) {
  const who = pull.model + (pull.node && pull.node !== "local" ? " on " + pull.node : "");
  if (pull.state === "failed") return who + ": failed: " + pull.error;
  if (pull.state === "done") return who + ": done, " + megabytes(pull.total_bytes || 0);
  let text = who + ": " + megabytes(pull.done_bytes || 0) + " of " + megabytes(pull.total_bytes || 0);
  if (pull.rate_bps) text += " · " + megabytes(pull.rate_bps) + "/s";
  if (pull.eta_s !== null && pull.eta_s !== undefined) text += " · ETA " + duration(pull.eta_s);
  return text;
}

function pullRow(pull) {
  const fraction = pull.state === "done" ? 1 : (pull.total_bytes ? Math.min(1, (pull.done_bytes || 0) / pull.total_bytes) : 0);
  const bar = el("div", { class: "progress" }, el("div", { style: { width: (fraction * 100).toFixed(1) + "%" } }));
  return el("div", { "data-pull": pull.model + "@" + (pull.node || "local") }, bar, el("span", { class: "progress-text" }, pullText(pull)));
}

async function refreshPulls() {
  try {
    const response = await fetch("/api/pulls", { headers: authHeaders(), cache: "no-store" });
    if (!response.ok) return;
    const running = (await response.json()).pulls.filter((pull) => pull.state === "pulling");
    const rows = [];
    for (const pull of running) rows.push(pullRow(pull), ...(pull.peers || []).map(pullRow));
    $("pulls").replaceChildren(...rows);
    $("pulls-section").hidden = rows.length === 0;
  } catch (error) {
    // The live status shows the connection's trouble; the next poll tries again.
  }
}

setInterval(refreshPulls, 2000);

connect();
