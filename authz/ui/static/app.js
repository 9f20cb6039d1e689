// The decision viewer. Reads the admin endpoint's read-only API (docs/tracing.md):
// /v1/decisions, its SSE stream, /v1/explanations/{id}, /v1/namespaces/{ns}[/suggest].
//
// Every string that came from traffic (hosts, paths, SNI, labels, principals) is
// attacker-controlled: it only ever reaches the page as a text node (el() below,
// textContent), never as markup. The server's Content-Security-Policy forbids
// inline script and style as a second wall.

const FILTERS = ["namespace", "workload", "host", "verdict", "reason"];
const LIST_LIMIT = 200; // decisions fetched when the table (re)loads
const MAX_ROWS = 500; // rows kept in the table; the oldest go first
const RETRY_MAX_MS = 10000;

const $ = (selector) => document.querySelector(selector);

// An element with text children: strings become text nodes, never HTML.
function el(tag, className, ...children) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

const state = {
  view: "decisions",
  filters: {},
  decision: null, // id shown in the detail panel
  ns: "",
  since: "1h",
  paused: false,
};
let decisions = []; // newest first, at most MAX_ROWS
let source = null; // the EventSource
let retryMs = 1000;
let retryTimer = null;
let nsTimer = null;

// ---------------------------------------------------------------- the URL

function readUrl() {
  const q = new URLSearchParams(location.search);
  state.view = q.get("view") === "namespace" ? "namespace" : "decisions";
  state.filters = {};
  for (const key of FILTERS) {
    const value = q.get(key);
    if (value) state.filters[key] = value;
  }
  state.decision = q.get("decision") || null;
  state.ns = q.get("ns") || "";
  state.since = q.get("since") || "1h";
}

function writeUrl(push) {
  const q = new URLSearchParams();
  if (state.view === "namespace") {
    q.set("view", "namespace");
    if (state.ns) q.set("ns", state.ns);
    if (state.since !== "1h") q.set("since", state.since);
  } else {
    for (const key of FILTERS) if (state.filters[key]) q.set(key, state.filters[key]);
  }
  if (state.decision) q.set("decision", state.decision);
  const url = q.toString() ? `?${q}` : location.pathname;
  if (push) history.pushState(null, "", url);
  else history.replaceState(null, "", url);
}

function apiQuery(extra) {
  const q = new URLSearchParams();
  for (const key of FILTERS) if (state.filters[key]) q.set(key, state.filters[key]);
  for (const [k, v] of Object.entries(extra || {})) q.set(k, v);
  return q.toString();
}

// ---------------------------------------------------------------- plumbing

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function getJson(path) {
  const resp = await fetch(path, { headers: { Accept: "application/json" }, cache: "no-store" });
  let body = null;
  try {
    body = await resp.json();
  } catch {
    body = null;
  }
  if (!resp.ok) {
    throw new ApiError(resp.status, (body && body.error) || `${path} answered ${resp.status}`);
  }
  return body;
}

function showError(message) {
  const box = $("#error");
  box.textContent = message || "";
  box.hidden = !message;
}

function setStatus(kind, text) {
  const status = $("#status");
  status.dataset.state = kind;
  status.textContent = text;
}

// ---------------------------------------------------------------- the table

function timeOf(d) {
  const t = String(d.time || "");
  return t.length >= 23 ? t.slice(11, 23) : t;
}

function latencyOf(d) {
  const us = d.latency_us;
  if (us === null || us === undefined) return "-";
  return us >= 1000 ? `${(us / 1000).toFixed(1)}ms` : `${Math.round(us)}µs`;
}

function destinationCell(d) {
  const cell = el("td", "dest");
  if (d.host) cell.append(el("span", "host", d.host));
  else {
    const asked = d.sni || d.http_host;
    cell.append(el("span", "host", asked ? `${asked} (not evaluated)` : "-"));
  }
  if (d.method || d.path) cell.append(el("span", "sub", `${d.method || "?"} ${d.path || ""}`));
  return cell;
}

