// The edge server's page: a chat over /v1/chat/completions (streamed), and beside each answer a strip
// with one mark per generated token: the cuts (a, b) of its step drawn over the layers
// (edge [0, a) / cloud [a, b) / edge [b, L), input at the bottom) and the bytes each way.
// Plain DOM, no libraries: the server ships this file as it is.
"use strict";

const $ = (id) => document.getElementById(id);
const logEl = $("log"), promptEl = $("prompt"), sendEl = $("send"), tipEl = $("tip");
const BYTES_FULL = 1e5; // bytes bars are log-scaled; this many bytes fill one
let info = null;        // GET /health: model ids, split sets, whether a key is needed
let history = [];       // the conversation sent with every request (the split answers)

function fmtBytes(n) {
  if (n < 1000) return `${n} B`;
  if (n < 1e6) return `${(n / 1e3).toFixed(1)} kB`;
  return `${(n / 1e6).toFixed(2)} MB`;
}

function fmtSet(values) {
  const sorted = [...values].sort((x, y) => x - y);
  const contiguous = sorted.length > 2 && sorted[sorted.length - 1] - sorted[0] === sorted.length - 1;
  return contiguous ? `{${sorted[0]}–${sorted[sorted.length - 1]}}` : `{${sorted.join(", ")}}`;
}

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

async function loadInfo() {
  try {
    const response = await fetch("/health");
    info = await response.json();
    const s = info.split;
    $("model").textContent = info.model;
    $("config").textContent =
      `first cuts ${fmtSet(s.first)} · second cuts ${fmtSet(s.second)} · ${s.num_layers} layers · codec ${s.codec} · ` +
      (s.resplit_every === 0 ? "cuts drawn once per request" : s.resplit_every === 1 ? "cuts drawn per token" : `cuts drawn every ${s.resplit_every} tokens`);
    $("key-label").hidden = !info.auth;
    $("compare").disabled = !info.models.includes(info.model + "-unsplit");
  } catch (error) {
    $("model").textContent = "server unreachable";
  }
}

// ---- one answer: text as token spans, and the strip -------------------------------------------
function makeCard(turn, kind, title) {
  const card = el("div", "card");
  card.dataset.model = kind;
  card.dataset.done = "0";
  const body = el("div", "body");
  body.append(el("div", "label", title));
  const text = el("div", "text");
  body.append(text);
  const side = el("div", "side");
  const summary = el("div", "summary", "waiting for the model…");
  const strip = el("div", "strip");
  const axis = el("div", "axis");
  side.append(summary, strip, axis);
  card.append(body, side);
  turn.querySelector(".answers").append(card);
  const state = { card, text, summary, strip, axis, head: null, tokens: [], spans: [], marks: [], content: "",
    covered: 0, settled: 0, rest: null, usage: null, stoppedBy: null, began: performance.now(), firstAt: null };
  card.addEventListener("mouseover", (event) => hover(state, event));
  card.addEventListener("mouseout", () => unhover(state));
  return state;
}

function addToken(state, entry) {
  const i = state.tokens.length;
  entry.start = state.covered;
  state.covered += entry.text.length;
  state.tokens.push(entry);
  const span = el("span");
  span.dataset.i = i;
  if (state.rest) state.text.insertBefore(span, state.rest); else state.text.append(span);
  state.spans.push(span);

  const L = state.head ? state.head.num_layers : 1;
  const mark = el("div", "tok");
  mark.dataset.i = i;
  const layers = el("div", "layers");
  for (const [cls, lo, hi] of [["e1", 0, entry.a], ["c", entry.a, entry.b], ["e2", entry.b, L]]) {
    if (hi <= lo) continue;
    const band = el("i", `band ${cls}`);
    band.style.bottom = `${(100 * lo) / L}%`;
    band.style.height = `${(100 * (hi - lo)) / L}%`;
    layers.append(band);
  }
  const bytes = el("div", "bytes");
  for (const [cls, n] of [["up", entry.bytes_up], ["down", entry.bytes_down]]) {
    if (!n) continue;
    const bar = el("i", cls);
    bar.style.height = `calc(var(--bytes-h) * ${Math.min(1, Math.log10(1 + n) / Math.log10(1 + BYTES_FULL)).toFixed(3)})`;
    bytes.append(bar);
  }
  mark.append(layers, bytes);
  state.strip.append(mark);
  state.marks.push(mark);
}

