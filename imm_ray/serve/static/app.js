// The run page of imm-ray (Apache-2.0, like the package). Plain JavaScript, no third-party code.
// Signs in with the app's API key (sent as the bearer token), polls ui/api/overview, shows a round's
// samples, and streams one prompt to several models through v1/chat/completions.
"use strict";

const KEY_STORE = "imm-api-key";
const POLL_MS = 3000;
const COLORS = ["#0969da", "#cf222e", "#1a7f37", "#8250df", "#bc4c00", "#6e7781"];
const SVG = "http://www.w3.org/2000/svg";
const state = { key: localStorage.getItem(KEY_STORE) || "", overview: null, timer: null, offset: 0, request: 0, models: "" };

const $ = (sel) => document.querySelector(sel);
const byTestId = (id) => document.querySelector(`[data-testid="${id}"]`);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) node.append(c);
  return node;
}

function svgEl(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

const pct = (v) => (v === null || v === undefined ? "–" : `${(100 * v).toFixed(1)}%`);
const num = (v) => (v === null || v === undefined ? "–" : Number(v).toFixed(Math.abs(v) >= 10 ? 0 : 3));

// --- talking to the app ----------------------------------------------------------------------
class AuthError extends Error {}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  const resp = await fetch(path, Object.assign({}, options, { headers }));
  if (resp.status === 401) throw new AuthError("the API key was refused");
  if (!resp.ok) {
    let message = `${resp.status} ${resp.statusText}`;
    try { message = (await resp.json()).error.message; } catch (_) { /* not an OpenAI-style error */ }
    throw new Error(message);
  }
  return resp;
}

const getJSON = async (path) => (await api(path)).json();

// --- sign in ---------------------------------------------------------------------------------
function showSignIn(message) {
  clearInterval(state.timer);
  state.overview = null;
  $("#app").hidden = true;
  byTestId("nav").hidden = true;
  $("#signin").hidden = false;
  byTestId("signin-error").textContent = message || "";
  $("#signin-key").focus();
}

async function signIn(key) {
  state.key = key;
  try {
    await refreshOverview();
  } catch (err) {
    if (err instanceof AuthError) {
      localStorage.removeItem(KEY_STORE);
      state.key = "";
      showSignIn(key ? "That API key was refused." : "");
      return;
    }
    throw err;
  }
  if (key) localStorage.setItem(KEY_STORE, key);
  $("#signin").hidden = true;
  $("#app").hidden = false;
  byTestId("nav").hidden = false;
  clearInterval(state.timer);
  state.timer = setInterval(() => refreshOverview().catch(onPollError), POLL_MS);
  fillSampleControls();
  loadModels().catch((err) => { byTestId("compare-error").textContent = err.message; });
}

function onPollError(err) {
  if (err instanceof AuthError) showSignIn("The API key is no longer accepted.");
  else byTestId("overview-problem").textContent = `update failed: ${err.message}`;
}

// --- overview --------------------------------------------------------------------------------
async function refreshOverview() {
  const data = await getJSON("ui/api/overview");
  byTestId("overview-updated").textContent = `Updated ${new Date().toLocaleTimeString()} (every ${POLL_MS / 1000} s).`;
  byTestId("overview-problem").textContent = "";
  if (JSON.stringify(data) === JSON.stringify(state.overview)) return;  // nothing new: keep the page as it is
  state.overview = data;
  byTestId("run-name").textContent = `run ${data.run}`;
  document.title = `${data.run} · imm-ray`;
  renderRounds(data);
  renderCharts(data);
  renderVotes(data.votes);
  fillSampleControls();
}

function allRounds(data) {
  return [["base", data.baseline]].concat(...data.arms.map((a) => a.rounds.map((r) => [a.name, r])));
}

