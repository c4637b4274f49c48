"use strict";
// berth's dashboard. Every call stays under /ui/api/: a browser that logged in on /ui/ sends its credentials
// with each. It reads only documented endpoints (README, "HTTP API"), so a script can read the same facts:
// whoami, models (/v1/models), running (/running), events (/api/events), requests (/api/requests), usage.
const api = (path, options) => fetch("api/" + path, options);
const mib = (bytes) => (bytes / 1048576).toFixed(0) + " MiB";
const size = (bytes) => bytes >= 1073741824 ? (bytes / 1073741824).toFixed(1) + " GiB" : mib(bytes);
const perDevice = (usage) => usage ? Object.entries(usage).map(([d, b]) => `${d} ${mib(b)}`).join(", ") : "–";
const $ = (selector) => document.querySelector(selector);
const ttlDeadlines = {};  // model -> ms timestamp when an idle model will be unloaded
// What the key this page logged in with may do (GET whoami); parts it may not use are hidden, not greyed.
let scopes = new Set();
const may = (scope) => scopes.has(scope);
let models = [];  // the latest /v1/models entries
let events = [];  // the timeline's events, oldest first
let lastEvent = 0;

function element(tag, text, className) {
  const el = document.createElement(tag);
  if (text !== undefined && text !== null) el.textContent = text;
  if (className) el.className = className;
  return el;
}
const cell = (text, className) => element("td", text, className);

function setStatus(text) { $("#status").textContent = text || ""; }

const getJson = (path) => api(path).then((r) => {
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return r.json();
});

async function errorText(response) {
  const body = await response.json().catch(() => ({}));
  return (body.error || {}).message || `HTTP ${response.status}`;
}

async function whoami() {
  const me = await getJson("whoami");
  scopes = new Set(me.scopes);
  for (const el of document.querySelectorAll("[data-scope]")) el.hidden = !may(el.dataset.scope);
  $("#whoami").textContent = me.key === null ? "" : `key ${me.key}: ${me.scopes.join(", ")}`;
}

let refreshing = false;  // one refresh at a time: events are asked for once each
async function refresh() {
  if (refreshing) return;
  refreshing = true;
  try {
    const nothing = Promise.resolve(null);
    const [listed, running, recent, usage, news] = await Promise.all([
      may("inference") ? getJson("models") : nothing, may("metrics") ? getJson("running") : nothing,
      may("logs") ? getJson("requests") : nothing, getJson("usage?since=24h"),
      may("metrics") ? getJson("events?since=" + lastEvent) : nothing]);
    setStatus("");
    if (listed) models = listed.data;
    if (listed) renderModels(models, running || {running: []});
    if (running) { renderDevices(running.devices); renderMemory(running); }
    if (news) addEvents(news);
    if (recent) renderRequests(recent);
    renderUsage(usage);
  } catch (err) {
    setStatus("cannot reach berth: " + err.message);
  } finally {
    refreshing = false;
  }
}

// -- memory map -------------------------------------------------------------------------------------------

const colours = {};  // model -> its colour class, kept while the page is open
function colourOf(model) {
  if (!(model in colours)) colours[model] = "c" + (Object.keys(colours).length % 6);
  return colours[model];
}

function renderMemory(running) {
  const map = $("#memory-map");
  map.className = "";
  const devices = Object.entries(running.devices || {});
  if (!devices.length) { map.textContent = "no devices"; return; }
  const next = nextModel(running);
  map.replaceChildren(...devices.map(([name, d]) => deviceView(name, d, running.running, next)));
}

// The model the next start is for: one that has requests waiting and is not resident, else the playground's.
function nextModel(running) {
  const waiting = running.running.find((r) => r.queued > 0 && !["ready", "sleeping"].includes(r.state));
  const chosen = waiting ? waiting.model : $("#chat-model").value;
  const resident = running.running.some((r) => r.model === chosen && r.state !== "stopping");
  const listed = models.find((m) => m.id === chosen);
  if (!chosen || resident || !listed) return null;
  return {model: chosen, waiting: Boolean(waiting), memory: listed.memory || {}};
}