function row(d) {
  const tr = el("tr");
  tr.dataset.id = d.decision_id;
  tr.dataset.verdict = d.verdict;
  const workload = el("td", "workload", d.workload || "-");
  if (d.pod) workload.append(el("span", "sub", d.pod));
  const rule = d.rule ? (d.verdict === "allow" ? d.rule : `nearest: ${d.rule}`) : "-";
  const idButton = el("button", "id", d.decision_id);
  idButton.type = "button";
  idButton.title = "Explain this decision";
  tr.append(
    el("td", "time", timeOf(d)),
    workload,
    destinationCell(d),
    el("td", "port", d.port ?? "-"),
    el("td", "protocol", d.protocol || "-"),
    el("td", `verdict verdict-${d.verdict}`, d.verdict),
    el("td", "reason", d.reason),
    el("td", "rule", rule),
    el("td", "latency", latencyOf(d)),
    el("td", "decision", idButton),
  );
  tr.querySelector("td.time").title = String(d.time || "");
  if (d.decision_id === state.decision) tr.classList.add("selected");
  return tr;
}

function newerFirst(a, b) {
  if (a.time === b.time) return a.decision_id < b.decision_id ? 1 : -1;
  return a.time < b.time ? 1 : -1;
}

function renderTable() {
  const body = $("#decisions tbody");
  body.replaceChildren(...decisions.map(row));
  updateSummary();
}

function updateSummary(extra) {
  const filtered = FILTERS.filter((k) => state.filters[k]).length;
  const text = `${decisions.length} decision(s) shown` + (filtered ? ", filtered" : "");
  $("#summary").textContent = extra ? `${text}; ${extra}` : text;
}

// Merge a fetched list into what the stream already brought (ids are unique).
function merge(found) {
  const known = new Set(decisions.map((d) => d.decision_id));
  const added = found.filter((d) => !known.has(d.decision_id));
  decisions = decisions.concat(added).sort(newerFirst).slice(0, MAX_ROWS);
}

function addLive(d) {
  if (state.paused || decisions.some((x) => x.decision_id === d.decision_id)) return;
  decisions.unshift(d);
  const body = $("#decisions tbody");
  body.prepend(row(d));
  if (decisions.length > MAX_ROWS) {
    decisions.length = MAX_ROWS;
    body.lastElementChild.remove();
  }
  updateSummary();
}

async function loadDecisions(replace) {
  const body = await getJson(`/v1/decisions?${apiQuery({ limit: LIST_LIMIT })}`);
  if (replace) decisions = [];
  merge(body.decisions || []);
  renderTable();
  updateSummary(`buffer holds ${body.buffered} of ${body.capacity}`);
}

// ---------------------------------------------------------------- the stream

function disconnect() {
  if (source) {
    source.close();
    source = null;
  }
  clearTimeout(retryTimer);
  retryTimer = null;
}

// The stream is opened first and the list fetched once it is open, so nothing
// recorded in between is missed; the same on every reconnect, which fills the
// gap left while the stream was down.
function connect() {
  disconnect();
  if (state.paused || state.view !== "decisions") return;
  setStatus("connecting", "connecting…");
  const es = new EventSource(`/v1/decisions/stream?${apiQuery()}`);
  source = es;
  es.addEventListener("open", () => {
    if (source !== es) return;
    retryMs = 1000;
    loadDecisions(false)
      .then(() => {
        if (source === es) {
          setStatus("live", "live");
          showError("");
        }
      })
      .catch((e) => showError(e.message));
  });
  es.addEventListener("decision", (ev) => {
    if (source !== es) return;
    try {
      addLive(JSON.parse(ev.data));
    } catch {
      /* a record that is not JSON: skip it */
    }
  });
  es.addEventListener("error", () => {
    if (source !== es) return;
    // Our own retry (not the browser's): it works the same for a refused
    // connection, a 4xx/5xx and a dropped stream, and backs off.
    es.close();
    source = null;
    setStatus("reconnecting", "stream interrupted, reconnecting…");
    getJson(`/v1/decisions?${apiQuery({ limit: 1 })}`)
      .then(() => scheduleReconnect())
      .catch((e) => {
        if (e instanceof ApiError && e.status === 400) {
          setStatus("error", "bad filter");
          showError(e.message); // a filter the server refuses: wait for a new one
        } else {
          scheduleReconnect();
        }
      });
  });
}

function scheduleReconnect() {
  clearTimeout(retryTimer);
  retryTimer = setTimeout(connect, retryMs);
  retryMs = Math.min(retryMs * 2, RETRY_MAX_MS);
}

