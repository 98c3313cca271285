// GreyFox console: plain JavaScript over the JSON API, charts drawn as SVG.
// No build step, no third-party code. Polls the API (see README: why polling).
"use strict";

const $ = (sel) => document.querySelector(sel);
const TOKEN_KEY = "greyfox-admin-token";
const PALETTE = ["#d9531e", "#3182ce", "#38a169", "#805ad5", "#d69e2e", "#e53e3e", "#319795", "#718096"];
const state = { sortKey: "total_tokens", sortAsc: false, rows: [], newestId: 0, oldestId: null, unauthorized: false };

// -- formatting --
const fmtInt = (n) => (n == null ? "–" : Number(n).toLocaleString("en-US"));
const fmtUsd = (x) => (x == null ? "n/a" : "$" + (x >= 1 ? x.toFixed(2) : x >= 0.01 ? x.toFixed(4) : x.toPrecision(3)));
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

function toast(text) {
  const t = $("#toast");
  t.textContent = text;
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (t.hidden = true), 2500);
}

// -- the API, with the admin token when one is set --
class Unauthorized extends Error {}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers["Authorization"] = "Bearer " + token;
  if (options.body) headers["Content-Type"] = "application/json";
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) {
    askForToken(token ? "That token was refused (401). Check GREYFOX_ADMIN_TOKEN." : "");
    throw new Unauthorized();
  }
  const doc = await response.json();
  if (!response.ok) throw new Error((doc.error && doc.error.message) || response.statusText);
  return doc;
}

function askForToken(message) {
  state.unauthorized = true;
  $("#login-error").textContent = message;
  const dialog = $("#login");
  if (!dialog.open) dialog.showModal();
}

$("#login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("#login-token").value.trim());
  $("#login").close();
  state.unauthorized = false;
  $("#logout").hidden = false;
  refreshAll();
});
$("#logout").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  location.reload();
});

// -- overview --
async function loadOverview() {
  const [usage, quotas, cache, recent] = await Promise.all([
    api("/api/usage?group=upstream"),
    api("/api/quotas"),
    api("/api/cache"),
    api("/api/requests?limit=500"),
  ]);
  const sum = (k) => usage.rows.reduce((a, r) => a + (r[k] || 0), 0);
  $("#ov-tokens").textContent = fmtInt(sum("total_tokens"));
  $("#ov-requests").textContent = `${fmtInt(sum("requests"))} requests, ${fmtInt(sum("cache_hits"))} from cache`;
  const spent = sum("cost_usd");
  $("#ov-cost").textContent = fmtUsd(spent);
  const g = quotas.global;
  const bar = $("#ov-budget-bar span");
  if (g.daily_budget_usd) {
    const used = Math.min(100, ((g.spent_usd + g.reserved_usd) / g.daily_budget_usd) * 100);
    bar.style.width = used + "%";
    $("#ov-budget-bar").classList.toggle("over", used >= 100);
    $("#ov-budget").textContent = `of ${fmtUsd(g.daily_budget_usd)} daily budget`;
  } else {
    bar.style.width = "0";
    $("#ov-budget").textContent = "no daily budget set";
  }
  $("#ov-hitrate").textContent = cache.hit_rate == null ? "–" : (cache.hit_rate * 100).toFixed(1) + "% hits";
  $("#ov-saved").textContent = `${fmtUsd(cache.saved_usd)} and ${fmtInt(cache.saved_tokens)} tokens saved`;
  const minuteAgo = Date.now() - 60000;
  $("#ov-rpm").textContent = fmtInt(recent.requests.filter((r) => Date.parse(r.time) >= minuteAgo).length);
  renderQuotas(quotas);
  renderCache(cache);
}

// -- usage chart and table --
function usageQuery() {
  const group = $("#u-group").value;
  const params = new URLSearchParams({ group });
  // Empty dates: the server's today, in GREYFOX_TZ.
  if ($("#u-from").value) params.set("from", $("#u-from").value);
  if ($("#u-to").value) params.set("to", $("#u-to").value);
  if (group === "hour" && $("#u-from").value) params.set("to", $("#u-from").value);
  const split = $("#u-split").value;
  if (split && split !== group) params.set("split", split);
  return params;
}