function deviceView(name, device, running, next) {
  const budget = device.budget_bytes || 1;
  const view = element("div", null, "device");
  view.dataset.device = name;
  const title = element("h3", name);
  title.append(element("span", `budget ${size(device.budget_bytes)}`, "muted budget"));
  view.append(title);
  const bar = element("div", null, "bar");
  for (const entry of running) {
    const memory = entry.memory || {};
    const held = entry.state === "sleeping" && memory.measured_bytes ? memory.measured_bytes : memory.planned_bytes;
    const planned = (held || {})[name];
    if (!planned) continue;
    const share = element("div", entry.model, `share ${colourOf(entry.model)} ${entry.state}`);
    share.dataset.model = entry.model;
    share.dataset.source = memory.source;
    share.style.width = Math.min(100, planned / budget * 100) + "%";
    const measured = (memory.measured_bytes || {})[name];
    if (measured) {
      const inner = element("div", null, "measured");
      inner.style.width = Math.min(100, measured / planned * 100) + "%";
      share.append(inner);
    }
    share.dataset.tip = shareTip(entry, name, planned, measured);
    share.addEventListener("mouseenter", showTip);
    share.addEventListener("mousemove", showTip);
    share.addEventListener("mouseleave", hideTip);
    bar.append(share);
  }
  view.append(bar);
  const used = device.planned_in_use_bytes;
  const shares = running.filter((r) => ((r.memory || {}).planned_bytes || {})[name])
    .map((r) => `${r.model} ${size(r.memory.planned_bytes[name])} ${r.memory.source}`
         + (((r.memory.measured_bytes || {})[name]) ? ` (measured ${size(r.memory.measured_bytes[name])})` : ""));
  const facts = element("div", [
    `planned in use ${size(used)} of ${size(device.budget_bytes)}`, `left in budget ${size(Math.max(budget - used, 0))}`,
    `headroom ${size(device.headroom_bytes || 0)}`, `free now ${size(device.free_bytes)} of ${size(device.total_bytes)}`,
    ...shares].join(" · "), "facts");
  view.append(facts);
  const need = next && ((next.memory.planned_bytes || {})[name]);
  if (need) {
    const left = Math.max(device.budget_bytes - used, 0);
    const line = element("div", `next: ${next.model}${next.waiting ? " (requests waiting)" : ""} needs ${size(need)} `
      + `(${next.memory.source})` + (need > left ? `: ${size(need - left)} more than is left, so idle models go`
                                                  : ": fits beside what runs"), need > left ? "next short" : "next");
    line.dataset.model = next.model;
    view.append(line);
  }
  return view;
}

function shareTip(entry, device, planned, measured) {
  const memory = entry.memory || {};
  const lines = [`${entry.model} on ${device} (${entry.state})`, `planned ${size(planned)} (${memory.source})`];
  if (measured) lines.push(`measured ${size(measured)}`);
  const parts = (memory.components_bytes || {})[device];
  if (parts) for (const [part, bytes] of Object.entries(parts)) if (bytes) lines.push(`  ${part} ${size(bytes)}`);
  if (memory.detail) lines.push(memory.detail);
  return lines.join("\n");
}

function showTip(event) {
  const tip = $("#tooltip");
  tip.textContent = event.currentTarget.dataset.tip;
  tip.hidden = false;
  tip.style.left = Math.min(event.clientX + 12, window.innerWidth - tip.offsetWidth - 8) + "px";
  tip.style.top = (event.clientY + 16) + "px";
}
function hideTip() { $("#tooltip").hidden = true; }