function renderRounds(data) {
  const table = byTestId("rounds-table");
  const head = ["arm", "round", ...data.stages, "generated", "accepted",
    ...data.datasets.map((d) => `${d} accuracy`), "merge params", "wall time"];
  table.tHead.replaceChildren(el("tr", {}, ...head.map((h) => el("th", { scope: "col", text: h }))));
  const rows = allRounds(data).map(([arm, r]) => {
    const stages = data.stages.map((s) => {
      const st = r.status[s] || "–";
      const secs = r.seconds[s];
      return el("td", { class: `st-${st}`, "data-stage": s, "data-status": st,
        title: st, text: st === "done" && secs !== undefined ? `✓ ${secs.toFixed(0)} s` : st });
    });
    const acc = data.datasets.map((d) => {
      const a = (r.accuracy || {})[d];
      return el("td", { text: a ? `${pct(a.value)}${a.ci95 ? ` [${pct(a.ci95[0])}, ${pct(a.ci95[1])}]` : ""}` : "–" });
    });
    const merge = r.merge && r.merge.params ? Object.entries(r.merge.params).map(([k, v]) => `${k}=${v}`).join(", ") : "–";
    const wall = Object.values(r.seconds).reduce((s, v) => s + v, 0);
    const link = el("button", { type: "button", "data-testid": "open-samples", text: "samples",
      "aria-label": `samples of ${arm} round ${r.round}` });
    link.addEventListener("click", () => openSamples(arm, r.round));
    return el("tr", { "data-testid": "round-row", "data-arm": arm, "data-round": String(r.round) },
      el("td", { text: arm }), el("td", {}, `${r.round} `, link), ...stages,
      el("td", { text: r.generated ?? "–" }), el("td", { text: r.accepted ?? "–" }), ...acc,
      el("td", { text: merge }), el("td", { text: wall ? `${wall.toFixed(0)} s` : "–" }));
  });
  table.tBodies[0].replaceChildren(...rows);
}

// Per arm: the points (round, value, interval) of a metric, the baseline as round 0.
function series(data, value) {
  return data.arms.map((arm, i) => ({
    name: arm.name, color: COLORS[i % COLORS.length],
    points: [data.baseline, ...arm.rounds].map((r) => Object.assign({ x: r.round }, value(r) || {}))
      .filter((p) => p.y !== null && p.y !== undefined),
  })).filter((s) => s.points.length);
}

// An SVG line chart against the round (x from 0, the baseline); ``domain`` fixes the y range.
function lineChart(title, testid, lines, format, domain = null) {
  const W = 420, H = 220, L = 58, R = 12, T = 10, B = 28;
  const pts = lines.flatMap((s) => s.points);
  const fig = el("figure", { "data-testid": testid, "data-points": String(pts.length) }, el("figcaption", { text: title }));
  if (!pts.length) { fig.append(el("p", { class: "muted", text: "no finished round yet" })); return fig; }
  const xs = pts.map((p) => p.x), ys = pts.flatMap((p) => [p.y, p.lo ?? p.y, p.hi ?? p.y]);
  const x0 = Math.min(0, ...xs), x1 = Math.max(...xs, 1);
  let [y0, y1] = domain || [Math.min(...ys), Math.max(...ys)];
  if (y1 - y0 < 1e-9) { const pad = Math.abs(y0) * 0.1 || 0.05; y0 -= pad; y1 += pad; }
  const sx = (x) => L + 10 + ((x - x0) / (x1 - x0)) * (W - L - R - 20);  // off the axis
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, role: "img",
    "aria-label": `${title}: ${lines.map((s) => `${s.name} ${s.points.map((p) => `round ${p.x} ${format(p.y)}`).join(", ")}`).join("; ")}` });
  svg.append(svgEl("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#d0d7de" }));
  svg.append(svgEl("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#d0d7de" }));
  for (const y of [y0, (y0 + y1) / 2, y1]) {
    const t = svgEl("text", { x: L - 4, y: sy(y) + 4, "text-anchor": "end" });
    t.textContent = format(y);
    svg.append(t);
  }
  for (let x = Math.ceil(x0); x <= x1; x++) {
    const t = svgEl("text", { x: sx(x), y: H - 8, "text-anchor": "middle" });
    t.textContent = String(x);
    svg.append(t);
  }
  for (const s of lines) {
    const d = s.points.map((p, i) => `${i ? "L" : "M"}${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`).join(" ");
    svg.append(svgEl("path", { d, fill: "none", stroke: s.color, "stroke-width": 2, "data-testid": "chart-line" }));
    for (const p of s.points) {
      if (p.lo !== undefined && p.hi !== undefined) {
        svg.append(svgEl("line", { x1: sx(p.x), x2: sx(p.x), y1: sy(p.lo), y2: sy(p.hi), stroke: s.color, "stroke-opacity": 0.5 }));
      }
      const c = svgEl("circle", { cx: sx(p.x), cy: sy(p.y), r: 3.5, fill: s.color, "data-testid": "chart-point" });
      const tip = svgEl("title");
      tip.textContent = `${s.name} round ${p.x}: ${format(p.y)}`;
      c.append(tip);
      svg.append(c);
    }
  }
  const legend = el("div", { class: "legend" }, ...lines.map((s) => {
    const sw = el("span", { class: "swatch" });
    sw.style.background = s.color;
    return el("span", {}, sw, s.name);
  }));
  fig.append(svg, legend);
  return fig;
}