function setPaused(paused) {
  state.paused = paused;
  const button = $("#pause");
  button.setAttribute("aria-pressed", String(paused));
  button.textContent = paused ? "Resume" : "Pause";
  if (paused) {
    disconnect();
    setStatus("paused", "paused");
  } else {
    connect();
  }
}

// ---------------------------------------------------------------- filters

async function loadReasons() {
  const select = $("#filters select[name=reason]");
  try {
    const body = await getJson("/v1/reasons");
    for (const reason of body.reasons || []) {
      const option = el("option", null, reason);
      option.value = reason;
      select.append(option);
    }
  } catch {
    /* the select keeps "any"; filtering by a typed URL still works */
  }
  select.value = state.filters.reason || "";
}

function fillFilterForm() {
  const form = $("#filters");
  for (const key of FILTERS) form.elements[key].value = state.filters[key] || "";
}

function applyFilters(event) {
  if (event) event.preventDefault();
  const form = $("#filters");
  state.filters = {};
  for (const key of FILTERS) {
    const value = form.elements[key].value.trim();
    if (value) state.filters[key] = value;
  }
  writeUrl(true);
  decisions = [];
  renderTable();
  showError("");
  connect();
}

// ---------------------------------------------------------------- one decision

function fields(list) {
  const dl = el("dl");
  for (const f of list) dl.append(el("dt", null, f.label), el("dd", null, f.value ?? "-"));
  return dl;
}

function renderExplanation(body) {
  const e = body.explanation;
  const out = [];
  const head = el(
    "p",
    "headline",
    el("span", `verdict verdict-${e.verdict}`, e.verdict.toUpperCase()),
    " ",
    el("span", "reason-code", e.reason),
    ` at ${e.time}, policy revision ${e.revision}, mode ${e.mode}, answered in ${e.latency}`,
  );
  out.push(head);
  if (e.message) out.push(el("p", "message", e.message));
  out.push(el("h3", null, "Identity, as seen at the gateway"), fields(e.identity));
  out.push(el("h3", null, "Destination, as seen"), fields(e.destination));
  if (e.rules.length) {
    const list = el("ul", "rules");
    for (const c of e.rules) {
      list.append(
        el(
          "li",
          null,
          el("span", c.matched ? "mark applies" : "mark no", c.matched ? "applies" : "no"),
          el("span", "mono", c.rule),
          `: ${c.why}`,
          c.owner ? el("span", "sub", `owner: ${c.owner}`) : null,
        ),
      );
    }
    out.push(el("h3", null, "Rules considered"), list);
  } else if (e.allowed_by) {
    const owner = e.allowed_by.owner ? ` (owner: ${e.allowed_by.owner})` : "";
    out.push(el("p", null, `Allowed by rule ${e.allowed_by.rule}${owner}.`));
  }
  if (e.fix.length) {
    const fix = el("div", "fix");
    for (const item of e.fix) {
      if (item.kind === "command") fix.append(el("pre", "command", item.text));
      else if (item.kind === "code") fix.append(el("pre", "code", item.text));
      else fix.append(el("p", null, item.text));
    }
    out.push(el("h3", null, "What to change"), fix);
  }
  const asText = el("details", "as-text", el("summary", null, "As `egress-authz explain` prints it"));
  asText.append(el("pre", null, body.text));
  out.push(asText);
  return out;
}

async function showDetail() {
  const panel = $("#detail");
  for (const tr of document.querySelectorAll("#decisions tbody tr.selected")) {
    tr.classList.remove("selected");
  }
  if (!state.decision) {
    panel.hidden = true;
    return;
  }
  const id = state.decision;
  panel.hidden = false;
  $("#detail-title").textContent = `Decision ${id}`;
  $("#detail-body").replaceChildren(el("p", "muted", "loading…"));
  for (const tr of document.querySelectorAll("#decisions tbody tr")) {
    if (tr.dataset.id === id) tr.classList.add("selected");
  }
  try {
    const body = await getJson(`/v1/explanations/${encodeURIComponent(id)}`);
    if (state.decision === id) $("#detail-body").replaceChildren(...renderExplanation(body));
  } catch (e) {
    if (state.decision === id) $("#detail-body").replaceChildren(el("p", "error", e.message));
  }
}

