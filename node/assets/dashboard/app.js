// aiflow dashboard: polls the entry node's status every second and streams chat answers
// with each token coloured by the tier and exit that produced it. Plain JS, no framework,
// nothing loaded from elsewhere. Every endpoint it uses is listed here.
"use strict";

const API = {
  status: "/aiflow/status",
  chat: "/v1/chat/completions",
};
const POLL_MS = 1000;
const KEY_STORE = "aiflow.apiKey";
const TIERS = ["device", "edge", "cloud"];

const $ = (id) => document.getElementById(id);
let last = null; // the previous status and when it arrived, for rates
let status = null; // the latest status
let conversation = []; // chat messages so far

// ---- API key (asked for on a 401, kept in localStorage) ----

function apiKey() {
  try { return localStorage.getItem(KEY_STORE) || ""; } catch { return ""; }
}
function authHeaders() {
  const k = apiKey();
  return k ? { Authorization: "Bearer " + k } : {};
}
function askForKey() {
  $("key-form").hidden = false;
  setConn("key", "API key required");
  $("key").focus();
}
$("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  try { localStorage.setItem(KEY_STORE, $("key").value.trim()); } catch { /* private mode */ }
  $("key-form").hidden = true;
  poll();
});

// ---- formatting ----

function fmtInt(n) { return Number.isFinite(n) ? Math.round(n).toLocaleString("en-US") : "–"; }
function fmtBytes(b) {
  if (!Number.isFinite(b)) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (b >= 1024 && i < u.length - 1) { b /= 1024; i++; }
  return (i ? b.toFixed(1) : b.toFixed(0)) + " " + u[i];
}
function fmtBits(bps) {
  if (!Number.isFinite(bps)) return "–";
  const u = ["bit/s", "kbit/s", "Mbit/s", "Gbit/s"];
  let i = 0;
  while (bps >= 1000 && i < u.length - 1) { bps /= 1000; i++; }
  return bps.toFixed(i ? 1 : 0) + " " + u[i];
}
function fmtMs(ms) { return Number.isFinite(ms) ? (ms < 10 ? ms.toFixed(2) : ms.toFixed(0)) + " ms" : "–"; }
function fmtPct(x) { return Number.isFinite(x) ? (100 * x).toFixed(1) + " %" : "–"; }
function tierClass(t) { return "tier-" + (TIERS.includes(t) ? t : "unknown"); }

function el(tag, props, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "class") e.className = v;
    else if (k === "data") Object.assign(e.dataset, v);
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
}
function setText(id, text) { $(id).textContent = text; }
function setConn(state, text) { const c = $("conn"); c.dataset.state = state; c.textContent = text; }

// ---- status polling ----

async function poll() {
  clearTimeout(poll.timer);
  const ctl = new AbortController();
  const giveUp = setTimeout(() => ctl.abort(), 3000);
  try {
    const res = await fetch(API.status, { headers: authHeaders(), cache: "no-store", signal: ctl.signal });
    if (res.status === 401) { askForKey(); return; }
    const body = await res.json();
    if (!res.ok) throw new Error((body.error && body.error.message) || res.statusText);
    render(body, performance.now());
    setConn("live", "live");
  } catch (e) {
    setConn("error", "no data: " + (e.name === "AbortError" ? "timed out" : e.message));
  } finally {
    clearTimeout(giveUp);
  }
  poll.timer = setTimeout(poll, POLL_MS);
}

/** Per-second rate of a counter since the previous status (null on the first). */
function rate(get, s, now) {
  if (!last) return null;
  const dt = (now - last.at) / 1000;
  return dt > 0 ? Math.max(0, get(s) - get(last.s)) / dt : null;
}

function render(s, now) {
  status = s;
  $("model").textContent = `${s.model.name} · ${s.model.layers} layers · exits ${s.model.exits.join(", ")}`;
  renderTopology(s, now);
  renderStats(s, now);
  renderTokens(s);
  renderLinks(s, now);
  renderLegend(s);
  last = { s, at: now };
  document.body.dataset.ready = "1";
}

function tierTokens(s, tier) {
  return s.tokens.filter((t) => t.tier === tier).reduce((a, t) => a + t.count, 0);
}

const HEALTH = { serving: "ok", up: "ok", failing: "warn", down: "bad", idle: "idle", unseen: "idle" };
const SEEN = { self: "this node", hello: "from its Hello", reported: "reported by its child", inferred: "inferred from layers" };

