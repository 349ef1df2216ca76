// qguard playground: the prompt and response boxes go through the WebSocket sessions of /v1/stream
// (docs/stream_protocol.md); the chat mode through the guarded proxy POST /v1/chat/completions.
// Everything is served by qguard itself: no CDN, no build step, no request to any other host.
"use strict";

const $ = (id) => document.getElementById(id);
const TYPE_DEBOUNCE_MS = 250;   // typing: push the text once the keys pause this long
const FINISH_IDLE_MS = 900;     // then ask for the server's own verdict (which judges the held-back tail)
const SEVERITIES = ["Safe", "Controversial", "Unsafe"];

const S = {
  info: null, ws: null, wsReady: false, connecting: null,
  session: 0,          // id of the current session; replies to frames of older ones are dropped
  open: false,         // a session is open on the server (prompt sent)
  finished: false,     // its `finish` was sent: appending more needs a fresh session
  sent: "",            // the response text pushed into the current session
  expect: [],          // one entry per frame sent, in order: the server answers each with one frame
  tokens: [], serverVerdict: null, promptVerdict: null,
  typeTimer: null, finishTimer: null, replayTimer: null,
  chat: [],
};

// ------------------------------------------------------------------------------------------- messages

function showMessage(text) { const m = $("message"); m.textContent = text; m.hidden = false; }
function clearMessage() { const m = $("message"); m.textContent = ""; m.hidden = true; }

function apiKey() { return $("api-key").value.trim(); }

// ------------------------------------------------------------------------------------------ the info

async function loadInfo() {
  const qs = new URLSearchParams(location.search);
  if (qs.get("api_key")) $("api-key").value = qs.get("api_key");
  if (qs.get("model")) $("chat-model").value = qs.get("model");
  let info;
  try {
    const r = await fetch("/playground/info", { cache: "no-store" });
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    info = await r.json();
  } catch (e) {
    showMessage(`Cannot reach the qguard server (${e.message}). Is qguard serve still running?`);
    return;
  }
  S.info = info;
  $("model").textContent = info.model;
  $("model").dataset.starter = String(info.starter);
  $("kind").textContent = `(${info.kind}${info.live ? ", live sessions" : ""})`;
  $("starter-note").hidden = !info.starter;
  $("key-line").hidden = !info.auth;
  $("tab-chat").disabled = !info.chat;
  if (info.chat) $("tab-chat").title = "talk to the upstream LLM through the guarded proxy";
  $("mode").value = info.policy.mode;
  $("default-action").value = info.policy.default_action;
  if (info.policy.block_threshold !== null) $("threshold").value = info.policy.block_threshold;
  $("debounce-rule").textContent = `Debounce rule: ${info.policy.debounce} (the server's).`;
  const body = $("actions").tBodies[0];
  for (const c of info.categories) {
    const tr = document.createElement("tr");
    const name = document.createElement("td"); name.textContent = c;
    const cell = document.createElement("td");
    const sel = document.createElement("select");
    sel.dataset.category = c;
    for (const a of ["default", "allow", "flag", "block"]) {
      const o = document.createElement("option"); o.value = a; o.textContent = a; sel.appendChild(o);
    }
    sel.value = info.policy.actions[c] || "default";
    sel.addEventListener("change", render);
    cell.appendChild(sel); tr.append(name, cell); body.appendChild(tr);
  }
  if (!info.live) showMessage(`The model ${info.model} is a ${info.kind} checkpoint: the token-by-token view needs a ` +
                              "Qwen3Guard-Stream model (the chat mode still works with --upstream).");
}

function policy() {
  const t = $("threshold").value.trim();
  const actions = {};
  for (const sel of document.querySelectorAll("#actions select")) {
    if (sel.value !== "default") actions[sel.dataset.category] = sel.value;
  }
  const threshold = t === "" ? null : Number(t);
  return { mode: $("mode").value, default_action: $("default-action").value, actions,
           block_threshold: Number.isFinite(threshold) ? threshold : null };
}