async function loadUsage() {
  const doc = await api("/api/usage?" + usageQuery());
  if (!$("#u-from").value) $("#u-from").value = doc.from;
  if (!$("#u-to").value) $("#u-to").value = doc.to;
  const split = doc.split;
  // Table: one row per key (splits summed), sortable.
  const byKey = new Map();
  for (const r of doc.rows) {
    const key = r.key ?? "(none)";
    const t = byKey.get(key) || { key, requests: 0, prompt_tokens: 0, completion_tokens: 0, total_tokens: 0, cost_usd: 0, cache_hits: 0, saved_usd: 0, unpriced_requests: 0 };
    for (const k of Object.keys(t)) if (k !== "key") t[k] += r[k] || 0;
    byKey.set(key, t);
  }
  state.rows = [...byKey.values()];
  renderUsageTable();
  drawChart(doc.rows, split, $("#u-metric").value);
}

function renderUsageTable() {
  const rows = [...state.rows].sort((a, b) => {
    const x = a[state.sortKey], y = b[state.sortKey];
    const c = typeof x === "string" ? x.localeCompare(y) : x - y;
    return state.sortAsc ? c : -c;
  });
  const body = rows.map((r) => `<tr><td>${esc(r.key)}</td><td class="num">${fmtInt(r.requests)}</td>
    <td class="num">${fmtInt(r.prompt_tokens)}</td><td class="num">${fmtInt(r.completion_tokens)}</td>
    <td class="num">${fmtInt(r.total_tokens)}</td>
    <td class="num">${fmtUsd(r.cost_usd)}${r.unpriced_requests ? ` <span class="tag err" title="no price for ${r.unpriced_requests} request(s)">+unpriced</span>` : ""}</td>
    <td class="num">${fmtInt(r.cache_hits)}</td><td class="num">${fmtUsd(r.saved_usd)}</td></tr>`).join("");
  $("#usage-table tbody").innerHTML = body || `<tr><td colspan="8" class="empty">No requests in this range yet.</td></tr>`;
  const total = (k) => state.rows.reduce((a, r) => a + (r[k] || 0), 0);
  $("#t-requests").textContent = fmtInt(total("requests"));
  $("#t-prompt").textContent = fmtInt(total("prompt_tokens"));
  $("#t-completion").textContent = fmtInt(total("completion_tokens"));
  $("#t-tokens").textContent = fmtInt(total("total_tokens"));
  $("#t-cost").textContent = fmtUsd(total("cost_usd"));
  $("#t-hits").textContent = fmtInt(total("cache_hits"));
  $("#t-saved").textContent = fmtUsd(total("saved_usd"));
  document.querySelectorAll("#usage-table th").forEach((th) => {
    th.classList.toggle("sorted", th.dataset.key === state.sortKey);
    th.classList.toggle("asc", th.dataset.key === state.sortKey && state.sortAsc);
  });
}

document.querySelectorAll("#usage-table th").forEach((th) =>
  th.addEventListener("click", () => {
    if (state.sortKey === th.dataset.key) state.sortAsc = !state.sortAsc;
    else { state.sortKey = th.dataset.key; state.sortAsc = th.dataset.key === "key"; }
    renderUsageTable();
  }));