function renderDevices(devices) {
  $("#devices").textContent = Object.entries(devices || {}).map(([name, d]) =>
    `${name}: ${mib(d.planned_in_use_bytes)} planned of ${mib(d.budget_bytes)} budget, ${mib(d.free_bytes)} free`
  ).join(" · ");
}

// -- timeline ---------------------------------------------------------------------------------------------

function addEvents(news) {
  lastEvent = news.last;
  if (!news.events.length) return;
  events = events.concat(news.events).slice(-500);
  renderTimeline();
}

function renderTimeline() {
  const lanes = [...new Set(events.map((e) => e.model))];
  const from = events[0].at, to = Math.max(Date.now() / 1000, events[events.length - 1].at);
  const span = Math.max(to - from, 1);
  $("#lanes").replaceChildren(...lanes.map((model) => {
    const lane = element("div", null, "lane");
    lane.dataset.model = model;
    const track = element("div", null, "track");
    for (const e of events.filter((e) => e.model === model)) {
      const mark = element("span", null, `mark ${e.kind} ${e.reason || ""}`);
      mark.style.left = ((e.at - from) / span * 100) + "%";
      mark.dataset.tip = `${new Date(e.at * 1000).toLocaleTimeString()} ${e.model} ${e.kind}`
        + (e.text ? `\n${e.text}` : "");
      mark.addEventListener("mouseenter", showTip);
      mark.addEventListener("mouseleave", hideTip);
      track.append(mark);
    }
    lane.append(element("span", model), track);
    return lane;
  }));
  $("#axis-from").textContent = new Date(from * 1000).toLocaleTimeString();
  $("#axis-to").textContent = new Date(to * 1000).toLocaleTimeString();
  $("#events tbody").replaceChildren(...events.slice().reverse().map((e) => {
    const tr = element("tr");
    tr.dataset.kind = e.kind;
    tr.dataset.model = e.model;
    tr.append(cell(new Date(e.at * 1000).toLocaleTimeString()), cell(e.model),
              cell(e.reason ? `${e.kind} (${e.reason})` : e.kind, "kind"), cell(e.text, "why"));
    return tr;
  }));
}

// -- models, logs, usage ----------------------------------------------------------------------------------

function renderUsage(usage) {
  // one bar per hour of the window, on one scale for every key so that the plots compare
  const tallest = Math.max(1, ...usage.keys.flatMap((k) => k.hours.map((h) => h.prompt_tokens + h.completion_tokens)));
  $("#usage tbody").replaceChildren(...usage.keys.map((k) => {
    const tr = element("tr");
    tr.dataset.key = k.key;
    const plot = element("td");
    plot.append(hourPlot(k.hours, usage.since, usage.until, usage.bucket_seconds, tallest));
    tr.append(cell(k.key), cell(k.requests, "requests"), cell(k.errors, "errors"),
              cell(k.prompt_tokens, "prompt"), cell(k.completion_tokens, "completion"), plot,
              cell(k.models.map((m) => `${m.model} ${m.requests}`).join(", ")));
    return tr;
  }));
}

function hourPlot(hours, since, until, bucket, tallest) {
  const NS = "http://www.w3.org/2000/svg", width = 5, height = 32;
  const count = Math.floor((until - since) / bucket) + 1;
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("class", "plot");
  svg.setAttribute("width", count * width);
  svg.setAttribute("height", height + 1);
  const byHour = new Map(hours.map((h) => [h.hour, h]));
  const rect = (className, x, y, h) => {
    const r = document.createElementNS(NS, "rect");
    r.setAttribute("class", className);
    for (const [name, value] of [["x", x], ["y", y], ["width", width - 1], ["height", h]]) r.setAttribute(name, value);
    return r;
  };
  for (let i = 0; i < count; i++) {
    const hour = since + i * bucket, h = byHour.get(hour);
    if (!h) continue;
    const g = document.createElementNS(NS, "g");
    g.dataset.hour = hour;
    g.dataset.prompt = h.prompt_tokens;
    g.dataset.completion = h.completion_tokens;
    const prompt = height * h.prompt_tokens / tallest, completion = height * h.completion_tokens / tallest;
    g.append(rect("prompt-bar", i * width, height - prompt, prompt),
             rect("completion-bar", i * width, height - prompt - completion, completion));
    const title = document.createElementNS(NS, "title");
    title.textContent = `${new Date(hour * 1000).toISOString().slice(0, 13)}:00 UTC: ${h.requests} requests, ` +
                        `${h.prompt_tokens} prompt and ${h.completion_tokens} completion tokens`;
    g.append(title);
    svg.append(g);
  }
  const axis = document.createElementNS(NS, "line");
  axis.setAttribute("class", "axis");
  for (const [name, value] of [["x1", 0], ["x2", count * width], ["y1", height + .5], ["y2", height + .5]]) {
    axis.setAttribute(name, value);
  }
  svg.append(axis);
  return svg;
}

