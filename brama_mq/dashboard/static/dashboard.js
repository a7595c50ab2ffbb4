// brama_mq dashboard: one EventSource (api/events) feeds the table and the event feed.
// The stream starts with a "snapshot" (everything) and goes on with a "change" per event;
// after a reconnect the server sends a snapshot again. Plain JavaScript, no build step.
"use strict";

(() => {
  const FEED_MAX = 100;
  const TOKEN_KEY = "brama-dashboard-token";
  const SVG = "http://www.w3.org/2000/svg";
  const CHART_W = 150;
  const CHART_H = 22;

  const $ = (id) => document.getElementById(id);
  const board = {
    rows: new Map(),      // key -> row (as the server sends it)
    offset: 0,            // server clock - this browser's clock, ms
    bucketMs: 10000,
    buckets: 30,
    rateWindowMs: 60000,
    admin: false,
    eventsSeen: 0,
  };
  const rowEls = new Map();   // key -> <tr>
  const groupEls = new Map(); // scope label -> <tbody>
  let filterTerms = [];

  const keyOf = (scope, connection) => JSON.stringify([scope, connection]);
  const scopeLabel = (scope) => (scope === null || scope === undefined ? "(no scope)" : scope);
  const now = () => Date.now() + board.offset;
  const span = (ms) => (ms < 120000 ? `${ms / 1000} s` : `${ms / 60000} min`);

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "text") node.textContent = value;
      else if (name === "class") node.className = value;
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
    return node;
  }

  // ------------------------------------------------------------------ formatting
  function ago(ms) {
    if (ms === null || ms === undefined) return "";
    const s = Math.max(0, (now() - ms) / 1000);
    if (s < 60) return `${s.toFixed(0)} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    return `${Math.floor(s / 3600)} h ago`;
  }

  function clock(ms) {
    const d = new Date(ms - board.offset);
    const pad = (n, w = 2) => String(n).padStart(w, "0");
    return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.` +
      pad(d.getMilliseconds(), 3);
  }

  function leftText(row) {
    if (row.state === "half_open") return { text: "probing", running: false };
    if (row.state !== "open") return { text: "\u2014", running: false };
    if (row.open_until === null || row.open_until === undefined) {
      return { text: row.held_open ? "until closed" : "open", running: false };
    }
    const left = Math.max(0, row.open_until - now()) / 1000;
    return { text: `${left.toFixed(1)} s`, running: left > 0 };
  }

  function sumSince(counts, since) {
    let total = 0;
    for (const [index, n] of Object.entries(counts || {})) {
      if (Number(index) >= since) total += n;
    }
    return total;
  }

  function rateOf(row) {
    const rate = row.rate || {};
    if (rate.source === "owner") {
      return { value: rate.value, source: "owner", calls: null };
    }
    const since = Math.floor((now() - board.rateWindowMs) / board.bucketMs) + 1;
    const calls = sumSince(row.calls, since);
    const failures = sumSince(row.failures, since);
    return { value: calls ? (100 * failures) / calls : null, source: "seen", calls };
  }

  // ------------------------------------------------------------------ the table
  function groupFor(scope) {
    const label = scopeLabel(scope);
    let tbody = groupEls.get(label);
    if (tbody) return tbody;
    tbody = el("tbody", { class: "scope-group", "data-scope": scope ?? "" });
    const head = el("tr", { class: "scope-head" },
      el("th", { colspan: 9 }, label, " ", el("span", { class: "muted" })));
    tbody.append(head);
    const table = $("breakers");
    const later = [...table.tBodies].find((t) => scopeLabel(t.dataset.scope || null) > label);
    table.insertBefore(tbody, later || null);
    groupEls.set(label, tbody);
    return tbody;
  }

  function ensureRow(key, row) {
    let tr = rowEls.get(key);
    if (!tr) {
      tr = el("tr", { class: "breaker" });
      for (const name of ["name", "state", "num failures", "num rate", "left", "mode", "chart", "last"]) {
        tr.append(el("td", { class: name }));
      }
      if (board.admin) {
        const actions = el("td", { class: "actions" });
        for (const action of ["open", "close", "reset"]) {
          actions.append(el("button", { type: "button", "data-action": action, text: action,
                                        title: `${action} this circuit` }));
        }
        tr.append(actions);
      }
      const tbody = groupFor(row.scope);
      const later = [...tbody.querySelectorAll("tr.breaker")]
        .find((other) => other.dataset.connection > row.connection);
      tbody.insertBefore(tr, later || null);
      rowEls.set(key, tr);
    }
    fillRow(tr, row);
    return tr;
  }

  function fillRow(tr, row) {
    tr.dataset.scope = row.scope ?? "";
    tr.dataset.connection = row.connection;
    tr.dataset.state = row.state;
    tr.dataset.mode = row.mode || "normal";
    tr.className = `breaker state-${row.state}`;
    const cells = tr.cells;
    cells[0].textContent = row.connection;
    const badgeClass = ["closed", "open", "half_open"].includes(row.state) ? row.state : "unknown";
    cells[1].replaceChildren(el("span", { class: `badge ${badgeClass}`,
                                          text: row.state.replace("_", "-") }));
    const count = row.failure_count ?? "?";
    if (row.strategy === "failure_rate") {
      // max_attempts does not apply: the count is the failures in the owner's window
      cells[2].replaceChildren(String(count), el("small", { text: " in window" }));
      cells[2].title = "failures in the owner's sliding window (failure_rate strategy)";
    } else {
      cells[2].textContent = row.max_attempts ? `${count}/${row.max_attempts}` : String(count);
      cells[2].title = "consecutive failures / max_attempts";
    }
    fillTimely(tr, row);
    cells[5].textContent = row.mode || "normal";
  }

  // The cells that move with time: the countdown, the rate, the chart, the age.
  function fillTimely(tr, row) {
    const cells = tr.cells;
    const rate = rateOf(row);
    const rateCell = cells[3];
    const known = rate.value !== null && rate.value !== undefined;
    rateCell.replaceChildren(known ? `${rate.value.toFixed(0)}%` : "\u2014");
    if (rate.source === "seen") {
      if (known) rateCell.append(el("small", { text: "seen" }));
      rateCell.title = `failures / calls among the events this dashboard saw in the last ` +
        `${board.rateWindowMs / 1000} s (${rate.calls} calls); the owner's rows carry no rate`;
    } else {
      rateCell.title = "failure rate reported by the owner";
    }
    const left = leftText(row);
    cells[4].textContent = left.text;
    cells[4].classList.toggle("running", left.running);
    cells[4].dataset.until = row.state === "open" && row.open_until ? row.open_until : "";
    cells[6].replaceChildren(chart(row));
    cells[7].replaceChildren(row.last_event || "",
                             row.last_at ? el("small", { text: ago(row.last_at) }) : "");
  }

  function chart(row) {
    const n = board.buckets;
    const current = Math.floor(now() / board.bucketMs);
    const first = current - n + 1;
    const failures = [];
    const calls = [];
    for (let i = 0; i < n; i++) {
      failures.push((row.failures || {})[first + i] || 0);
      calls.push((row.calls || {})[first + i] || 0);
    }
    const total = failures.reduce((a, b) => a + b, 0);
    const scale = Math.max(1, ...calls, ...failures);
    const width = CHART_W / n;
    const root = svg("svg", {
      class: "spark", width: CHART_W, height: CHART_H, viewBox: `0 0 ${CHART_W} ${CHART_H}`,
      "data-total": total, "data-calls": calls.reduce((a, b) => a + b, 0),
      "data-points": failures.join(","), role: "img",
      "aria-label": `${total} failures in the last ${span(n * board.bucketMs)}`,
    });
    const title = svg("title", {});
    title.textContent = `${total} failures, ${calls.reduce((a, b) => a + b, 0)} calls seen in ` +
      `the last ${span(n * board.bucketMs)} (${board.bucketMs / 1000} s per bar)`;
    root.append(title);
    root.append(svg("line", { class: "base", x1: 0, y1: CHART_H - 0.5, x2: CHART_W, y2: CHART_H - 0.5 }));
    for (let i = 0; i < n; i++) {
      for (const [cls, value] of [["calls", calls[i]], ["fail", failures[i]]]) {
        if (!value) continue;
        const h = Math.max(2, ((CHART_H - 2) * value) / scale);
        root.append(svg("rect", { class: cls, x: (i * width + 0.5).toFixed(2), y: (CHART_H - 1 - h).toFixed(2),
                                  width: Math.max(1, width - 1).toFixed(2), height: h.toFixed(2) }));
      }
    }
    return root;
  }

  function removeRow(key) {
    const tr = rowEls.get(key);
    if (!tr) return;
    const tbody = tr.parentElement;
    tr.remove();
    rowEls.delete(key);
    if (tbody && !tbody.querySelector("tr.breaker")) {
      for (const [label, group] of groupEls) {
        if (group === tbody) groupEls.delete(label);
      }
      tbody.remove();
    }
  }

  // ------------------------------------------------------------------ the filter
  // Words separated by spaces, all of which must match: "scope:x", "connection:x" (or
  // "conn:x"), "state:x", or a bare word matching the scope, the connection or the state.
  function parseFilter(text) {
    return text.trim().toLowerCase().split(/\s+/).filter(Boolean).map((word) => {
      const m = /^(scope|connection|conn|state):(.*)$/.exec(word);
      if (!m) return { field: null, value: word };
      return { field: m[1] === "conn" ? "connection" : m[1], value: m[2] };
    });
  }

  function matches(row) {
    const fields = {
      scope: scopeLabel(row.scope).toLowerCase(),
      connection: row.connection.toLowerCase(),
      state: row.state.toLowerCase(),
    };
    return filterTerms.every(({ field, value }) => {
      if (field) return fields[field].includes(value) ||
        (field === "state" && fields.state.replace("_", "-").includes(value));
      return fields.scope.includes(value) || fields.connection.includes(value) ||
        fields.state.includes(value) || fields.state.replace("_", "-").includes(value);
    });
  }

  function applyFilter() {
    for (const [key, tr] of rowEls) {
      const row = board.rows.get(key);
      tr.hidden = row ? !matches(row) : false;
    }
    for (const tbody of groupEls.values()) {
      const rows = [...tbody.querySelectorAll("tr.breaker")];
      const shown = rows.filter((tr) => !tr.hidden);
      const open = rows.filter((tr) => tr.dataset.state === "open").length;
      tbody.hidden = shown.length === 0;
      const note = tbody.querySelector("tr.scope-head .muted");
      const hiddenNote = shown.length < rows.length ? `, ${rows.length - shown.length} filtered out` : "";
      note.textContent = `${rows.length} breaker${rows.length === 1 ? "" : "s"}` +
        `${open ? `, ${open} open` : ""}${hiddenNote}`;
    }
    summarize();
  }

  function summarize() {
    const rows = [...board.rows.values()];
    const open = rows.filter((r) => r.state === "open").length;
    const half = rows.filter((r) => r.state === "half_open").length;
    $("counts").textContent = `${rows.length} breaker${rows.length === 1 ? "" : "s"} \u00b7 ` +
      `${open} open \u00b7 ${half} half-open`;
    $("empty").hidden = rows.length > 0;
    $("events-seen").textContent = `(${board.eventsSeen} seen)`;
  }

  // ------------------------------------------------------------------ the event feed
  function feedItem(e, fresh) {
    const who = e.scope ? `${e.scope}/${e.connection}` : e.connection;  // as breaker_name writes it
    return el("li", { class: `ev-${e.event}${fresh ? " fresh" : ""}`, "data-event": e.event,
                      "data-connection": e.connection, "data-scope": e.scope ?? "" },
      el("span", { class: "time", text: clock(e.timestamp) }),
      el("span", { class: "kind", text: e.event }),
      el("span", { class: "who", text: `${who}  #${e.seq}` }),
      e.detail ? el("span", { class: "detail", text: e.detail }) : null);
  }

  function addFeed(e) {
    const feed = $("feed");
    feed.prepend(feedItem(e, true));
    while (feed.children.length > FEED_MAX) feed.lastElementChild.remove();
  }

  // ------------------------------------------------------------------ the stream
  function setNote(text) {
    const note = $("note");
    note.textContent = text || "";
    note.hidden = !text;
  }

  function onSnapshot(msg) {
    board.offset = msg.now - Date.now();
    board.bucketMs = msg.bucket_ms;
    board.buckets = msg.buckets;
    board.rateWindowMs = msg.rate_window_ms;
    board.eventsSeen = msg.events_seen;
    if (board.admin !== msg.admin) {
      board.admin = msg.admin;
      for (const key of [...rowEls.keys()]) removeRow(key); // rebuilt with(out) buttons
    }
    for (const node of document.querySelectorAll(".admin-only")) node.hidden = !board.admin;
    $("where").textContent = msg.title || "";
    $("rate-head").title = `failure rate: the owner's when its rows carry one, else failures / ` +
      `calls among the events seen in the last ${msg.rate_window_ms / 1000} s ("seen")`;
    $("chart-head").textContent = `failures, last ${span(msg.buckets * msg.bucket_ms)}`;
    setNote(msg.note);
    board.rows.clear();
    for (const row of msg.rows) board.rows.set(keyOf(row.scope, row.connection), row);
    for (const key of [...rowEls.keys()]) {
      if (!board.rows.has(key)) removeRow(key);
    }
    for (const [key, row] of board.rows) ensureRow(key, row);
    const feed = $("feed");
    feed.replaceChildren(...msg.events.slice(-FEED_MAX).reverse().map((e) => feedItem(e, false)));
    applyFilter();
  }

  function onChange(msg) {
    board.eventsSeen += 1;
    if (msg.removed) {
      const key = keyOf(msg.removed[0], msg.removed[1]);
      board.rows.delete(key);
      removeRow(key);
    }
    if (msg.row) {
      const key = keyOf(msg.row.scope, msg.row.connection);
      board.rows.set(key, msg.row);
      ensureRow(key, msg.row);
    }
    addFeed(msg.event);
    applyFilter();
  }

  function setLive(state, text) {
    const live = $("live");
    live.className = `live ${state}`;
    live.textContent = text;
  }

  function connect() {
    const source = new EventSource("api/events");
    source.addEventListener("snapshot", (e) => onSnapshot(JSON.parse(e.data)));
    source.addEventListener("change", (e) => onChange(JSON.parse(e.data)));
    source.addEventListener("open", () => setLive("up", "live"));
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED) {
        setLive("down", "disconnected, retrying");
        setTimeout(connect, 2000);
      } else {
        setLive("connecting", "reconnecting");
      }
    });
  }

  // ------------------------------------------------------------------ admin actions
  function token() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  }

  function takeTokenFromUrl() {
    const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
    if (m) {
      sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
      history.replaceState(null, "", location.pathname + location.search);
    }
    $("token").value = token();
  }

  function adminStatus(text, isError) {
    const status = $("admin-status");
    status.textContent = text;
    status.classList.toggle("error", Boolean(isError));
  }

  async function act(action, tr) {
    const scope = tr.dataset.scope === "" ? null : tr.dataset.scope;
    const connection = tr.dataset.connection;
    const name = scope ? `${scope}/${connection}` : connection;
    if (!token()) {
      adminStatus("enter the admin token first", true);
      return;
    }
    adminStatus(`${action} ${name}\u2026`, false);
    try {
      const response = await fetch(`api/admin/${action}`, {
        method: "POST",
        headers: { "Content-Type": "application/json", Authorization: `Bearer ${token()}` },
        body: JSON.stringify({ scope, connection }),
      });
      const body = await response.json();
      if (!response.ok) {
        adminStatus(`${action} ${name}: ${body.error || response.status}`, true);
        return;
      }
      const events = body.events.length ? ` (${body.events.join(", ")})` : "";
      adminStatus(`${action} ${name}: ${body.status}${events}`, false);
    } catch (err) {
      adminStatus(`${action} ${name}: ${err}`, true);
    }
  }

  // ------------------------------------------------------------------ start
  function tick() {
    for (const [key, tr] of rowEls) {
      const row = board.rows.get(key);
      if (row && row.state === "open" && row.open_until) {
        const left = leftText(row);
        tr.cells[4].textContent = left.text;
        tr.cells[4].classList.toggle("running", left.running);
      }
    }
  }

  function slow() {
    for (const [key, tr] of rowEls) {
      const row = board.rows.get(key);
      if (row) fillTimely(tr, row);
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    const filter = $("filter");
    filter.addEventListener("input", () => {
      filterTerms = parseFilter(filter.value);
      applyFilter();
    });
    $("admin").addEventListener("submit", (e) => e.preventDefault());
    $("token").addEventListener("change", (e) => sessionStorage.setItem(TOKEN_KEY, e.target.value));
    $("breakers").addEventListener("click", (e) => {
      const button = e.target.closest("button[data-action]");
      if (button) act(button.dataset.action, button.closest("tr.breaker"));
    });
    takeTokenFromUrl();
    summarize();
    connect();
    setInterval(tick, 100);
    setInterval(slow, 1000);
  });
})();