function nodeCard(n, s) {
  const layers = n.layers ? `[${n.layers[0]}, ${n.layers[1]})` : "unknown";
  const exits = n.exits.length ? n.exits.join(", ") : "none";
  const cls = ["node", tierClass(n.role), n.seen === "inferred" ? "inferred" : "", n.active ? "" : "standby"];
  return el("div", { class: cls.join(" "), data: { role: n.role || "unknown", seen: n.seen } },
    el("span", { class: "role" }, n.role || "parent"),
    el("span", { class: "id" }, n.seen === "inferred" ? "(not visible)" : n.id && n.id !== n.role ? n.id : ""),
    el("dl", {},
      el("dt", {}, "health"), el("dd", { class: "health " + (HEALTH[n.health] || "idle") }, n.health),
      el("dt", {}, "layers"), el("dd", {}, layers),
      el("dt", {}, "exits"), el("dd", {}, exits),
      el("dt", {}, "tokens"), el("dd", {}, n.role ? fmtInt(tierTokens(s, n.role)) : "–"),
      el("dt", {}, "known"), el("dd", {}, (SEEN[n.seen] || n.seen) + (n.active ? "" : " · standby"))));
}

function linkBox(link, s, now) {
  if (!link) {
    return el("li", { class: "link unseen", "aria-label": "link not visible from the entry node" },
      el("span", {}, "via its parent"), el("div", { class: "arrow" }), el("span", {}, "not visible here"));
  }
  const sent = rate((x) => linkOf(x, link.addr, link.from)?.quic?.bytes_sent ?? NaN, s, now);
  const rtt = link.quic ? link.quic.rtt_ms : link.rtt_ms;
  return el("li", { class: "link" + (link.reported ? " reported" : ""), data: { addr: link.addr, from: link.from } },
    el("span", {}, "RTT ", el("strong", {}, fmtMs(rtt)), " · ", el("strong", {}, fmtBits(link.goodput_bps))),
    el("div", { class: "arrow" }),
    el("span", {}, "↑ ", el("strong", {}, fmtBytes(link.quic?.bytes_sent)),
      " ↓ ", el("strong", {}, fmtBytes(link.quic?.bytes_received))),
    el("span", {}, Number.isFinite(sent) ? fmtBytes(sent) + "/s up" : "\u00a0"));
}

function linkOf(s, addr, from) { return s.links.find((l) => l.addr === addr && l.from === from); }

function renderTopology(s, now) {
  // Columns: the entry node, its parents (the one in use first), then the tiers beyond as
  // the parent in use reported them (one column per reporting node), else the one inferred.
  const byActive = (a, b) => b.active - a.active;
  const self = s.nodes.filter((n) => n.seen === "self");
  const parents = s.nodes.filter((n) => n.seen === "hello").sort(byActive);
  const own = s.links.filter((l) => !l.reported);
  const cols = [[self, null], [parents, own.find((l) => l.active)]];
  // reported links grouped by the node at their lower end, in the order reported
  const froms = [...new Set(s.links.filter((l) => l.reported).map((l) => l.from))];
  froms.forEach((from) => {
    const links = s.links.filter((l) => l.reported && l.from === from);
    const ids = new Set(links.map((l) => l.to));
    const col = s.nodes.filter((n) => n.seen === "reported" && ids.has(n.id)).sort(byActive);
    cols.push([col, links.find((l) => l.active)]);
  });
  const beyond = s.nodes.filter((n) => n.seen === "inferred");
  if (beyond.length) cols.push([beyond, undefined]);
  const list = $("topology");
  list.replaceChildren();
  cols.filter(([col]) => col.length).forEach(([col, link], i) => {
    if (i > 0) list.append(linkBox(link === undefined ? null : link, s, now));
    list.append(el("li", { class: "tier-col" }, ...col.map((n) => nodeCard(n, s))));
  });
}

function renderStats(s, now) {
  const c = s.counters;
  const per = (f) => { const r = rate(f, s, now); return r === null ? "" : r.toFixed(1) + "/s"; };
  setText("s-tokens", fmtInt(c.tokens));
  setText("r-tokens", per((x) => x.counters.tokens));
  setText("s-esc", fmtInt(c.escalations));
  setText("r-esc", (c.tokens ? (c.escalations / c.tokens).toFixed(2) + "/token · " : "") + per((x) => x.counters.escalations));
  setText("s-deg", fmtInt(c.degraded));
  setText("r-deg", (c.tokens ? fmtPct(c.degraded / c.tokens) + " · " : "") + per((x) => x.counters.degraded));
  setText("s-running", fmtInt(s.requests.running));
  setText("s-waiting", fmtInt(s.requests.waiting));
  setText("s-requests", fmtInt(c.requests));
  setText("s-errors", c.request_errors ? `${fmtInt(c.request_errors)} errors` : "no errors");
  const e = s.engine;
  const kv = e.kv_budget_bytes ? ` (${fmtPct(e.kv_bytes / e.kv_budget_bytes)})` : "";
  setText("s-engine", `${fmtInt(e.sessions)} · ${fmtBytes(e.kv_bytes)}${kv}`);
}