function renderCharts(data) {
  byTestId("accuracy-charts").replaceChildren(...data.datasets.map((d) => lineChart(d, "chart-accuracy",
    series(data, (r) => {
      const a = (r.accuracy || {})[d];
      return a && { y: a.value, lo: a.ci95 ? a.ci95[0] : undefined, hi: a.ci95 ? a.ci95[1] : undefined };
    }), pct, [0, 1])));
  const select = byTestId("diversity-metric");
  const chosen = select.value || data.diversity_keys[0];
  select.replaceChildren(...data.diversity_keys.map((k) => el("option", { value: k, text: k, selected: k === chosen })));
  byTestId("diversity-charts").replaceChildren(chosen ? lineChart(chosen, "chart-diversity",
    series(data, (r) => r.diversity && r.diversity[chosen] !== null && { y: r.diversity[chosen] }), num)
    : el("p", { class: "muted", text: "no diversity measured yet" }));
  byTestId("accepted-charts").replaceChildren(lineChart("accepted samples", "chart-accepted",
    series(data, (r) => r.round > 0 && r.accepted !== undefined && { y: r.accepted }), (v) => v.toFixed(0)));
}

function renderVotes(votes) {
  const wins = Object.entries(votes.wins).map(([m, n]) => `${m}: ${n}`).join(", ");
  byTestId("votes-summary").textContent = votes.total
    ? `${votes.total} vote${votes.total === 1 ? "" : "s"} (${votes.ties} tie${votes.ties === 1 ? "" : "s"})${wins ? `; wins: ${wins}` : ""}`
    : "No votes yet: compare models side by side in blind mode to vote.";
}

// --- samples ---------------------------------------------------------------------------------
const FILTERS = { train: ["all", "accepted", "rejected", "disagree"], eval: ["all", "right", "wrong", "gained", "lost"] };

function setOptions(select, values, label = (v) => v) {
  const keep = select.value;
  if ([...select.options].map((o) => o.value).join("\n") === values.map(String).join("\n")) return;
  select.replaceChildren(...values.map((v) => el("option", { value: String(v), text: label(v) })));
  if (values.map(String).includes(keep)) select.value = keep;
}

function fillSampleControls() {
  const data = state.overview;
  if (!data) return;
  const kind = byTestId("samples-kind").value;
  const arms = kind === "eval" ? ["base", ...data.arms.map((a) => a.name)] : data.arms.map((a) => a.name);
  setOptions(byTestId("samples-arm"), arms);
  const arm = byTestId("samples-arm").value;
  const done = (r) => (kind === "eval" ? r.status.evaluate === "done" : r.status.generate === "done");
  const rounds = arm === "base" ? [0] : (data.arms.find((a) => a.name === arm)?.rounds || []).filter(done).map((r) => r.round);
  setOptions(byTestId("samples-round"), rounds);
  setOptions(byTestId("samples-other"), rounds);
  setOptions(byTestId("samples-filter"), FILTERS[kind]);
  $("#samples-other-label").hidden = !(kind === "train" && byTestId("samples-filter").value === "disagree");
}

function openSamples(arm, round) {
  const kind = byTestId("samples-kind");
  if (arm === "base") kind.value = "eval";
  fillSampleControls();
  byTestId("samples-arm").value = arm;
  fillSampleControls();
  byTestId("samples-round").value = String(round);
  showView("samples");
  loadSamples(0);
}

function sampleCard(s) {
  const verdict = s.accepted ? "accepted" : s.correct ? "rejected (a duplicate)" : "rejected";
  const extracted = s.correct === null ? "(not recorded)" : s.extracted ?? "(none)";
  return el("div", { class: "sample", "data-testid": "sample", "data-accepted": String(s.accepted) },
    el("p", {}, el("strong", { class: s.accepted ? "good" : "bad", text: `sample ${s.sample}: ${verdict}` }),
      ` · extracted ${extracted} · gold ${s.gold}`, s.finish_reason === "length" ? " · truncated" : ""),
    el("pre", { text: s.completion }));
}

function answerCard(a) {
  return el("div", { class: "answer", "data-testid": "eval-answer", "data-correct": String(a.correct),
    "data-change": a.change || "" },
    el("p", {}, el("strong", { class: a.correct ? "good" : "bad", text: a.correct ? "right" : "wrong" }),
      ` · ${a.dataset} ${a.problem_id} · extracted ${a.extracted ?? "(none)"} · gold ${a.gold}`,
      a.change ? el("strong", { text: ` · ${a.change} vs baseline` }) : ""),
    el("pre", { text: a.completion }));
}