function openDecision(id) {
  state.decision = id;
  writeUrl(true);
  showDetail();
}

function closeDetail() {
  state.decision = null;
  writeUrl(true);
  showDetail();
}

// ---------------------------------------------------------------- a namespace

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function chart(series) {
  const W = 600, H = 140, top = 10, bottom = 24, left = 30;
  const counts = series.counts;
  const max = Math.max(1, ...counts.map((c) => c.allow + c.deny + c.audit));
  const plotH = H - top - bottom;
  const step = (W - left) / counts.length;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
  root.append(svg("title", {}, "Decisions per verdict over time"));
  root.append(svg("line", { class: "axis", x1: left, y1: H - bottom, x2: W, y2: H - bottom }));
  root.append(svg("text", { x: 0, y: top + 8 }, String(max)));
  root.append(svg("text", { x: 0, y: H - bottom }, "0"));
  counts.forEach((c, i) => {
    let y = H - bottom;
    const start = new Date(series.start_unix_ms + i * series.bucket_seconds * 1000);
    for (const verdict of ["allow", "audit", "deny"]) {
      const n = c[verdict];
      if (!n) continue;
      const h = (n / max) * plotH;
      y -= h;
      const bar = svg("rect", {
        class: `bar-${verdict}`,
        x: left + i * step + 1,
        y: y,
        width: Math.max(1, step - 2),
        height: h,
      });
      bar.append(svg("title", {}, `${start.toISOString().slice(11, 19)} ${verdict}: ${n}`));
      root.append(bar);
    }
  });
  const first = new Date(series.start_unix_ms);
  const last = new Date(series.start_unix_ms + counts.length * series.bucket_seconds * 1000);
  root.append(svg("text", { x: left, y: H - 6 }, first.toISOString().slice(11, 16)));
  root.append(svg("text", { x: W - 30, y: H - 6 }, last.toISOString().slice(11, 16)));
  ["allow", "audit", "deny"].forEach((verdict, i) => {
    root.append(svg("rect", { class: `legend-${verdict}`, x: W - 190 + i * 62, y: 0, width: 10, height: 10 }));
    root.append(svg("text", { x: W - 176 + i * 62, y: 9 }, verdict));
  });
  return root;
}

function groupRow(ns, g) {
  const dest = g.port ? `${g.host || "-"}:${g.port}` : g.host || "-";
  const reasons = Object.entries(g.reasons).map(([r, n]) => `${r} ×${n}`).join(", ");
  const last = new Date(g.last_time_unix_ms).toISOString().slice(11, 23);
  const explain = el("button", "id", "explain last");
  explain.type = "button";
  explain.dataset.id = g.last_decision_id;
  const link = el("a", null, "in table");
  const q = new URLSearchParams({ namespace: ns });
  if (g.workload) q.set("workload", g.workload);
  if (g.host) q.set("host", g.host);
  link.href = `?${q}`;
  return el(
    "tr",
    null,
    el("td", null, g.workload || "-"),
    el("td", "dest", dest),
    el("td", null, g.protocol || "-"),
    el("td", "verdict-deny", g.verdicts.deny || 0),
    el("td", "verdict-audit", g.verdicts.audit || 0),
    el("td", "reason", reasons),
    el("td", null, last),
    el("td", null, explain, " ", link),
  );
}