// The content the server released is a prefix of the tokens' pieces (it holds back what may start a
// stop string), plus, at the very end, any incomplete character: show each token's part of it.
function renderText(state) {
  const n = state.content.length;
  for (let i = state.settled; i < state.tokens.length; i++) {
    const t = state.tokens[i], end = t.start + t.text.length;
    state.spans[i].textContent = state.content.slice(t.start, Math.min(end, n));
    if (end <= n && i === state.settled) state.settled = i + 1;
  }
  if (n > state.covered) {
    if (!state.rest) { state.rest = el("span"); state.text.append(state.rest); }
    state.rest.textContent = state.content.slice(state.covered);
  }
  logEl.scrollTop = logEl.scrollHeight;
}

function renderSummary(state) {
  const h = state.head, n = state.tokens.length;
  if (!h) return;
  const up = state.tokens.reduce((s, t) => s + t.bytes_up, 0), down = state.tokens.reduce((s, t) => s + t.bytes_down, 0);
  const seconds = state.firstAt && n > 1 ? (performance.now() - state.firstAt) / 1000 : 0;
  const parts = [`<b>${n}</b> token${n === 1 ? "" : "s"}`,
    `prefill ${h.prefilled} position${h.prefilled === 1 ? "" : "s"}${h.cached_tokens ? ` (${h.cached_tokens} cached)` : ""}`];
  if (h.split) parts.push(`↑ <b>${fmtBytes(up)}</b>`, `↓ <b>${fmtBytes(down)}</b>`);
  else parts.push("edge alone: nothing crosses");
  if (seconds > 0) parts.push(`${((n - 1) / seconds).toFixed(1)} tok/s`);
  if (state.stoppedBy) parts.push(`ended: ${state.stoppedBy.replace("_", " ")}`);
  state.summary.innerHTML = parts.join(" · ");
  state.axis.innerHTML = `<span>layer 0 at the bottom, ${h.num_layers - 1} at the top</span><span>bytes: log scale</span>`;
}

function hover(state, event) {
  const target = event.target.closest("[data-i]");
  if (!target || !state.card.contains(target)) return;
  unhover(state);
  const i = Number(target.dataset.i), t = state.tokens[i];
  if (!t) return;
  state.spans[i].classList.add("hot");
  state.marks[i].classList.add("hot");
  state.hot = i;
  const L = state.head.num_layers;
  const range = (lo, hi) => (hi - lo === 1 ? `${lo}` : `${lo}–${hi - 1}`);
  const where = [];
  if (t.a > 0) where.push(`edge ${range(0, t.a)}`);
  if (t.b > t.a) where.push(`cloud ${range(t.a, t.b)}`);
  if (L > t.b) where.push(`edge ${range(t.b, L)}`);
  let text = `token #${i}  ${JSON.stringify(t.text)}\ncuts a=${t.a}, b=${t.b}: ${where.join(" · ")}`;
  if (state.head.split) {
    text += t.a < t.b
      ? `\n↑ ${fmtBytes(t.bytes_up)} (${t.positions_up} pos.)  ↓ ${fmtBytes(t.bytes_down)} (${t.positions_down} pos.)`
      : "\na = b: nothing crossed the link";
  }
  tipEl.textContent = text;
  tipEl.hidden = false;
  const box = target.getBoundingClientRect();
  tipEl.style.left = `${Math.max(4, Math.min(box.left - 20, window.innerWidth - 390))}px`;
  tipEl.style.top = `${box.bottom + 6}px`;
}

function unhover(state) {
  if (state.hot !== undefined) {
    state.spans[state.hot].classList.remove("hot");
    state.marks[state.hot].classList.remove("hot");
    state.hot = undefined;
  }
  tipEl.hidden = true;
}