function drawChart(rows, split, metric) {
  const keys = [...new Set(rows.map((r) => r.key ?? "(none)"))];
  const series = split ? [...new Set(rows.map((r) => r.split ?? "(none)"))] : [metric === "cost_usd" ? "dollars" : "tokens"];
  const value = (key, s) => rows.filter((r) => (r.key ?? "(none)") === key && (!split || (r.split ?? "(none)") === s))
    .reduce((a, r) => a + (r[metric] || 0), 0);
  const stacks = keys.map((k) => series.map((s) => value(k, s)));
  const max = Math.max(0, ...stacks.map((st) => st.reduce((a, b) => a + b, 0)));
  const W = 1000, H = 240, left = 64, bottom = 28, top = 10;
  const plotH = H - bottom - top;
  const slot = keys.length ? (W - left - 10) / keys.length : 0;
  const barW = Math.max(2, Math.min(60, slot * 0.7));
  let svg = `<svg viewBox="0 0 ${W} ${H}" preserveAspectRatio="none" xmlns="http://www.w3.org/2000/svg">`;
  for (let i = 0; i <= 4; i++) {
    const y = top + plotH - (plotH * i) / 4;
    const label = metric === "cost_usd" ? fmtUsd((max * i) / 4) : fmtInt(Math.round((max * i) / 4));
    svg += `<line x1="${left}" x2="${W}" y1="${y}" y2="${y}" stroke="#e3e6eb"/><text x="${left - 6}" y="${y + 4}" text-anchor="end">${esc(label)}</text>`;
  }
  keys.forEach((k, i) => {
    let y = top + plotH;
    const x = left + i * slot + (slot - barW) / 2;
    stacks[i].forEach((v, j) => {
      const h = max ? (v / max) * plotH : 0;
      y -= h;
      svg += `<rect x="${x}" y="${y}" width="${barW}" height="${h}" fill="${PALETTE[j % PALETTE.length]}"><title>${esc(k)} ${esc(series[j])}: ${esc(metric === "cost_usd" ? fmtUsd(v) : fmtInt(v))}</title></rect>`;
    });
    if (keys.length <= 24 || i % Math.ceil(keys.length / 24) === 0) {
      svg += `<text x="${x + barW / 2}" y="${H - 8}" text-anchor="middle">${esc(String(k).slice(-10))}</text>`;
    }
  });
  if (!keys.length) svg += `<text x="${W / 2}" y="${H / 2}" text-anchor="middle">no data in this range</text>`;
  $("#chart").innerHTML = svg + "</svg>";
  $("#legend").innerHTML = series.map((s, j) => `<span><i style="background:${PALETTE[j % PALETTE.length]}"></i>${esc(s)}</span>`).join("");
}

["#u-from", "#u-to", "#u-group", "#u-split", "#u-metric"].forEach((sel) =>
  $(sel).addEventListener("change", () => loadUsage().catch(report)));

// -- quotas --
function renderQuotas(doc) {
  const g = doc.global;
  $("#quota-global").textContent = `Global: ${fmtUsd(g.spent_usd)} spent today` +
    (g.daily_budget_usd ? ` of ${fmtUsd(g.daily_budget_usd)} (${fmtUsd(g.reserved_usd)} reserved)` : ", no budget") +
    `; resets ${new Date(g.resets_at).toLocaleString()}.`;
  if (document.activeElement !== $("#budget-input")) $("#budget-input").value = g.daily_budget_usd ?? "";
  const rows = doc.users.map((u) => {
    const limit = u.daily_tokens;
    const pct = (n) => (limit ? Math.min(100, (n / limit) * 100) : 0);
    const bar = limit ? `<div class="bar${u.remaining === 0 ? " over" : ""}" title="used ${u.used}, reserved ${u.reserved} of ${limit}">
        <span style="width:${pct(u.used)}%"></span><span class="reserved" style="width:${pct(u.reserved)}%"></span></div>` : `<span class="muted">unlimited</span>`;
    const breaker = u.breaker_until ? ` <span class="tag err" title="runaway-loop breaker open until ${esc(u.breaker_until)}">loop breaker</span>
        <button class="link" data-reset="${esc(u.user)}">reset</button>` : "";
    const field = (name) => `<input type="number" min="0" name="${name}" value="${u.overrides[name] ?? ""}" placeholder="${esc(doc.defaults[name] ?? "∞")}">`;
    return `<tr data-user="${esc(u.user)}"><td>${esc(u.user)}${breaker}</td><td>${bar}</td>
      <td class="num">${fmtInt(u.used)}</td><td class="num">${fmtInt(u.reserved)}</td><td class="num">${u.remaining == null ? "∞" : fmtInt(u.remaining)}</td>
      <td class="inline-edit">${field("daily_tokens")}</td><td class="inline-edit">${field("rpm")}</td><td class="inline-edit">${field("tpm")}</td>
      <td><button data-save="${esc(u.user)}">save</button></td></tr>`;
  }).join("");
  const tbody = $("#quota-table tbody");
  if (!tbody.contains(document.activeElement)) {
    tbody.innerHTML = rows || `<tr><td colspan="9" class="empty">No user has sent a request today.</td></tr>`;
  }
}

async function saveUser(user, values) {
  await api("/api/quotas/" + encodeURIComponent(user), { method: "PUT", body: JSON.stringify(values) });
  toast(`Limits of ${user} saved`);
  await loadOverview();
}