function renderTokens(s) {
  const total = s.counters.tokens || 0;
  const rows = [...s.tokens].sort((a, b) => TIERS.indexOf(a.tier) - TIERS.indexOf(b.tier) || a.exit - b.exit);
  const body = $("tokens");
  body.replaceChildren(...rows.map((t) => {
    const bar = el("div", { class: "bar" });
    bar.style.width = (total ? (100 * t.count) / total : 0).toFixed(1) + "%";
    return el("tr", { class: tierClass(t.tier) },
      el("td", {}, el("span", { class: "swatch" }), t.tier), el("td", {}, String(t.exit)),
      el("td", { class: "num" }, fmtInt(t.count)), el("td", {}, bar));
  }));
  if (!rows.length) body.append(el("tr", {}, el("td", { colspan: "4", class: "muted" }, "no tokens yet")));
}

function renderLinks(s, now) {
  const body = $("links");
  body.replaceChildren(...s.links.map((l) => {
    const up = rate((x) => linkOf(x, l.addr, l.from)?.quic?.bytes_sent ?? NaN, s, now);
    const down = rate((x) => linkOf(x, l.addr, l.from)?.quic?.bytes_received ?? NaN, s, now);
    const r = (v) => el("span", { class: "sub" }, Number.isFinite(v) ? `${fmtBytes(v)}/s` : "\u00a0");
    const est = l.confidence > 0 ? `probe ${fmtMs(l.rtt_ms)}` : "prior";
    return el("tr", { data: { addr: l.addr, from: l.from }, title: l.reported ? `reported by ${l.from}` : "" },
      el("td", {}, `${l.from} → ${l.to || l.addr}`),
      el("td", { class: "health " + (HEALTH[l.health] || "idle") }, l.health + (l.active ? "" : " · standby")),
      el("td", { class: "num", title: `estimate: ${est}, ${l.probes} probe rounds` }, fmtMs(l.quic ? l.quic.rtt_ms : l.rtt_ms)),
      el("td", { class: "num" }, fmtBits(l.goodput_bps)),
      el("td", { class: "num" }, fmtBytes(l.quic?.bytes_sent), r(up)),
      el("td", { class: "num" }, fmtBytes(l.quic?.bytes_received), r(down)));
  }));
  if (!s.links.length) body.append(el("tr", {}, el("td", { colspan: "6", class: "muted" }, "no parent: this node answers everything")));
}

// ---- token colours: hue by tier, shade by the exit's rank within its tier ----

function exitRank(tier, exit) {
  if (!status) return 0;
  const exits = [...new Set(status.nodes.filter((n) => n.role === tier).flatMap((n) => n.exits))].sort((a, b) => a - b);
  return Math.max(0, exits.indexOf(exit));
}
function paintToken(span, tier, exit) {
  span.className = "tok " + tierClass(tier);
  span.style.setProperty("--mix", 22 + 14 * exitRank(tier, exit) + "%");
}

function renderLegend(s) {
  const items = [];
  for (const n of s.nodes) {
    if (!n.role) continue;
    for (const x of n.exits) {
      const key = n.role + ":" + x;
      if (items.some((i) => i.key === key)) continue;
      const sample = el("span", { class: "tok-sample" }, "tok");
      paintToken(sample, n.role, x);
      sample.classList.add("tok-sample");
      items.push({ key, li: el("li", {}, sample, ` ${n.role} · exit ${x}`) });
    }
  }
  const deg = el("span", { class: "tok tok-sample degraded" }, "tok");
  items.push({ key: "degraded", li: el("li", {}, deg, " degraded (parent failed, answered locally)") });
  const ul = $("legend");
  const next = items.map((i) => i.key).join(",");
  if (ul.dataset.keys !== next) { ul.replaceChildren(...items.map((i) => i.li)); ul.dataset.keys = next; }
}

// ---- chat: POST with stream: true, SSE read from the response body ----

