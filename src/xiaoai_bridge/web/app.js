// The status page: one EventSource feeds everything; the first event is the full state.
"use strict";

const token = new URLSearchParams(location.search).get("token");
const SVG = "http://www.w3.org/2000/svg";
const CHART_POINTS = 30;
const CHART_MIN_SLOTS = 12;

const REASONS = {
  timeout: "the LLM took too long",
  connection: "could not reach the LLM",
  rate_limited: "the LLM is rate limiting us",
  server_error: "the LLM server failed",
  auth: "the LLM rejected the API key",
  not_configured: "no LLM API key configured",
  empty: "the LLM said nothing speakable",
  too_long: "the question was too long",
  bad_input: "the message could not be read",
  disabled: "answering is switched off",
  not_triggered: "no trigger word: left to XiaoAi",
  forget: "conversation memory cleared",
  wake_only: "woken without a question",
  continuous_on: "continuous conversation on",
  continuous_off: "continuous conversation off",
  unfinished: "the answer never finished",
};

const OUTCOMES = { answered: "answered", command: "command", ignored: "ignored", failed: "failed" };

const TOOL_OUTCOMES = {
  ok: "ok",
  error: "error",
  timeout: "timed out",
  unknown_tool: "no such tool",
  bad_arguments: "bad arguments",
  confirm: "asked to confirm",
};

const state = {
  conversations: new Map(), // key -> conversation
  devices: new Map(), // device -> [keys], oldest first
  sources: new Map(), // device -> the adapter that heard it last (memory is per source and device)
  order: [], // devices, most recently active first
  adapters: {},
  status: "unknown",
  toolsEnabled: true,
  tools: {}, // tool source -> { ok, detail, tools }
  speakers: [],
};

// -- small helpers -------------------------------------------------------------------------

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("data-")) node.setAttribute(name, value);
    else node[name] = value;
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text != null) node.textContent = text;
  return node;
}

function isWide(char) {
  return /[\u1100-\u115f\u2e80-\ua4cf\uac00-\ud7a3\uf900-\ufaff\ufe30-\ufe4f\uff00-\uff60\uffe0-\uffe6]/u.test(char);
}

// Sentences arrive one by one: no space after Chinese, one between Western sentences.
function joinSentences(parts) {
  let text = "";
  for (const part of parts) {
    if (!part) continue;
    if (text && !isWide(text.at(-1)) && !isWide(part[0])) text += " ";
    text += part;
  }
  return text;
}

function seconds(value) {
  if (value == null) return "";
  if (value < 1) return `${Math.round(value * 1000)} ms`;
  return value < 10 ? `${value.toFixed(2)} s` : `${value.toFixed(1)} s`;
}