// ------------------------------------------------------------------ the verdict, recomputed on screen
//
// The same rules as qguard/debounce.py (Debouncer) and qguard/policy.py (Policy), over the per-token
// probabilities and labels the server sent, so the controls change what is on the screen at once:
// - each token's label is the server's (argmax of its three probabilities), its category the top one;
// - debounce, rule "eval" (the default, the official eval code): Unsafe at the first index i where tokens
//   i-1 and i are both Unsafe (final); failing that, Controversial at the first Controversial-Controversial
//   pair (a later Unsafe pair still overrides it). Rule "report": the first i where tokens i-1 and i are
//   both not Safe; the verdict takes token i's label. The position is that index i (`unsafe_position`);
// - the verdict's probabilities and category are the deciding token's; with no decision the label is Safe;
// - mode: strict reads Controversial as Unsafe, loose as Safe (`binary`);
// - action: allow unless binary is Unsafe; else the category's action (or the default action); a block
//   whose P(unsafe under the mode) (strict: P(Unsafe)+P(Controversial), loose: P(Unsafe)) is under the
//   block threshold becomes a flag.

function debounce(tokens, rule) {
  let label = "Safe", position = null, decided = null, prev = null;
  for (let i = 0; i < tokens.length; i++) {
    const cur = tokens[i].label;
    if (prev !== null && label !== "Unsafe") {
      if (rule === "report") {
        if (position === null && prev !== "Safe" && cur !== "Safe") { label = cur; position = i; decided = tokens[i]; }
      } else if (prev === "Unsafe" && cur === "Unsafe") {
        label = "Unsafe"; position = i; decided = tokens[i];
      } else if (prev === "Controversial" && cur === "Controversial" && position === null) {
        label = "Controversial"; position = i; decided = tokens[i];
      }
    }
    prev = cur;
    if (label === "Unsafe" || (rule === "report" && position !== null)) break;
  }
  return { label, position, decided };
}

function judge(tokens, pol, rule) {
  const { label, position, decided } = debounce(tokens, rule);
  const categories = label !== "Safe" && decided ? [decided.category] : [];
  const binary = label === "Controversial" ? (pol.mode === "strict" ? "Unsafe" : "Safe") : label;
  let action = "allow";
  if (binary === "Unsafe") {
    const acts = categories.map((c) => pol.actions[c] || pol.default_action);
    if (!acts.length) acts.push(pol.default_action);
    action = acts.includes("block") ? "block" : acts.includes("flag") ? "flag" : "allow";
    if (action === "block" && pol.block_threshold !== null && decided) {
      const p = decided.probs;
      const pu = (p.Unsafe || 0) + (pol.mode === "strict" ? (p.Controversial || 0) : 0);
      if (pu < pol.block_threshold) action = "flag";
    }
  }
  return { label, binary, action, categories, position, probs: decided ? decided.probs : null };
}

// ---------------------------------------------------------------------------------------- rendering

const pct = (x) => (100 * (x || 0)).toFixed(1) + "%";

function tokenTitle(t) {
  const p = t.probs;
  const top = Object.entries(t.category_probs || {}).sort((a, b) => b[1] - a[1])[0];
  return `#${t.index} ${t.label} · P(unsafe) ${pct(p.Unsafe)} · P(controversial) ${pct(p.Controversial)} · ` +
         `P(safe) ${pct(p.Safe)} · top category ${t.category}${top ? ` (${pct(top[1])})` : ""}`;
}

function render() {
  const box = $("tokens");
  const v = judge(S.tokens, policy(), S.info ? S.info.policy.debounce : "eval");
  box.replaceChildren(...S.tokens.map((t, i) => {
    const s = document.createElement("span");
    s.className = `tok tok-${t.label.toLowerCase()}` + (i === v.position ? " tok-decided" : "");
    s.textContent = t.text;
    s.title = tokenTitle(t);
    s.dataset.index = String(t.index);
    s.dataset.label = t.label;
    return s;
  }));
  const el = $("verdict");
  Object.assign(el.dataset, { label: v.label, binary: v.binary, action: v.action,
                              position: v.position === null ? "" : String(v.position) });
  if (!S.tokens.length) {
    el.textContent = "response: nothing judged yet";
    el.dataset.binary = "";
  } else {
    const where = v.position === null ? "" : ` from token ${v.position} (“${S.tokens[v.position].text}”)`;
    const cats = v.categories.length ? ` · ${v.categories.join(", ")}` : "";
    el.textContent = `response: ${v.label}${where}${cats} → ${policy().mode}: ${v.binary}, ${v.action}` +
                     ` · ${S.tokens.length} tokens`;
  }
  drawChart(v.position);
}

function svg(name, attrs) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", name);
  for (const [k, val] of Object.entries(attrs)) e.setAttribute(k, String(val));
  return e;
}