async function loadSamples(offset) {
  const kind = byTestId("samples-kind").value;
  const arm = byTestId("samples-arm").value, round = byTestId("samples-round").value;
  const filter = byTestId("samples-filter").value;
  const list = byTestId("samples-list");
  if (!arm || round === "") { list.replaceChildren(el("p", { class: "muted", text: "no round to show yet" })); return; }
  const q = new URLSearchParams({ arm, round, filter, offset: String(offset) });
  if (filter === "disagree") q.set("other", byTestId("samples-other").value);
  const request = ++state.request;  // only the answer to the latest choice is shown
  let data;
  try {
    data = await getJSON(`ui/api/${kind === "eval" ? "eval" : "samples"}?${q}`);
  } catch (err) {
    if (err instanceof AuthError) return showSignIn("The API key is no longer accepted.");
    if (request === state.request) list.replaceChildren(el("p", { class: "bad", role: "alert", text: err.message }));
    return;
  }
  if (request !== state.request) return;
  state.offset = offset;
  const total = kind === "eval" ? data.answers_total : data.questions_total;
  const shown = kind === "eval" ? data.answers.length : data.questions.length;
  byTestId("samples-summary").textContent = `${arm} round ${round}: ${total ? `${offset + 1}–${offset + shown} of ${total}` : "nothing"} ${kind === "eval" ? "answers" : "questions"}`
    + (kind === "eval" ? "" : ` (${data.accepted_total} of ${data.samples_total} samples accepted)`);
  byTestId("eval-changes").replaceChildren(...Object.entries(kind === "eval" ? data.changes : {}).map(([d, ch]) =>
    el("p", { "data-testid": "eval-change", text: `${d}: gained ${ch.gained.length} (${ch.gained.join(", ") || "none"}), lost ${ch.lost.length} (${ch.lost.join(", ") || "none"}) against the baseline, of ${ch.n} questions` })));
  if (kind === "eval") {
    list.replaceChildren(...data.answers.map(answerCard));
  } else {
    list.replaceChildren(...data.questions.map((qq) => el("article", { class: "question", "data-testid": "sample-question" },
      el("p", {}, el("strong", { text: `${qq.problem_id}: ` }), qq.question || ""),
      el("p", { class: "muted", text: `gold ${qq.gold}${qq.solved_other === null ? "" : qq.solved_other ? " · solved in the other round" : " · not solved in the other round"}` }),
      ...qq.samples.map(sampleCard))));
  }
  byTestId("samples-prev").disabled = offset <= 0;
  byTestId("samples-next").disabled = offset + data.page_size >= total;
}

// --- side by side ----------------------------------------------------------------------------
async function loadModels() {
  const data = await getJSON("ui/api/limits");
  const maxTokens = byTestId("compare-max-tokens");
  maxTokens.max = data.max_tokens;
  if (Number(maxTokens.value) > data.max_tokens) maxTokens.value = data.max_tokens;
  const box = byTestId("compare-models");
  if (JSON.stringify(data.models) === state.models) return;  // keep the boxes (and their ticks) as they are
  state.models = JSON.stringify(data.models);
  const checked = new Set([...box.querySelectorAll("input:checked")].map((i) => i.value));
  const ids = data.models;
  const defaults = new Set(checked.size ? checked : [ids[0], ids[ids.length - 2]].filter(Boolean));
  box.replaceChildren(...ids.map((id, i) => el("label", {},
    el("input", { type: "checkbox", value: id, "data-testid": "compare-model", id: `model-${i}`, checked: defaults.has(id) }),
    id.endsWith("/round-0") ? `${id} (original)` : id)));
}

async function streamInto(model, body, target) {
  const resp = await api("v1/chat/completions", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify(Object.assign({ model, stream: true }, body)),
  });
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", text = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const events = buffer.split("\n\n");
    buffer = events.pop();
    for (const ev of events) {
      const data = ev.replace(/^data: /, "");
      if (data === "[DONE]") continue;
      const msg = JSON.parse(data);
      if (msg.error) throw new Error(msg.error.message);
      const delta = msg.choices && msg.choices[0] && msg.choices[0].delta;
      if (delta && delta.content) { text += delta.content; target.textContent = text; }
    }
  }
  return text;
}