function renderModels(listed, running) {
  const live = Object.fromEntries(running.running.map((r) => [r.model, r]));
  const now = Date.now();
  // peers' models ("remote"), selectors and profile pins ("virtual") run nothing here
  const local = listed.filter((m) => !m.alias_of && m.state !== "remote" && m.state !== "virtual");
  $("#models tbody").replaceChildren(...local.map((m) => {
    const r = live[m.id] || {};
    const tr = element("tr");
    tr.dataset.model = m.id;
    const memory = m.memory || {};
    if (r.ttl_remaining_s != null) ttlDeadlines[m.id] = now + r.ttl_remaining_s * 1000;
    else delete ttlDeadlines[m.id];
    const name = cell(m.id, "model");
    if (seesImages(m.id)) {  // a projector (--mmproj), or declared image input
      const badge = element("span", "vision", "badge vision");
      badge.title = "takes images (image_url parts)";
      name.append(badge);
    }
    tr.append(name, cell(m.state, "state " + m.state),
              cell(`${perDevice(memory.planned_bytes)} (${memory.source || "unknown"})`, "planned"),
              cell(perDevice((r.memory || {}).measured_bytes), "measured"), cell("–", "ttl"),
              cell(may("metrics") ? r.in_flight ?? 0 : "–", "in-flight"),
              cell(may("metrics") ? r.queued ?? 0 : "–", "queued"));
    const actions = element("td");
    const buttons = [["load", "models/load", m.state === "stopped" || m.state === "failed"],
                     ["unload", "models/unload", ["ready", "starting", "sleeping"].includes(m.state)]];
    for (const [label, path, enabled] of may("admin") ? buttons : []) {
      const button = element("button", label, label);
      button.disabled = !enabled;
      button.addEventListener("click", () => act(path, m.id, button));
      actions.append(button, " ");
    }
    tr.append(actions);
    return tr;
  }));
  updateTtl();
  fillSelect("log-source", ["berth", ...local.map((m) => m.id)]);
  fillSelect("chat-model", listed.filter((m) => !m.alias_of).map((m) => m.id));
  showImageInput();
}

function updateTtl() {
  for (const tr of document.querySelectorAll("#models tbody tr")) {
    const deadline = ttlDeadlines[tr.dataset.model];
    tr.querySelector(".ttl").textContent =
      deadline === undefined ? "–" : Math.max(0, Math.round((deadline - Date.now()) / 1000)) + " s";
  }
}

function fillSelect(id, values) {
  const select = document.getElementById(id);
  const current = [...select.options].map((o) => o.value).join("\n");
  if (current === values.join("\n")) return;
  const chosen = select.value;
  select.replaceChildren(...values.map((v) => new Option(v, v)));
  if (values.includes(chosen)) select.value = chosen;
  if (id === "log-source" && may("logs")) followLogs();
}

async function act(path, model, button) {
  button.disabled = true;
  setStatus("");
  const response = await api(path, {method: "POST", headers: {"Content-Type": "application/json"},
                                    body: JSON.stringify({model})});
  if (!response.ok) setStatus(`${path} ${model}: ${await errorText(response)}`);
  refresh();
}