// ---- the request: OpenAI chunks over server-sent events -----------------------------------------
async function stream(state, model, messages) {
  const headers = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  const body = {
    model, messages, max_tokens: Number($("max-tokens").value) || undefined,
    temperature: Number($("temperature").value), stream: true, stream_options: { include_usage: true },
  };
  try {
    const response = await fetch("/v1/chat/completions", { method: "POST", headers, body: JSON.stringify(body) });
    if (!response.ok) {
      const failure = await response.json().catch(() => ({}));
      throw new Error(failure.error ? failure.error.message : `HTTP ${response.status}`);
    }
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (line.startsWith("data: ") && line !== "data: [DONE]") onChunk(state, JSON.parse(line.slice(6)));
        }
      }
    }
  } catch (error) {
    state.failed = true;
    state.card.querySelector(".body").append(el("div", "error", String(error.message || error)));
    if (!state.head) state.summary.textContent = "no answer";
  }
  state.card.dataset.tokens = state.usage ? state.usage.completion_tokens : state.tokens.length;
  state.card.dataset.done = "1";
  renderSummary(state);
  return state;
}

function onChunk(state, chunk) {
  if (chunk.error) throw new Error(chunk.error.message);
  const trace = chunk.split_trace;
  if (trace) {
    if (trace.num_layers !== undefined) state.head = trace;
    for (const entry of trace.tokens || []) {
      if (state.firstAt === null) state.firstAt = performance.now();
      addToken(state, entry);
    }
    if (trace.stopped_by) state.stoppedBy = trace.stopped_by;
  }
  if (chunk.usage) state.usage = chunk.usage;
  const choice = chunk.choices && chunk.choices[0];
  if (choice && choice.delta && choice.delta.content) state.content += choice.delta.content;
  renderText(state);
  renderSummary(state);
}

function compare(turn, split, unsplit) {
  const a = split.tokens, b = unsplit.tokens;
  let i = 0;
  while (i < a.length && i < b.length && a[i].id === b[i].id) i++;
  const verdict = el("div", "verdict");
  if (i === a.length && i === b.length) {
    verdict.classList.add("same");
    verdict.textContent = `Same ${i} tokens: the split answer is the unsplit one, token for token.`;
  } else {
    verdict.classList.add("differs");
    const show = (t) => (t ? JSON.stringify(t.text) : "(ended)");
    verdict.innerHTML = `First difference at token #${i}: split <code></code> vs unsplit <code></code>` +
      ` (${i} token${i === 1 ? "" : "s"} agree before it).`;
    const codes = verdict.querySelectorAll("code");
    codes[0].textContent = show(a[i]);
    codes[1].textContent = show(b[i]);
    for (const state of [split, unsplit]) {
      if (state.spans[i]) state.spans[i].classList.add("diff");
      if (state.marks[i]) state.marks[i].classList.add("diff");
    }
  }
  turn.insertBefore(verdict, turn.querySelector(".answers"));  // a headline above both answers
}

async function send(event) {
  event.preventDefault();
  const prompt = promptEl.value.trim();
  if (!prompt || document.body.dataset.busy === "1") return;
  document.body.dataset.busy = "1";
  sendEl.disabled = true;
  promptEl.value = "";
  const messages = [...history, { role: "user", content: prompt }];
  const both = $("compare").checked && !$("compare").disabled;
  const turn = el("section", both ? "turn compare" : "turn");
  turn.append(el("div", "user", prompt), el("div", "answers"));
  logEl.append(turn);
  const split = makeCard(turn, "split", both ? "split" : `split · ${info ? info.model : ""}`);
  const unsplit = both ? makeCard(turn, "unsplit", "unsplit (edge alone)") : null;
  await stream(split, info.model, messages);
  if (unsplit) {
    await stream(unsplit, info.model + "-unsplit", messages);
    compare(turn, split, unsplit);
  }
  if (!split.failed) history = [...messages, { role: "assistant", content: split.content }];  // a failed turn is not part of the conversation
  document.body.dataset.busy = "0";
  sendEl.disabled = false;
  promptEl.focus();
}

$("composer").addEventListener("submit", send);
promptEl.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) send(event);
});
$("clear").addEventListener("click", () => { history = []; logEl.replaceChildren(); promptEl.focus(); });
loadInfo();