$("#quota-table").addEventListener("click", async (event) => {
  const save = event.target.dataset.save, reset = event.target.dataset.reset;
  try {
    if (save) {
      const row = event.target.closest("tr");
      const values = {};
      for (const name of ["daily_tokens", "rpm", "tpm"]) {
        const v = row.querySelector(`input[name=${name}]`).value.trim();
        values[name] = v === "" ? null : Number(v);
      }
      await saveUser(save, values);
    } else if (reset) {
      await api(`/api/quotas/${encodeURIComponent(reset)}/breaker`, { method: "DELETE" });
      toast(`Breaker of ${reset} reset`);
      await loadOverview();
    }
  } catch (e) { report(e); }
});

$("#quota-add").addEventListener("submit", (event) => {
  event.preventDefault();
  const v = $("#qa-daily").value.trim();
  saveUser($("#qa-user").value.trim(), { daily_tokens: v === "" ? null : Number(v) }).catch(report);
});

$("#budget-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const v = $("#budget-input").value.trim();
  api("/api/quotas", { method: "PUT", body: JSON.stringify({ daily_budget_usd: v === "" ? null : Number(v) }) })
    .then(() => { toast("Budget saved"); return loadOverview(); }).catch(report);
});

// -- live requests --
function liveQuery(extra) {
  const params = new URLSearchParams({ limit: "50" });
  for (const [id, name] of [["#f-user", "user"], ["#f-model", "model"], ["#f-cache", "cache"], ["#f-status", "status"]]) {
    const v = $(id).value.trim();
    if (v) params.set(name, v);
  }
  for (const [k, v] of Object.entries(extra || {})) params.set(k, v);
  return params;
}

function requestRow(r, fresh) {
  const status = r.status >= 400 ? `<span class="tag err">${r.status}</span>` : r.status;
  return `<tr data-row='${esc(JSON.stringify(r))}' class="${fresh ? "fresh" : ""}"><td>${r.id}</td>
    <td>${esc(new Date(r.time).toLocaleTimeString())}</td><td>${esc(r.user)}</td><td>${esc(r.model)}</td>
    <td>${esc(r.endpoint)}${r.stream ? " ⇶" : ""}</td><td>${status}</td><td><span class="tag ${esc(r.cache)}">${esc(r.cache)}</span></td>
    <td class="num">${fmtInt(r.total_tokens)}</td><td class="num">${r.cost_known ? fmtUsd(r.cost_usd) : '<span class="tag err">unpriced</span>'}</td>
    <td class="num">${r.latency_ms == null ? "" : Math.round(r.latency_ms) + " ms"}</td><td>${esc(r.usage_source)}</td></tr>`;
}

async function loadInflight() {
  const doc = await api("/api/inflight");
  $("#inflight-table tbody").innerHTML = doc.requests.map((r) => `<tr><td>${r.id}</td>
    <td>${esc(new Date(r.started).toLocaleTimeString())}</td><td>${esc(r.user)}</td><td>${esc(r.model)}</td>
    <td>${esc(r.endpoint)}</td><td><span class="tag ${esc(r.cache)}">${esc(r.cache)}</span></td>
    <td class="num">${fmtInt(r.tokens)}</td><td class="num">${fmtInt(Math.round(r.tokens_per_s))}</td></tr>`).join("") ||
    `<tr><td colspan="8" class="empty">Nothing in flight.</td></tr>`;
}

async function loadLive(reset) {
  const doc = await api("/api/requests?" + liveQuery());
  const tbody = $("#live-table tbody");
  const newest = doc.requests.length ? doc.requests[0].id : 0;
  if (reset || !state.newestId) {
    tbody.innerHTML = doc.requests.map((r) => requestRow(r, false)).join("") ||
      `<tr><td colspan="11" class="empty">No requests yet: point a client at /v1.</td></tr>`;
    state.oldestId = doc.next;
  } else if (newest > state.newestId) {
    const fresh = doc.requests.filter((r) => r.id > state.newestId);
    if (tbody.querySelector(".empty")) tbody.innerHTML = "";
    tbody.insertAdjacentHTML("afterbegin", fresh.map((r) => requestRow(r, true)).join(""));
  }
  state.newestId = Math.max(state.newestId, newest);
  $("#live-more").hidden = state.oldestId == null;
}