async function loadNamespace() {
  clearTimeout(nsTimer);
  const form = $("#ns-form");
  form.elements.namespace.value = state.ns;
  form.elements.since.value = state.since;
  try {
    const list = await getJson("/v1/namespaces");
    const options = (list.namespaces || []).map((ns) => {
      const option = el("option");
      option.value = ns;
      return option;
    });
    $("#namespaces").replaceChildren(...options);
    if (!state.ns && list.namespaces && list.namespaces.length) {
      state.ns = list.namespaces[0];
      form.elements.namespace.value = state.ns;
      writeUrl(false);
    }
  } catch (e) {
    showError(e.message);
  }
  if (!state.ns) {
    $("#ns-body").hidden = true;
    return;
  }
  const ns = encodeURIComponent(state.ns);
  const since = encodeURIComponent(state.since);
  try {
    const [summary, suggestion] = await Promise.all([
      getJson(`/v1/namespaces/${ns}?since=${since}`),
      getJson(`/v1/namespaces/${ns}/suggest?since=${since}`),
    ]);
    showError("");
    $("#ns-body").hidden = false;
    const t = summary.totals;
    $("#ns-totals").textContent =
      `${state.ns}, last ${state.since}: ${t.allow} allow, ${t.deny} deny, ${t.audit} audit`;
    $("#ns-chart").replaceChildren(chart(summary.series));
    $("#ns-groups tbody").replaceChildren(...summary.groups.map((g) => groupRow(state.ns, g)));
    const leftOut = $("#ns-left-out");
    leftOut.hidden = !summary.groups_left_out;
    leftOut.textContent = `${summary.groups_left_out} more group(s) not shown.`;
    const pre = $("#ns-policy");
    if (suggestion.policy) {
      pre.textContent = suggestion.policy;
      $("#ns-suggest-note").textContent =
        `From ${suggestion.decisions} deny/audit decision(s), as \`${suggestion.command}\` ` +
        "prints it. Review it before applying.";
      $("#copy-policy").disabled = false;
    } else {
      pre.textContent = "";
      $("#ns-suggest-note").textContent = "No deny or audit decisions recorded: nothing to suggest.";
      $("#copy-policy").disabled = true;
    }
  } catch (e) {
    showError(e.message);
  }
  nsTimer = setTimeout(() => {
    if (state.view === "namespace" && !state.paused) loadNamespace();
  }, 15000);
}

async function copyPolicy() {
  const text = $("#ns-policy").textContent;
  const status = $("#copy-status");
  try {
    await navigator.clipboard.writeText(text);
    status.textContent = "copied";
  } catch {
    // No clipboard permission (plain http on a remote name): select it instead.
    const range = document.createRange();
    range.selectNodeContents($("#ns-policy"));
    const selection = getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    status.textContent = "selected: press Ctrl+C to copy";
  }
}

// ---------------------------------------------------------------- views

function render() {
  const namespace = state.view === "namespace";
  $("#decisions-view").hidden = namespace;
  $("#namespace-view").hidden = !namespace;
  for (const [id, on] of [["#nav-decisions", !namespace], ["#nav-namespace", namespace]]) {
    if (on) $(id).setAttribute("aria-current", "page");
    else $(id).removeAttribute("aria-current");
  }
  if (namespace) {
    disconnect();
    if (!state.paused) setStatus("idle", "namespace view");
    loadNamespace();
  } else {
    clearTimeout(nsTimer);
    fillFilterForm();
    if (state.paused) renderTable();
    else connect();
  }
  showDetail();
}

function navigate(event, view) {
  event.preventDefault();
  state.view = view;
  state.decision = null;
  writeUrl(true);
  render();
}

function start() {
  readUrl();
  $("#filters").addEventListener("submit", applyFilters);
  $("#filters select[name=verdict]").addEventListener("change", applyFilters);
  $("#filters select[name=reason]").addEventListener("change", applyFilters);
  $("#clear").addEventListener("click", () => {
    for (const key of FILTERS) $("#filters").elements[key].value = "";
    applyFilters();
  });
  $("#pause").addEventListener("click", () => setPaused(!state.paused));
  $("#decisions tbody").addEventListener("click", (event) => {
    const tr = event.target.closest("tr");
    if (tr && tr.dataset.id) openDecision(tr.dataset.id);
  });
  $("#ns-groups tbody").addEventListener("click", (event) => {
    const button = event.target.closest("button[data-id]");
    if (button) openDecision(button.dataset.id);
  });
  $("#detail-close").addEventListener("click", closeDetail);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && state.decision) closeDetail();
  });
  $("#ns-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = $("#ns-form");
    state.ns = form.elements.namespace.value.trim();
    state.since = form.elements.since.value;
    writeUrl(true);
    loadNamespace();
  });
  $("#copy-policy").addEventListener("click", copyPolicy);
  $("#nav-decisions").addEventListener("click", (e) => navigate(e, "decisions"));
  $("#nav-namespace").addEventListener("click", (e) => navigate(e, "namespace"));
  window.addEventListener("popstate", () => {
    readUrl();
    decisions = [];
    render();
  });
  loadReasons();
  render();
}

start();