function addMessage(who, cls) {
  const body = el("div", { class: "body" });
  const m = el("div", { class: "msg " + (cls || "") }, el("span", { class: "who" }, who), body);
  $("transcript").append(m);
  return body;
}

function setChatState(state) {
  $("chat").dataset.state = state;
  $("send").disabled = state === "streaming";
  $("transcript").setAttribute("aria-busy", state === "streaming" ? "true" : "false");
}

/** Feed SSE text; calls `onData` with each event's data. Returns the unparsed rest. */
function parseSse(buf, onData) {
  buf = buf.replace(/\r\n?/g, "\n");
  let i;
  while ((i = buf.indexOf("\n\n")) >= 0) {
    const data = buf.slice(0, i).split("\n").filter((l) => l.startsWith("data:"))
      .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
    buf = buf.slice(i + 2);
    if (data) onData(data);
  }
  return buf;
}

function summary(stats, reason) {
  if (!stats || typeof stats !== "object") return `finished: ${reason}`;
  const per = Object.entries(stats.tokens_per_exit || {}).map(([k, v]) => `${k.replace(":", " exit ")} ×${v}`);
  const parts = [`finished: ${reason}`, per.join(", ")];
  if (Number.isFinite(stats.ttft_ms)) parts.push(`first token ${fmtMs(stats.ttft_ms)}`);
  if (Number.isFinite(stats.total_ms)) parts.push(`total ${fmtMs(stats.total_ms)}`);
  if (stats.degraded_tokens) parts.push(`${stats.degraded_tokens} degraded`);
  return parts.filter(Boolean).join(" · ");
}

async function chat(text) {
  const max = Math.max(1, Math.min(4096, parseInt($("max-tokens").value, 10) || 96));
  // greedy by default: a small model sampled at the API's default of 1.0 rambles
  const temperature = Math.max(0, Math.min(2, parseFloat($("temperature").value) || 0));
  conversation.push({ role: "user", content: text });
  addMessage("you").textContent = text;
  const out = addMessage("assistant");
  let answer = "";
  setChatState("streaming");
  $("answer-meta").textContent = "";
  let res;
  try {
    res = await fetch(API.chat, {
      method: "POST",
      headers: { ...authHeaders(), "Content-Type": "application/json" },
      body: JSON.stringify({ messages: conversation, stream: true, max_tokens: max, temperature }),
    });
  } catch (e) {
    return failChat(out, "request failed: " + e.message);
  }
  if (!res.ok) {
    const body = await res.json().catch(() => null);
    if (res.status === 401) askForKey();
    return failChat(out, (body && body.error && body.error.message) || `HTTP ${res.status}`);
  }
  const reader = res.body.getReader();
  const dec = new TextDecoder();
  let buf = "", done = false, error = null;
  const onData = (data) => {
    if (data === "[DONE]") { done = true; return; }
    let c;
    try { c = JSON.parse(data); } catch { return; }
    if (c.error) { error = c.error.message || "the stream failed"; return; }
    for (const ch of c.choices || []) {
      const t = ch.delta && ch.delta.content;
      const a = c.aiflow;
      if (t) {
        answer += t;
        if (a && typeof a.tier === "string") {
          const span = el("span", { data: { tier: a.tier, exit: String(a.exit) } }, t);
          paintToken(span, a.tier, a.exit);
          if (a.degraded) span.classList.add("degraded");
          span.title = `${a.tier} · exit ${a.exit}${a.degraded ? " · degraded" : ""}`;
          out.append(span);
        } else {
          out.append(t);
        }
      }
      if (ch.finish_reason) $("answer-meta").textContent = summary(a, ch.finish_reason);
    }
  };
  while (!done) {
    const { value, done: end } = await reader.read().catch((e) => { error = e.message; return { done: true }; });
    if (end) break;
    buf = parseSse(buf + dec.decode(value, { stream: true }), onData);
  }
  if (error) return failChat(out, error);
  conversation.push({ role: "assistant", content: answer });
  setChatState("done");
}

function failChat(out, message) {
  conversation.pop(); // the user turn that failed
  out.parentElement.classList.add("error");
  out.textContent = message;
  setChatState("error");
}

$("chat").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || $("chat").dataset.state === "streaming") return;
  $("prompt").value = "";
  chat(text);
});
$("prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("chat").requestSubmit(); }
});
$("clear").addEventListener("click", () => {
  conversation = [];
  $("transcript").replaceChildren();
  $("answer-meta").textContent = "";
  setChatState("idle");
});

poll();