function drawChart(position) {
  const c = $("chart"), W = 600, H = 160, pad = 8;
  const n = S.tokens.length;
  const x = (i) => pad + (n <= 1 ? 0 : (i * (W - 2 * pad)) / (n - 1));
  const y = (p) => H - pad - p * (H - 2 * pad);
  const kids = [0.5, 1].map((p) => svg("line", { x1: 0, x2: W, y1: y(p), y2: y(p), stroke: "#eee" }));
  const line = (key, colour) => svg("polyline", {
    points: S.tokens.map((t, i) => `${x(i).toFixed(1)},${y(t.probs[key] || 0).toFixed(1)}`).join(" "),
    fill: "none", stroke: colour, "stroke-width": 2, "vector-effect": "non-scaling-stroke", class: `series-${key}`,
  });
  if (n) kids.push(line("Controversial", "#e6a100"), line("Unsafe", "#d62728"));
  if (position !== null && position < n) {
    const m = svg("line", { x1: x(position), x2: x(position), y1: 0, y2: H, stroke: "#444",
                            "stroke-dasharray": "4 3", id: "chart-position" });
    kids.push(m);
  }
  c.replaceChildren(...kids);
}

function showPromptVerdict(frame) {
  const v = frame.verdict, el = $("prompt-verdict");
  S.promptVerdict = v;
  const pu = v.probs ? ` · P(unsafe) ${pct(v.probs.Unsafe)}` : "";
  const cats = v.categories.length ? ` · ${v.categories.join(", ")}` : "";
  el.textContent = `prompt: ${v.label}${cats} → ${v.mode}: ${v.binary}, ${v.action}${pu}` +
                   (frame.blocked ? " (the policy blocks this prompt: a guarded LLM would not see it)" : "");
  el.dataset.binary = v.binary;
  el.dataset.label = v.label;
}

// ------------------------------------------------------------------------------------ the WebSocket

function wsUrl() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const key = apiKey();
  return `${proto}//${location.host}/v1/stream` + (key ? `?api_key=${encodeURIComponent(key)}` : "");
}

function connect() {
  if (S.ws && S.wsReady) return Promise.resolve(S.ws);
  if (S.connecting) return S.connecting;  // one connection at a time, however many edits wait for it
  S.connecting = new Promise((resolve, reject) => {
    const ws = new WebSocket(wsUrl());
    S.ws = ws; S.wsReady = false; S.expect = []; S.open = false;
    ws.onopen = () => { S.wsReady = true; resolve(ws); };
    ws.onmessage = (ev) => onFrame(ev.data);
    ws.onerror = () => reject(new Error("the WebSocket could not connect"));
    ws.onclose = (ev) => {
      const was = S.wsReady;
      if (S.ws === ws) { S.ws = null; S.wsReady = false; S.open = false; S.expect = []; }
      $("session-state").textContent = "disconnected";
      if (was && ev.code === 1001) showMessage(ERRORS.idle_timeout);
      else if (was && ev.code !== 1000) {
        showMessage(`The connection to the qguard server closed (code ${ev.code}${ev.reason ? ": " + ev.reason : ""}). ` +
                    "Is qguard serve still running? Edit the text or press Judge to reconnect.");
      }
      if (!was) reject(new Error("the WebSocket closed before it opened"));
    };
  }).finally(() => { S.connecting = null; });
  return S.connecting;
}

function send(frame) {
  if (!S.ws || !S.wsReady) throw new Error("not connected");
  const text = JSON.stringify(frame);
  const limit = S.info ? S.info.limits.max_request_bytes : Infinity;
  const size = new TextEncoder().encode(text).length;
  if (size > limit) {
    throw new RangeError(`The text is too long: ${size} bytes, over the server's limit of ${limit} bytes per frame.`);
  }
  S.ws.send(text);
  S.expect.push({ type: frame.type, session: S.session });
}

const ERRORS = {
  unauthorized: "The server wants an API key: enter a valid one in the API key field (or open the page with ?api_key=KEY).",
  capacity: "The server is busy (every live session is in use): try again in a moment.",
  too_long: "The text is too long for the server",
  live_required: "This model has no live sessions: the token-by-token view needs a Qwen3Guard-Stream checkpoint.",
  idle_timeout: "The session timed out after a long idle time; edit the text to start again.",
};