// -- activity ---------------------------------------------------------------------------------------------

function renderRequests(recent) {
  $("#capture-state").textContent = recent.capture_bodies ? "bodies captured (captureBodies)"
                                                          : "bodies not captured (captureBodies: false)";
  $("#requests tbody").replaceChildren(...recent.requests.slice(0, 50).map((q) => {
    const tr = element("tr");
    tr.dataset.id = q.id;
    if (q.in_flight) tr.className = "in-flight";
    const seconds = (s) => s == null ? "–" : (s * 1000).toFixed(0) + " ms";
    tr.append(cell(new Date(q.at * 1000).toLocaleTimeString()), cell(q.key ?? "–"), cell(q.model), cell(q.path),
              cell(q.in_flight ? "in flight" : q.outcome === "cancelled" ? `${q.status} cancelled` : q.status,
                   "status" + (q.status >= 400 ? " error" : "")),
              cell(seconds(q.duration_s)), cell(seconds(q.ttft_s), "ttft"), cell(q.prompt_tokens ?? "–"),
              cell(q.completion_tokens ?? "–"), cell(q.tokens_per_s ?? "–", "rate"));
    const actions = element("td");
    if (q.cancellable && may("admin")) {
      const cancel = element("button", "cancel", "cancel");
      cancel.addEventListener("click", () => cancelRequest(q.id, cancel));
      actions.append(cancel, " ");
    }
    if (q.captured) {
      const details = element("button", "details", "details");
      details.addEventListener("click", () => showRequest(q.id));
      actions.append(details);
    }
    tr.append(actions);
    return tr;
  }));
}

async function cancelRequest(id, button) {
  button.disabled = true;
  const response = await api(`requests/${id}/cancel`, {method: "POST"});
  if (!response.ok) setStatus(`cancel ${id}: ${await errorText(response)}`);
  refresh();
}

async function showRequest(id) {
  const detail = $("#request-detail");
  const q = await getJson(`requests/${id}`);
  detail.hidden = false;
  detail.textContent = `request ${q.id}: ${q.model} ${q.path} ${q.status}\n\n-- request --\n`
    + (q.request_body ?? "(not captured)") + "\n\n-- response --\n" + (q.response_body ?? "(not captured)");
}

// -- logs -------------------------------------------------------------------------------------------------

// Server-sent events read with fetch (not EventSource) so the same credentials always go along.
let logReader = null;
async function followLogs() {
  if (logReader) logReader.cancel();
  const source = $("#log-source").value;
  const pre = $("#logs");
  pre.textContent = "";
  if (!source) return;
  const response = await api("logs/stream/" + encodeURIComponent(source));
  if (!response.ok) { pre.textContent = `logs: HTTP ${response.status}`; return; }
  const reader = logReader = response.body.getReader();
  await readEvents(reader, (event) => {
    pre.textContent += event.text.endsWith("\n") ? event.text : event.text + "\n";
    if (pre.textContent.length > 200000) pre.textContent = pre.textContent.slice(-100000);
    pre.scrollTop = pre.scrollHeight;
  });
}

async function readEvents(reader, onEvent) {
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    let chunk;
    try { chunk = await reader.read(); } catch { return; }
    if (chunk.done) return;
    buffer += decoder.decode(chunk.value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        try { onEvent(JSON.parse(data)); } catch { /* not JSON: skip */ }
      }
    }
  }
}

// -- playground -------------------------------------------------------------------------------------------

// A model takes images when /v1/models says so (its input modalities or a vision capability).
function seesImages(id) {
  const m = models.find((x) => x.id === id) || {};
  const inputs = (m.architecture || {}).input_modalities || [];
  const caps = m.capabilities;
  return inputs.includes("image") || (Array.isArray(caps) ? caps.includes("vision") : Boolean((caps || {}).vision));
}