function shuffled(items) {
  const out = items.slice();
  for (let i = out.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [out[i], out[j]] = [out[j], out[i]];
  }
  return out;
}

async function compare(event) {
  event.preventDefault();
  const models = [...byTestId("compare-models").querySelectorAll("input:checked")].map((i) => i.value);
  const error = byTestId("compare-error");
  error.textContent = "";
  byTestId("vote-status").textContent = "";
  $("#vote-box").hidden = true;
  if (models.length < 2) { error.textContent = "Choose two or more models."; return; }
  const prompt = byTestId("compare-prompt").value;
  const blind = byTestId("compare-blind").checked;
  const order = blind ? shuffled(models) : models;
  const body = { messages: [{ role: "user", content: prompt }], max_tokens: Number(byTestId("compare-max-tokens").value),
    temperature: Number(byTestId("compare-temperature").value) };
  const columns = order.map((m, i) => {
    const name = blind ? `Answer ${String.fromCharCode(65 + i)}` : m;
    const out = el("pre", { "data-testid": "compare-answer", "aria-live": "polite" });
    const heading = el("h3", { "data-testid": "compare-heading", text: name });
    return { model: m, out, heading, node: el("div", { class: "column", "data-testid": "compare-column" }, heading, out) };
  });
  byTestId("compare-columns").replaceChildren(...columns.map((c) => c.node));
  const answers = await Promise.all(columns.map((c) => streamInto(c.model, body, c.out)
    .then((t) => { c.node.dataset.done = "true"; return t; })
    .catch((err) => { c.out.textContent = `error: ${err.message}`; c.node.dataset.done = "error"; return null; })));
  if (!blind || answers.some((a) => a === null)) return;
  const cast = async (winner) => {
    const resp = await api("ui/api/votes", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ models: order, prompt, answers, winner, blind: true }) });
    await resp.json();
    columns.forEach((c) => { c.heading.textContent = `${c.heading.textContent}: ${c.model}`; });
    $("#vote-box").hidden = true;
    byTestId("vote-status").textContent = `Vote saved: ${winner ? `${winner} preferred` : "a tie"}.`;
    refreshOverview().catch(onPollError);
  };
  const buttons = columns.map((c, i) => {
    const b = el("button", { type: "button", "data-testid": "vote-button", text: `Answer ${String.fromCharCode(65 + i)} is better` });
    b.addEventListener("click", () => cast(c.model).catch((err) => { byTestId("vote-status").textContent = err.message; }));
    return b;
  });
  const tie = el("button", { type: "button", "data-testid": "vote-tie", text: "About the same" });
  tie.addEventListener("click", () => cast(null).catch((err) => { byTestId("vote-status").textContent = err.message; }));
  $("#vote-buttons").replaceChildren(...buttons, tie);
  $("#vote-box").hidden = false;
}

// --- wiring ----------------------------------------------------------------------------------
function showView(name) {
  for (const b of document.querySelectorAll("nav [data-view]")) b.setAttribute("aria-pressed", String(b.dataset.view === name));
  for (const v of ["overview", "samples", "compare"]) $(`#view-${v}`).hidden = v !== name;
}

document.addEventListener("DOMContentLoaded", () => {
  for (const b of document.querySelectorAll("nav [data-view]")) b.addEventListener("click", () => showView(b.dataset.view));
  $("#signout").addEventListener("click", () => { localStorage.removeItem(KEY_STORE); state.key = ""; showSignIn(""); });
  $("#signin-form").addEventListener("submit", (e) => { e.preventDefault(); signIn($("#signin-key").value).catch(onPollError); });
  byTestId("diversity-metric").addEventListener("change", () => state.overview && renderCharts(state.overview));
  byTestId("samples-kind").addEventListener("change", () => { fillSampleControls(); loadSamples(0); });
  for (const id of ["samples-arm", "samples-round", "samples-filter", "samples-other"]) {
    byTestId(id).addEventListener("change", () => { fillSampleControls(); loadSamples(0); });
  }
  byTestId("samples-prev").addEventListener("click", () => loadSamples(Math.max(0, state.offset - 20)));
  byTestId("samples-next").addEventListener("click", () => loadSamples(state.offset + 20));
  byTestId("tab-compare").addEventListener("click", () => loadModels().catch((err) => { byTestId("compare-error").textContent = err.message; }));
  $("#compare-form").addEventListener("submit", (e) => compare(e).catch((err) => { byTestId("compare-error").textContent = err.message; }));
  signIn(state.key).catch((err) => showSignIn(err.message));
});