$("#live-more").addEventListener("click", async () => {
  const doc = await api("/api/requests?" + liveQuery({ before: state.oldestId })).catch(report);
  if (!doc) return;
  $("#live-table tbody").insertAdjacentHTML("beforeend", doc.requests.map((r) => requestRow(r, false)).join(""));
  state.oldestId = doc.next;
  $("#live-more").hidden = doc.next == null;
});

["#f-user", "#f-model", "#f-cache", "#f-status"].forEach((sel) =>
  $(sel).addEventListener("change", () => { state.newestId = 0; loadLive(true).catch(report); }));

// "prompt 9,000 (4,000 cached, 2,000 cache write) + completion 800 (500 reasoning); $0.0123 from table"
function tokenDetails(r) {
  const parts = (pairs) => pairs.filter(([n]) => n).map(([n, what]) => `${fmtInt(n)} ${what}`).join(", ");
  const prompt = parts([[r.cached_tokens, "cached"], [r.cache_write_tokens, "cache write"]]);
  const completion = parts([[r.reasoning_tokens, "reasoning"]]);
  const cost = r.cost_usd == null ? "no known price" : `${fmtUsd(r.cost_usd)} from ${r.cost_source || "nothing"}`;
  return `prompt ${fmtInt(r.prompt_tokens)}${prompt ? ` (${prompt})` : ""} + completion ` +
    `${fmtInt(r.completion_tokens)}${completion ? ` (${completion})` : ""}; ${cost}`;
}

$("#live-table").addEventListener("click", (event) => {
  const tr = event.target.closest("tr[data-row]");
  if (!tr) return;
  const row = JSON.parse(tr.dataset.row);
  $("#d-id").textContent = "#" + row.id;
  $("#d-tokens").textContent = tokenDetails(row);
  $("#d-body").textContent = JSON.stringify(row, null, 2);
  $("#details").showModal();
});

// -- cache --
function renderCache(c) {
  $("#cache-stats").textContent = `${fmtInt(c.entries)} entries, ${(c.bytes / 1048576).toFixed(2)} MB stored; ` +
    `${fmtInt(c.hits)} hits, ${fmtInt(c.misses)} misses` + (c.hit_rate == null ? "" : ` (${(c.hit_rate * 100).toFixed(1)}%)`) +
    `; ${fmtUsd(c.saved_usd)} saved.`;
}

async function clearCache(query, label) {
  if (!confirm(`Clear ${label}?`)) return;
  const doc = await api("/api/cache" + query, { method: "DELETE" });
  toast(`${doc.deleted} cache entries cleared`);
  await loadOverview();
}
$("#cache-clear-all").addEventListener("click", () => clearCache("", "every cache entry").catch(report));
$("#cache-clear-model").addEventListener("click", () => {
  const m = $("#cache-model").value.trim();
  if (m) clearCache("?model=" + encodeURIComponent(m), `the entries of ${m}`).catch(report);
});
$("#cache-clear-age").addEventListener("click", () => {
  const d = $("#cache-days").value;
  clearCache("?older_than_days=" + encodeURIComponent(d), `entries older than ${d} days`).catch(report);
});

// -- start-up and polling --
function report(e) {
  if (e instanceof Unauthorized) return;
  console.warn(e);
  toast(e.message || String(e));
}

async function loadStatus() {
  const s = await api("/api/status");
  $("#status").textContent = `v${s.version} · mode ${s.mode} · ${s.upstreams.map((u) => u.name).join(", ")}` +
    (s.ledger.degraded ? ` · DEGRADED: ${s.ledger.degraded}` : "");
}

async function refreshAll() {
  try {
    await Promise.all([loadStatus(), loadOverview(), loadUsage(), loadInflight(), loadLive(true)]);
    document.body.dataset.loaded = "1";
  } catch (e) { report(e); }
}

$("#logout").hidden = !sessionStorage.getItem(TOKEN_KEY);
refreshAll();
setInterval(() => {
  if (!state.unauthorized && $("#f-live").checked) Promise.all([loadInflight(), loadLive(false)]).catch(report);
}, 2000);
setInterval(() => { if (!state.unauthorized) Promise.all([loadOverview(), loadUsage(), loadStatus()]).catch(report); }, 5000);