function onFrame(data) {
  let f;
  try { f = JSON.parse(data); } catch { return showMessage("The server sent a frame the page cannot read."); }
  const unsolicited = f.type === "error" && (f.code === "unauthorized" || f.code === "idle_timeout");
  const exp = unsolicited ? null : S.expect.shift();
  if (f.type === "error") {
    const base = ERRORS[f.code];
    showMessage(base ? (f.code === "too_long" ? `${base}: ${f.message}` : base) : `Server error (${f.code}): ${f.message}`);
    if (exp && exp.type === "open" && exp.session === S.session) S.open = false;
    return;
  }
  if (!exp || exp.session !== S.session) return;  // a reply for a session the page already left
  if (f.type === "prompt") {
    showPromptVerdict(f);
    $("session-state").textContent = "session open";
    syncResponse();
  } else if (f.type === "tokens") {
    S.tokens.push(...f.tokens);
    render();
  } else if (f.type === "verdict") {
    S.serverVerdict = f.verdict;
    const v = f.verdict;
    $("server-verdict").textContent = `server's verdict (${v.mode}): ${v.label}` +
      (v.unsafe_position === null ? "" : ` at token ${v.unsafe_position}`) + ` · ${v.n_tokens} tokens with the prompt`;
    $("server-verdict").dataset.position = v.unsafe_position === null ? "" : String(v.unsafe_position);
    $("session-state").textContent = "judged";
  }
}

// --------------------------------------------------------------------------------------- the session

async function restart() {
  clearTimeout(S.finishTimer);
  const prompt = $("prompt").value;
  const finished0 = S.finished;
  S.session += 1; S.sent = ""; S.finished = false; S.tokens = []; S.serverVerdict = null;
  $("server-verdict").textContent = ""; $("server-verdict").dataset.position = "";
  render();
  if (!prompt.trim()) {
    $("prompt-verdict").textContent = "prompt: not judged yet";
    return showMessage("Type a prompt first: the guard judges a response as the answer to a prompt.");
  }
  if (S.info && !S.info.live) return;
  clearMessage();
  try {
    await connect();
    if (S.open && !finished0) send({ type: "close" });  // a finished session needs no close
    send({ type: "open", messages: [{ role: "user", content: prompt }] });
    S.open = true;
    $("session-state").textContent = "judging the prompt…";
  } catch (e) {
    S.open = false;
    showMessage(e instanceof RangeError ? e.message :
                `Cannot reach the qguard server (${e.message}). Is qguard serve still running?`);
  }
}

// Push what was appended to the response box since the last push; any other edit (a deletion, a change in
// the middle) restarts the session, which then pushes the whole text again.
function syncResponse() {
  if (!S.open) return;
  const text = $("response").value;
  if (S.finished || !text.startsWith(S.sent)) {
    if (text !== S.sent) restart();
    return;
  }
  const delta = text.slice(S.sent.length);
  if (!delta) return;
  try {
    send({ type: "push", text: delta });
    S.sent = text;
  } catch (e) {
    return showMessage(e instanceof RangeError ? e.message : "Not connected to the server: edit the text to reconnect.");
  }
  clearTimeout(S.finishTimer);
  if (!S.replayTimer) S.finishTimer = setTimeout(finish, FINISH_IDLE_MS);
}

function finish() {
  if (!S.open || S.finished || !S.sent) return;
  try {  // flush first: its `tokens` frame carries the held-back tail, which `finish` judges but does not list
    send({ type: "flush" });
    send({ type: "finish" });
    S.finished = true;
  } catch { /* the close handler already said why */ }
}

function onResponseInput() {
  clearTimeout(S.typeTimer);
  S.typeTimer = setTimeout(() => {
    if (!$("prompt").value.trim()) return showMessage("Type a prompt first: the guard judges a response as the answer to a prompt.");
    if (!S.open) return restart();
    syncResponse();
  }, TYPE_DEBOUNCE_MS);
}

function replay() {
  clearInterval(S.replayTimer); S.replayTimer = null;
  const source = $("response").value;
  if (!source.trim()) return showMessage("The response box is empty: type or paste a response to replay.");
  const words = source.match(/\s*\S+|\s+$/g) || [source];
  const rate = Number($("speed").value);
  $("response").value = rate ? "" : source;
  restart().then(() => {
    if (!rate) return;  // all at once: the prompt frame's handler pushes the whole box
    let i = 0;
    S.replayTimer = setInterval(() => {
      if (i >= words.length || !S.open) {
        clearInterval(S.replayTimer); S.replayTimer = null;
        if (i < words.length) $("response").value = source;  // stopped early: leave the whole text shown
        return finish();
      }
      $("response").value += words[i++];
      syncResponse();
    }, 1000 / rate);
  });
}