function showImageInput() {
  $("#image-row").hidden = !($("#play-mode").value === "chat" && seesImages($("#chat-model").value));
}

function showMode() {
  const mode = $("#play-mode").value;
  const second = $("#play-second");
  second.hidden = !["embeddings", "rerank"].includes(mode);
  second.placeholder = mode === "rerank" ? "Documents, one a line" : "A second text to compare with";
  $("#chat-input").placeholder = mode === "rerank" ? "Query" : mode === "chat" ? "Say something" : "Text";
  showImageInput();
}

const readAsDataUrl = (file) => new Promise((resolve, reject) => {
  const reader = new FileReader();
  reader.onload = () => resolve(reader.result);
  reader.onerror = () => reject(reader.error);
  reader.readAsDataURL(file);
});

async function chatContent(text) {
  const file = !$("#image-row").hidden && $("#play-image").files[0];
  if (!file) return text;
  return [{type: "text", text}, {type: "image_url", image_url: {url: await readAsDataUrl(file)}}];
}

function cosine(a, b) {
  let dot = 0, na = 0, nb = 0;
  for (let i = 0; i < a.length; i++) { dot += a[i] * b[i]; na += a[i] * a[i]; nb += b[i] * b[i]; }
  return dot / (Math.sqrt(na) * Math.sqrt(nb) || 1);
}

async function post(path, body) {
  return api(path, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
}

async function play() {
  const output = $("#chat-output");
  const button = $("#chat-send");
  const mode = $("#play-mode").value;
  const model = $("#chat-model").value;
  const text = $("#chat-input").value;
  button.disabled = true;
  output.className = "";
  output.textContent = "";
  delete output.dataset.done;
  try {
    if (mode === "chat" || mode === "completion") {
      const body = mode === "chat"
        ? {model, stream: true, max_tokens: 256, stream_options: {include_usage: true},
           messages: [{role: "user", content: await chatContent(text)}]}
        : {model, stream: true, max_tokens: 256, prompt: text};
      const response = await post(mode === "chat" ? "chat/completions" : "completions", body);
      if (!response.ok) { output.className = "error"; output.textContent = await errorText(response); return; }
      await readEvents(response.body.getReader(), (event) => {
        if (event.error) { output.className = "error"; output.textContent += "\n" + event.error.message; }
        for (const choice of event.choices || []) output.textContent += (choice.delta || {}).content ?? choice.text ?? "";
      });
    } else if (mode === "embeddings") {
      const inputs = [text, $("#play-second").value].filter((t) => t.trim());
      const response = await post("embeddings", {model, input: inputs});
      if (!response.ok) { output.className = "error"; output.textContent = await errorText(response); return; }
      const vectors = (await response.json()).data.map((d) => d.embedding);
      output.textContent = `vector size ${vectors[0].length}`
        + (vectors.length > 1 ? `\ncosine similarity ${cosine(vectors[0], vectors[1]).toFixed(4)}` : "");
    } else {
      const documents = $("#play-second").value.split("\n").filter((t) => t.trim());
      const response = await post("rerank", {model, query: text, documents});
      if (!response.ok) { output.className = "error"; output.textContent = await errorText(response); return; }
      output.textContent = (await response.json()).results
        .map((r) => `${r.relevance_score.toFixed(3)}  ${documents[r.index]}`).join("\n");
    }
    output.dataset.done = "true";
  } finally {
    button.disabled = false;
    refresh();
  }
}

$("#log-source").addEventListener("change", followLogs);
$("#chat-send").addEventListener("click", play);
$("#play-mode").addEventListener("change", showMode);
$("#chat-model").addEventListener("change", showImageInput);

whoami().then(() => {
  refresh();
  setInterval(refresh, 1000);
  setInterval(updateTtl, 250);
}).catch((err) => setStatus("cannot reach berth: " + err.message));
