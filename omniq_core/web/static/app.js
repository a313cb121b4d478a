"use strict";
// The dashboard's script: fills the page from /api/* and keeps it live with the
// server-sent event stream. Data only ever goes into text nodes (never innerHTML),
// so nothing a task stored can run in this page.
(() => {
  const meta = (name) => document.querySelector(`meta[name="omniq-${name}"]`).content;
  const PAGE = meta("page");
  const CSRF = meta("csrf");
  const ACTIONS = meta("actions") === "yes";
  const TASK = meta("task");
  const content = document.getElementById("content");
  const LIVE_ROWS = 30;
  const FILTERS = ["queue", "since", "func"];

  // --- small DOM helpers -------------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "class") node.className = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function table(id, columns, rows, empty) {
    if (!rows.length) return el("p", { id, class: "empty" }, empty);
    return el("table", { id },
      el("thead", {}, el("tr", {}, ...columns.map((c) => el("th", {}, c)))),
      el("tbody", {}, ...rows.map((cells) => el("tr", {}, ...cells.map((c) => el("td", {}, c))))));
  }

  const section = (title, ...children) => el("section", {}, el("h2", {}, title), ...children);
  const taskLink = (id) => el("a", { href: `/tasks/${encodeURIComponent(id)}`, class: "mono" }, id);
  const time = (iso) => (iso ? new Date(iso).toLocaleTimeString() : "-");
  const moment = (iso) => (iso ? new Date(iso).toLocaleString() : "-");
  const rate = (value) => (value ? value.toFixed(2) : "0");
  const pill = (status) => el("span", { class: `pill ${status}` }, status);

  function age(seconds) {
    if (seconds === null || seconds === undefined) return "-";
    if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)}s`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)}m${String(Math.floor(seconds % 60)).padStart(2, "0")}s`;
    return `${Math.floor(seconds / 3600)}h${String(Math.floor((seconds % 3600) / 60)).padStart(2, "0")}m`;
  }

  function flash(text, bad) {
    const box = document.getElementById("flash");
    box.textContent = text;
    box.className = bad ? "bad" : "good";
    box.hidden = false;
    clearTimeout(flash.timer);
    flash.timer = setTimeout(() => { box.hidden = true; }, 6000);
  }

  async function api(path, options) {
    const response = await fetch(path, { credentials: "same-origin", ...(options || {}) });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.error || response.statusText);
    return body;
  }

  // --- actions -----------------------------------------------------------------------------
  const post = (path) => api(path, { method: "POST", headers: { "X-CSRF-Token": CSRF } });

  function actionButton(label, attrs, run) {
    const button = el("button", { type: "button", ...attrs }, label);
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        flash(await run());
        refreshSoon();
      } catch (error) {
        flash(`${label} refused: ${error.message}`, true);
      }
      button.disabled = false;
    });
    return button;
  }

  // The failed list's filters, as in the page's address (/failed?queue=mail&since=1h).
  function filters() {
    const found = new URLSearchParams(window.location.search);
    const kept = new URLSearchParams();
    for (const name of FILTERS) if (found.get(name)) kept.set(name, found.get(name));
    return kept;
  }
  const filterQuery = () => (filters().toString() ? `?${filters()}` : "");

  function filterForm() {
    const current = filters();
    const input = (name, label, placeholder) => el("label", {}, `${label} `,
      el("input", { name, id: `filter-${name}`, value: current.get(name) || "", placeholder, autocomplete: "off" }));
    return el("form", { id: "failed-filters", class: "filters", method: "get", action: "/failed" },
      input("queue", "Queue", "any"), input("since", "Failed within", "1h, 7d"),
      input("func", "Function", "myapp.tasks:* or send_*"),
      el("button", { type: "submit" }, "Filter"),
      current.toString() ? el("a", { href: "/failed", id: "clear-filters" }, "clear") : null);
  }

  function bulkButtons() {
    const which = filters().toString() ? "matching" : "";
    const retry = actionButton(`Retry all ${which}`.trim(), { id: "retry-all" }, async () => {
      const done = await post(`/api/failed/retry${filterQuery()}`);
      return `${done.count} failed task(s) queued again.`;
    });
    const purge = actionButton(`Purge all ${which}`.trim(), { id: "purge-all", class: "danger" }, async () => {
      if (!window.confirm(`Delete every failed task ${which ? "matching these filters" : "kept"}? Their results stay until they expire.`)) {
        return "Nothing purged.";
      }
      const done = await post(`/api/failed/purge${filterQuery()}`);
      return `${done.count} failed task(s) purged.`;
    });
    return el("div", { class: "bulk" }, retry, " ", purge);
  }

  function scheduleButtons(s) {
    const act = (action, label) => actionButton(label, { class: action, "data-schedule": s.name }, async () => {
      const done = await post(`/api/schedules/${encodeURIComponent(s.name)}/${action}`);
      return action === "run-now" ? `Schedule ${s.name}: task ${done.task_id} queued.` : `Schedule ${s.name}: ${action}d.`;
    });
    return el("span", { class: "actions" }, s.paused ? act("resume", "Resume") : act("pause", "Pause"), " ",
      act("run-now", "Run now"));
  }

  function retryButton(taskId) {
    const button = el("button", { class: "retry", type: "button", "data-task": taskId }, "Retry");
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        await api(`/api/tasks/${encodeURIComponent(taskId)}/retry`,
          { method: "POST", headers: { "X-CSRF-Token": CSRF } });
        flash(`Task ${taskId} is queued again.`);
        refreshSoon();
      } catch (error) {
        flash(`Retry refused: ${error.message}`, true);
        button.disabled = false;
      }
    });
    return button;
  }

  // --- pages -------------------------------------------------------------------------------
  function card(label, value, id) {
    return el("div", { class: "card" }, el("div", { class: "value", id }, value), el("div", { class: "label" }, label));
  }

  function renderOverview(data) {
    const busy = data.workers.reduce((n, w) => n + w.running, 0);
    const slots = data.workers.reduce((n, w) => n + w.concurrency, 0);
    const stores = Object.entries(data.stores).map(([role, kind]) => `${role}: ${kind}`).join(" · ");
    return [
      el("div", { class: "cards" },
        card("ready to run", data.depth, "total-ready"),
        card("running", `${busy} / ${slots}`, "total-running"),
        card("failed (kept)", data.failed, "total-failed"),
        card("live workers", data.live_workers, "total-workers"),
        card("oldest wait", age(data.oldest_wait), "oldest-wait")),
      el("p", { class: "muted" }, `Stores: ${stores}. Rates: tasks per second over the last ${Math.round(data.window)}s.`),
      section("Queues", table("queues",
        ["Queue", "Ready", "Scheduled", "Running", "Failed", "Oldest wait", "In/s", "Out/s"],
        data.queues.map((q) => [q.queue, q.queued, q.scheduled, q.running, q.failed,
          age(q.oldest_wait), rate(q.rate_in), rate(q.rate_out)]),
        "No tasks in any queue.")),
      section("Workers", table("workers",
        ["Host", "PID", "Queues", "Running", "Done", "Heartbeat", "Events held"],
        data.workers.map((w) => [w.host, w.pid, w.queues.join(", "), `${w.running} / ${w.concurrency}`,
          w.tasks_done, `${age(w.heartbeat_age)} ago`, w.events_held + (w.events_dropped ? ` (${w.events_dropped} dropped)` : "")]),
        "No live workers.")),
      section("Last failures", table("failures",
        ["Time", "Queue", "Function", "Task", "Outcome", "Error"],
        data.failures.map((f) => [time(f.at), f.queue || "-", f.func || "?", taskLink(f.task_id), pill(f.outcome), f.error]),
        "No failures seen recently.")),
    ];
  }

  function renderFailed(data) {
    const rows = data.failures.map((f) => {
      const cells = [moment(f.failed_at), f.queue, f.func, taskLink(f.task_id), pill(f.status),
        f.attempts === null ? "-" : `${f.attempts}`, f.error];
      if (ACTIONS) cells.push(retryButton(f.task_id));
      return cells;
    });
    const columns = ["Failed at", "Queue", "Function", "Task", "Outcome", "Attempts", "Error"];
    if (ACTIONS) columns.push("");
    const more = data.failures.length >= data.limit ? ` (the newest ${data.limit})` : "";
    const list = document.getElementById("filter-queue-list");
    if (list) list.replaceChildren(...data.queues.map((q) => el("option", { value: q })));
    return [
      el("p", { class: "muted", id: "failed-summary" },
        `${data.dead_letters} failed tasks are kept in the queues; ${data.failures.length} shown${more}, newest first${filters().toString() ? ", filtered" : ""}.`),
      ACTIONS && rows.length ? bulkButtons() : null,
      table("failed", columns, rows, filters().toString() ? "No failed tasks match." : "No failed tasks."),
    ];
  }

  function renderSchedules(data) {
    const rows = data.schedules.map((s) => {
      const state = el("span", {}, pill(s.paused ? "paused" : "active"), s.source === "config" ? " omniq.yaml" : "");
      const cells = [s.name, state, s.when, s.func, s.queue, moment(s.next_slot), moment(s.last_slot)];
      if (ACTIONS) cells.push(scheduleButtons(s));
      return cells;
    });
    const columns = ["Name", "State", "When", "Function", "Queue", "Next run", "Last run"];
    if (ACTIONS) columns.push("");
    return [
      el("p", { class: "muted" }, "Every worker fires the schedules that are due; each slot is enqueued once."),
      table("schedules", columns, rows,
        "No schedules: add one with `omniq schedule add`, or under `schedules:` in omniq.yaml."),
    ];
  }

  function progress(data) {
    const done = !["pending", "scheduled", "running"].includes(data.status);
    const steps = [["queued", true], ["started", data.attempts > 0], [done ? data.status : "finished", done]];
    const attempts = data.max_attempts ? `attempt ${data.attempts} of ${data.max_attempts}` : `${data.attempts} attempt(s)`;
    return el("div", { class: "progress", id: "progress" },
      ...steps.map(([name, reached]) => el("span", { class: `step ${reached ? "done" : ""} ${name}` }, name)),
      el("span", { class: "muted" }, attempts));
  }

  function renderResult(result) {
    if (!result) return el("p", { class: "muted", id: "result" }, "No outcome yet.");
    if (result.status === "completed") {
      return el("pre", { id: "result" }, JSON.stringify(result.value, null, 2));
    }
    return el("div", { id: "result" },
      el("p", { class: "error" }, `${result.error_type || result.status}: ${result.error_message || ""}`),
      result.traceback ? el("pre", { class: "traceback" }, result.traceback) : null);
  }

  function details(e) {
    const d = e.details;
    if (e.event_type === "progress" && typeof d.done === "number") {
      const total = typeof d.total === "number" ? `/${d.total}${d.total > 0 ? ` (${Math.round(100 * d.done / d.total)}%)` : ""}` : "";
      return `${d.done}${total}${d.message ? ` ${d.message}` : ""}`;
    }
    if (e.event_type === "output" && typeof d.text === "string") return `${d.stream}: ${d.text}`;
    return Object.entries(d).map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`).join(" ");
  }

  function renderTask(data) {
    const args = data.args === null ? el("p", { class: "muted" }, "Not kept: the queue keeps a task's arguments until it completes.")
      : el("pre", { id: "arguments" }, JSON.stringify({ args: data.args, kwargs: data.kwargs }, null, 2));
    return [
      el("h1", {}, el("span", { class: "mono" }, data.task_id), " ", el("span", { id: "task-status" }, pill(data.status))),
      el("p", {}, `${data.func || "?"} on queue ${data.queue || "?"}`),
      progress(data),
      ACTIONS && data.retryable ? retryButton(data.task_id) : null,
      section("Arguments", args),
      section("Outcome", renderResult(data.result)),
      section("Events", table("events", ["Time", "Event", "Attempt", "Worker", "Details"],
        data.events.map((e) => [time(e.timestamp), pill(e.event_type), e.attempt, e.worker_id || "-", details(e)]),
        "No events.")),
    ];
  }

  const PAGES = {
    overview: { path: "/api/overview", render: renderOverview },
    failed: { path: () => `/api/failed${filterQuery()}`, render: renderFailed },
    schedules: { path: "/api/schedules", render: renderSchedules },
    task: { path: `/api/tasks/${encodeURIComponent(TASK)}`, render: renderTask },
  };

  async function load() {
    const page = PAGES[PAGE];
    try {
      const path = typeof page.path === "function" ? page.path() : page.path;
      const data = path ? await api(path) : {};
      content.replaceChildren(...page.render(data).filter(Boolean));
      content.dataset.loaded = String(Date.now());
    } catch (error) {
      content.replaceChildren(el("p", { class: "error", id: "load-error" }, `Could not load: ${error.message}`));
    }
  }

  const PERIODIC_RELOAD_MS = 5000;
  let pending = null;
  function refreshSoon() {  // at most one reload a second, however many events arrive
    if (pending) return;
    pending = setTimeout(async () => { await load(); pending = null; }, 1000);
  }

  // --- live events -------------------------------------------------------------------------
  const liveList = el("ol", { id: "live-events" });
  function addLiveEvent(e) {
    const row = el("li", {}, el("span", { class: "muted" }, time(e.timestamp)), " ", pill(e.event_type), " ",
      taskLink(e.task_id), " ", el("span", { class: "muted" }, `${e.queue || ""} ${e.details.func || ""}`));
    liveList.prepend(row);
    while (liveList.children.length > LIVE_ROWS) liveList.lastChild.remove();
  }

  function connect() {
    const badge = document.getElementById("live");
    const url = PAGE === "task" ? `/api/stream?task=${encodeURIComponent(TASK)}` : "/api/stream";
    const source = new EventSource(url);
    source.onopen = () => { badge.textContent = "live"; badge.className = "badge on"; };
    source.onerror = () => { badge.textContent = "reconnecting"; badge.className = "badge off"; };
    source.onmessage = (message) => {
      const event = JSON.parse(message.data);
      if (PAGE === "overview") addLiveEvent(event);
      refreshSoon();
    };
  }

  async function start() {
    document.querySelectorAll("nav a").forEach((a) => {
      if (a.dataset.nav === PAGE) a.classList.add("current");
    });
    const mode = document.getElementById("mode");
    mode.textContent = ACTIONS ? "actions enabled" : "read-only";
    mode.className = ACTIONS ? "badge warn" : "badge";
    document.getElementById("find").addEventListener("submit", (event) => {
      event.preventDefault();
      const id = document.getElementById("find-id").value.trim();
      if (id) window.location.href = `/tasks/${encodeURIComponent(id)}`;
    });
    if (PAGE === "failed") {  // outside the content that reloads: typing is not lost
      const form = filterForm();
      form.querySelector("#filter-queue").setAttribute("list", "filter-queue-list");
      form.append(el("datalist", { id: "filter-queue-list" }));
      content.before(form);
    }
    if (PAGE === "overview") {
      document.getElementById("main").append(section("Live events", liveList));
      try {
        (await api("/api/events")).events.forEach(addLiveEvent);
      } catch (error) { /* the stream fills it */ }
    }
    await load();
    connect();
    // Worker heartbeats, running counts and wait ages change without any task event.
    setInterval(() => { if (!document.hidden) refreshSoon(); }, PERIODIC_RELOAD_MS);
  }

  start();
})();