// --------------------------------------------------------------------------------------- chat mode

function addChat(role, text, cls) {
  const d = document.createElement("div");
  d.className = `chat-msg chat-${role}` + (cls ? ` ${cls}` : "");
  d.textContent = text;
  $("chat-log").appendChild(d);
  return d;
}

function showGuard(q) {
  if (!q) return;
  const lines = [];
  if (q.prompt) lines.push(`prompt: ${q.prompt.label} → ${q.prompt.binary}, ${q.prompt.action}`);
  if (q.response) {
    lines.push(`response: ${q.response.label} → ${q.response.binary}, ${q.response.action}` +
               (q.response.unsafe_position === null ? "" : ` (unsafe from token ${q.response.unsafe_position})`));
  }
  if (q.blocked) lines.push(`blocked: the ${q.blocked}`);
  const rest = Object.fromEntries(Object.entries(q).filter(([k]) => !["prompt", "response", "blocked"].includes(k)));
  if (Object.keys(rest).length) lines.push(JSON.stringify(rest, null, 1));  // hold-back, rollbacks, ...
  $("chat-guard").textContent = lines.join("\n");
}

async function chatSend() {
  const text = $("chat-input").value, model = $("chat-model").value.trim();
  if (!model) return showMessage("Enter the upstream LLM's model name first.");
  if (!text.trim()) return showMessage("Type a message first.");
  clearMessage();
  S.chat.push({ role: "user", content: text });
  addChat("user", text);
  $("chat-input").value = "";
  const out = addChat("assistant", "");
  $("chat-state").textContent = "streaming…";
  const headers = { "content-type": "application/json" };
  if (apiKey()) headers.authorization = `Bearer ${apiKey()}`;
  let answer = "";
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers,
      body: JSON.stringify({ model, messages: S.chat, stream: true }) });
    if (!r.ok) {
      let msg = `HTTP ${r.status}`;
      try { msg = (await r.json()).error.message; } catch { /* not JSON: keep the status */ }
      throw new Error(msg);
    }
    const reader = r.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl).trim(); buf = buf.slice(nl + 1);
        if (!line.startsWith("data:")) continue;  // blank separators and keep-alive comments
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.qguard) showGuard(chunk.qguard);
        for (const ch of chunk.choices || []) {
          if (ch.delta && ch.delta.content) { answer += ch.delta.content; out.textContent = answer; }
          if (ch.finish_reason === "content_filter") {
            addChat("cut", "✂ cut by the guard (finish_reason: content_filter)", "chat-cut");
          }
        }
      }
    }
    S.chat.push({ role: "assistant", content: answer });
    $("chat-state").textContent = "";
  } catch (e) {
    S.chat.pop();
    out.remove();
    $("chat-state").textContent = "";
    showMessage(`Chat failed: ${e.message}`);
  }
}

// ------------------------------------------------------------------------------------------- wiring

function tab(which) {
  $("judge-panel").hidden = which !== "judge";
  $("chat-panel").hidden = which !== "chat";
  $("tab-judge").classList.toggle("active", which === "judge");
  $("tab-chat").classList.toggle("active", which === "chat");
}

window.addEventListener("DOMContentLoaded", () => {
  let promptTimer = null;
  $("prompt").addEventListener("input", () => {
    clearTimeout(promptTimer);
    promptTimer = setTimeout(() => { if ($("prompt").value.trim()) restart(); }, TYPE_DEBOUNCE_MS * 2);
  });
  $("judge").addEventListener("click", () => restart());
  $("response").addEventListener("input", onResponseInput);
  $("replay").addEventListener("click", replay);
  $("clear").addEventListener("click", () => { $("response").value = ""; restart(); });
  for (const id of ["mode", "threshold", "default-action"]) {
    $(id).addEventListener("input", render);
    $(id).addEventListener("change", render);
  }
  $("tab-judge").addEventListener("click", () => tab("judge"));
  $("tab-chat").addEventListener("click", () => tab("chat"));
  $("chat-send").addEventListener("click", chatSend);
  $("chat-reset").addEventListener("click", () => { S.chat = []; $("chat-log").replaceChildren(); $("chat-guard").textContent = ""; });
  $("api-key").addEventListener("change", () => { if (S.ws) S.ws.close(1000); });
  render();
  loadInfo();
});