function clock(timestamp) {
  return new Date(timestamp * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

function ago(iso) {
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.round(s / 60)} min`;
  if (s < 86400) return `${Math.round(s / 3600)} h`;
  return `${Math.round(s / 86400)} d`;
}

let toastTimer = 0;
function toast(message, error = false) {
  const node = document.getElementById("toast");
  node.textContent = message;
  node.classList.toggle("error", error);
  node.classList.add("show");
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => node.classList.remove("show"), 3500);
}

async function post(path, body) {
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch(path, { method: "POST", headers, body: JSON.stringify(body) });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.error || `${response.status} ${response.statusText}`);
  return data;
}

// -- conversations -------------------------------------------------------------------------

function remember(conversation) {
  const known = state.conversations.get(conversation.key);
  if (known && !conversation.outcome && known.chunks.length > conversation.chunks.length) {
    conversation.chunks = known.chunks;
  }
  state.conversations.set(conversation.key, conversation);
  const keys = state.devices.get(conversation.device) || [];
  if (!keys.includes(conversation.key)) keys.push(conversation.key);
  while (keys.length > 20) state.conversations.delete(keys.shift());
  state.devices.set(conversation.device, keys);
  if (conversation.source) state.sources.set(conversation.device, conversation.source);
  state.order = [conversation.device, ...state.order.filter((d) => d !== conversation.device)];
}

function speakerCard(device) {
  let card = document.querySelector(`.speaker[data-device="${CSS.escape(device)}"]`);
  if (card) return card;
  const forget = el("button", { class: "ghost forget", type: "button", text: "Forget", title: "Clear this speaker's conversation memory" });
  forget.addEventListener("click", async () => {
    forget.disabled = true;
    try {
      const source = state.sources.get(device);
      await post("api/forget", source ? { source, device } : { device });
    } catch (error) {
      toast(`Could not forget: ${error.message}`, true);
    } finally {
      forget.disabled = false;
    }
  });
  card = el(
    "article",
    { class: "card speaker", "data-device": device },
    el(
      "header",
      { class: "speaker-head" },
      el("div", { class: "avatar", text: (device.replace(/^media_player\./, "")[0] || "?").toUpperCase() }),
      el("div", { class: "speaker-title" }, el("h2", { text: device }), el("p", { class: "summary" })),
      forget,
    ),
    el("ol", { class: "turns" }),
  );
  return card;
}

function turnNode(conversation) {
  const outcome = conversation.outcome;
  const quiet = outcome === "ignored";
  const classes = ["turn", outcome || "streaming"];
  if (quiet) classes.push("quiet");
  const node = el("li", { class: classes.join(" "), "data-key": String(conversation.key) });
  const reason = REASONS[conversation.reason] || conversation.reason;
  if (quiet) {
    node.append(
      el("span", { class: "chip ignored", text: "heard" }),
      el("span", { class: "heard", text: conversation.question }),
      el("span", { class: "small", text: `${reason} · ${clock(conversation.started_at)}` }),
    );
    return node;
  }
  const answer = outcome ? conversation.answer || joinSentences(conversation.chunks) : joinSentences(conversation.chunks);
  node.append(
    el("div", { class: "bubble question", text: conversation.question }),
    el("div", { class: "meta q-meta" }, el("span", { text: `${clock(conversation.started_at)} · ${conversation.source}` })),
  );
  // The calls came between the question and the answer; they are known once it ends.
  if (conversation.tool_calls && conversation.tool_calls.length) node.append(toolCallList(conversation));
  node.append(el("div", { class: "bubble answer", text: answer }));
  const meta = el("div", { class: "meta" });
  meta.append(el("span", { class: `chip ${outcome || "pending"}`, text: OUTCOMES[outcome] || "answering…" }));
  if (reason) meta.append(el("span", { class: "reason", text: reason }));
  if (conversation.first_chunk_s != null) meta.append(el("span", { class: "timing", text: `first sentence ${seconds(conversation.first_chunk_s)}` }));
  if (conversation.total_s != null) meta.append(el("span", { class: "timing", text: `total ${seconds(conversation.total_s)}` }));
  node.append(meta);
  return node;
}

// Names, arguments and results come from the model and other servers: only ever set as text.
function toolCallList(conversation) {
  const list = el("ul", { class: "tool-calls" });
  for (const call of conversation.tool_calls) {
    list.append(
      el(
        "li",
        { class: "tool-call", "data-outcome": call.outcome },
        el("span", { class: "tool-name", text: call.name }),
        el("span", { class: "tool-args", text: call.arguments }),
        el("span", { class: "chip", text: TOOL_OUTCOMES[call.outcome] || call.outcome }),
        el("span", { class: "timing", text: `${call.ms} ms` }),
        el("span", { class: "tool-result", text: call.result }),
      ),
    );
    if (Object.hasOwn(TOOL_OUTCOMES, call.outcome)) list.lastChild.classList.add(call.outcome);
  }
  const omitted = conversation.tool_calls_omitted;
  if (omitted) list.append(el("li", { class: "tool-call", text: `and ${omitted} more tool call${omitted === 1 ? "" : "s"}` }));
  return list;
}

function renderDevice(device, freshKey) {
  const card = speakerCard(device);
  const list = card.querySelector(".turns");
  const keys = state.devices.get(device) || [];
  const nodes = [...keys].reverse().map((key) => {
    const node = turnNode(state.conversations.get(key));
    if (key === freshKey) node.classList.add("fresh");
    return node;
  });
  list.replaceChildren(...nodes);
  const answered = keys.filter((key) => state.conversations.get(key).outcome === "answered").length;
  const last = state.conversations.get(keys.at(-1));
  card.querySelector(".summary").textContent = last
    ? `${answered} answered of ${keys.length} recent · last at ${clock(last.started_at)}`
    : "no recent conversations";
  const container = document.getElementById("speakers");
  const index = state.order.indexOf(device);
  const before = container.children[index];
  if (before !== card) container.insertBefore(card, before || null);
  document.getElementById("empty").hidden = state.order.length > 0;
}

function renderStats() {
  const all = [...state.conversations.values()];
  const answered = all.filter((c) => c.outcome === "answered");
  document.getElementById("stat-answered").textContent = answered.length;
  document.getElementById("stat-failed").textContent = all.filter((c) => c.outcome === "failed").length;
  const first = median(answered.map((c) => c.first_chunk_s).filter((v) => v != null));
  document.getElementById("stat-first").textContent = first == null ? "–" : seconds(first);
  document.getElementById("stat-speakers").textContent = new Set([...state.order, ...state.speakers]).size;
}

function renderAllDevices() {
  document.getElementById("speakers").replaceChildren();
  for (const device of state.order) renderDevice(device);
  document.getElementById("empty").hidden = state.order.length > 0;
  renderSpeakerList();
  renderChart();
  renderStats();
}

function appendChunk(data) {
  const conversation = state.conversations.get(data.key);
  if (!conversation) return;
  if (data.text) conversation.chunks.push(data.text);
  const node = document.querySelector(`.turn[data-key="${data.key}"] .answer`);
  if (node) node.textContent = joinSentences(conversation.chunks);
}

function renderSpeakerList() {
  const names = [...new Set([...state.order, ...state.speakers])];
  document.getElementById("speaker-list").replaceChildren(...names.map((name) => el("option", { value: name })));
}

// -- adapters, health, config ----------------------------------------------------------------

function renderAdapters() {
  const list = document.getElementById("adapters");
  const rows = Object.entries(state.adapters).map(([name, adapter]) => {
    const details = [`${adapter.state} for ${ago(adapter.since)}`];
    if (adapter.reconnects) details.push(`${adapter.reconnects} reconnect${adapter.reconnects === 1 ? "" : "s"}`);
    if (adapter.last_error) details.push(`last error ${adapter.last_error}`);
    return el(
      "li",
      { "data-adapter": name },
      el("span", { class: "name", text: name }),
      el("span", { class: `state ${adapter.state}`, text: adapter.state }),
      el("span", { class: "detail", text: details.join(" · ") }),
    );
  });
  if (!rows.length) {
    list.replaceChildren(el("li", {}, el("span", { class: "muted", text: "No connections configured." })));
  } else {
    list.replaceChildren(...rows);
  }
  const health = document.getElementById("health");
  health.dataset.status = state.status;
  health.textContent = state.status === "ok" ? "healthy" : state.status === "unavailable" ? "degraded" : state.status;
}

function renderTools() {
  const list = document.getElementById("tool-sources");
  const entries = Object.entries(state.tools);
  if (!state.toolsEnabled || !entries.length) {
    const text = state.toolsEnabled ? "No tool sources configured: the model is offered no tools." : "Tool calling is off ([tools] enabled = false).";
    list.replaceChildren(el("li", {}, el("span", { class: "muted", text })));
    return;
  }
  list.replaceChildren(
    ...entries.map(([name, source]) =>
      el(
        "li",
        { "data-source": name },
        el("span", { class: "name", text: name }),
        el("span", { class: `state ${source.ok ? "up" : "down"}`, text: source.ok ? "ok" : "down" }),
        el("span", { class: "detail", text: `${source.tools} tool${source.tools === 1 ? "" : "s"} · ${source.detail}` }),
      ),
    ),
  );
}

function configValue(value) {
  if (value === null || value === undefined || value === "") return el("dd", { class: "unset", text: "not set" });
  const text = typeof value === "object" ? JSON.stringify(value) : String(value);
  return el("dd", { class: text.includes("***") ? "masked" : "", text });
}

function renderConfig(config) {
  const sections = [];
  const top = el("dl");
  for (const [key, value] of Object.entries(config)) {
    if (value && typeof value === "object" && !Array.isArray(value)) {
      const list = el("dl");
      for (const [name, item] of Object.entries(value)) list.append(el("dt", { text: name }), configValue(item));
      sections.push(el("details", {}, el("summary", { text: `[${key}]` }), list));
    } else {
      top.append(el("dt", { text: key }), configValue(value));
    }
  }
  const general = el("details", { open: true }, el("summary", { text: "general" }), top);
  document.getElementById("config").replaceChildren(general, ...sections);
}

function setAnswering(enabled) {
  document.getElementById("answering").checked = enabled;
}

// -- latency chart ---------------------------------------------------------------------------

function median(values) {
  if (!values.length) return null;
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
}

function renderChart() {
  const chart = document.getElementById("chart");
  const points = [...state.conversations.values()]
    .filter((c) => c.outcome === "answered" && c.total_s != null)
    .sort((a, b) => a.started_at - b.started_at)
    .slice(-CHART_POINTS);
  const width = 320;
  const height = 140;
  const left = 38;
  const bottom = 18;
  const top = 8;
  const nodes = [];
  const summary = document.getElementById("chart-summary");
  if (!points.length) {
    nodes.push(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "none" }, "No answers yet"));
    chart.replaceChildren(...nodes);
    summary.textContent = "";
    return;
  }
  const highest = Math.max(...points.map((p) => p.total_s));
  const step = highest <= 1 ? 0.25 : highest <= 4 ? 1 : highest <= 10 ? 2 : highest <= 30 ? 5 : 15;
  const ceiling = Math.max(step, Math.ceil(highest / step) * step);
  const plotHeight = height - bottom - top;
  const y = (value) => top + plotHeight - (value / ceiling) * plotHeight;
  for (let tick = 0; tick <= ceiling + 1e-9; tick += step) {
    nodes.push(svg("line", { x1: left, x2: width, y1: y(tick), y2: y(tick), class: "grid" }));
    nodes.push(svg("text", { x: left - 6, y: y(tick) + 3, "text-anchor": "end", class: "axis" }, `${+tick.toFixed(2)}s`));
  }
  const slot = (width - left) / Math.max(points.length, CHART_MIN_SLOTS);
  const barWidth = Math.max(3, slot * 0.62);
  points.forEach((point, index) => {
    const x = left + slot * index + (slot - barWidth) / 2;
    const group = svg("g");
    group.append(svg("title", {}, `${point.device}: ${point.question}\nfirst sentence ${seconds(point.first_chunk_s)}, total ${seconds(point.total_s)}`));
    group.append(svg("rect", { x, y: y(point.total_s), width: barWidth, height: Math.max(1, y(0) - y(point.total_s)), rx: 2, class: "bar-total" }));
    if (point.first_chunk_s != null) {
      group.append(svg("rect", { x, y: y(point.first_chunk_s), width: barWidth, height: Math.max(1, y(0) - y(point.first_chunk_s)), rx: 2, class: "bar-first" }));
    }
    nodes.push(group);
  });
  nodes.push(svg("text", { x: width, y: height - 4, "text-anchor": "end", class: "axis" }, "newest →"));
  chart.replaceChildren(...nodes);
  const first = median(points.map((p) => p.first_chunk_s).filter((v) => v != null));
  const total = median(points.map((p) => p.total_s));
  summary.textContent = `Median over the last ${points.length}: first sentence ${seconds(first)}, whole answer ${seconds(total)}.`;
}

// -- live feed -------------------------------------------------------------------------------

function loadState(data) {
  state.conversations.clear();
  state.devices.clear();
  state.order = [];
  const devices = Object.keys(data.conversations);
  for (const device of [...devices].reverse()) {
    for (const conversation of data.conversations[device]) remember(conversation);
  }
  state.order = devices;
  state.speakers = data.speakers;
  state.adapters = data.adapters;
  state.status = data.status;
  state.toolsEnabled = data.tools_enabled;
  state.tools = data.tools;
  document.getElementById("version").textContent = `v${data.version}`;
  setAnswering(data.answering);
  renderConfig(data.config);
  renderAdapters();
  renderTools();
  renderAllDevices();
}

function connect() {
  const live = document.getElementById("live");
  const source = new EventSource(token ? `api/events?token=${encodeURIComponent(token)}` : "api/events");
  source.addEventListener("open", () => {
    live.dataset.state = "live";
    live.textContent = "live";
  });
  source.addEventListener("error", () => {
    live.dataset.state = "down";
    if (source.readyState !== EventSource.CLOSED) {
      live.textContent = "reconnecting…";
      return;
    }
    // Refused (e.g. too many live pages open): the browser gives up, so retry later ourselves.
    source.close();
    live.textContent = "refused by the server; retrying in 30 s";
    setTimeout(connect, 30000);
  });
  source.addEventListener("state", (event) => loadState(JSON.parse(event.data)));
  source.addEventListener("begin", (event) => {
    const conversation = JSON.parse(event.data);
    remember(conversation);
    renderDevice(conversation.device, conversation.key);
    renderSpeakerList();
  });
  source.addEventListener("chunk", (event) => appendChunk(JSON.parse(event.data)));
  source.addEventListener("end", (event) => {
    const conversation = JSON.parse(event.data);
    remember(conversation);
    renderDevice(conversation.device);
    renderChart();
    renderStats();
  });
  source.addEventListener("adapters", (event) => {
    const data = JSON.parse(event.data);
    state.adapters = data.adapters;
      state.status = data.status;
    state.tools = data.tools;
    renderAdapters();
    renderTools();
  });
  source.addEventListener("answering", (event) => {
    const { enabled } = JSON.parse(event.data);
    setAnswering(enabled);
    toast(enabled ? "Answering switched on" : "Answering switched off: XiaoAi answers alone");
  });
  source.addEventListener("forgot", (event) => {
    const { device, turns } = JSON.parse(event.data);
    toast(`${device}: forgot ${turns} turn${turns === 1 ? "" : "s"} of conversation`);
  });
}

function setUp() {
  document.getElementById("ask").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.currentTarget;
    const button = form.querySelector("button");
    const status = document.getElementById("ask-status");
    const text = document.getElementById("ask-text");
    const device = document.getElementById("ask-device").value.trim() || "default";
    button.disabled = true;
    status.textContent = "asking…";
    try {
      const reply = await post("api/ask", { text: text.value, device });
      status.textContent = `asked as ${reply.device}`;
      text.value = "";
    } catch (error) {
      status.textContent = "";
      toast(error.message, true);
    } finally {
      button.disabled = false;
    }
  });
  document.getElementById("ask-text").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) document.getElementById("ask").requestSubmit();
  });
  document.getElementById("answering").addEventListener("change", async (event) => {
    const wanted = event.target.checked;
    try {
      await post("api/answering", { enabled: wanted });
    } catch (error) {
      setAnswering(!wanted);
      toast(`Could not switch answering: ${error.message}`, true);
    }
  });
  setInterval(renderAdapters, 10000); // keep "for 3 min" current
  connect();
}

setUp();
