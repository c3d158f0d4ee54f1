// The dspex-trio live dashboard: plain JavaScript, no build step, nothing fetched from outside.
// It reads the websocket endpoint (JSON-RPC 2.0, subprotocol dspex.v1): `health/subscribe` for worker
// and circuit events as they happen, `runtime/status` every second for the figures; and `/metrics`
// (same origin) for each worker's RSS and age. Data from the server is only ever set as text.
"use strict";

(() => {
  const SUBPROTOCOL = "dspex.v1";
  const BEARER_PREFIX = "dspex.bearer.";  // a browser cannot set Authorization on a websocket
  const POLL_MS = 1000;                   // runtime/status and /metrics, once a second
  const HISTORY_POINTS = 300;             // plotted samples: 5 minutes at one a second
  const ENDED_KEEP_MS = 30000;            // a failed or stopped worker stays in the table this long
  const MAX_EVENTS = 200;                 // health events listed
  const RECONNECT_MS = 2000;
  const TOKEN_KEY = "dspex-trio-token";

  const params = new URLSearchParams(location.search);
  // the websocket: ?ws=<url>, else the one the server names (serve_http on a port of its own), else this origin
  const named = document.querySelector('meta[name="dspex-websocket"]').content;
  const wsUrl = params.get("ws") || named || `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}`;
  const metricsSameOrigin = !params.get("ws");
  let token = sessionStorage.getItem(TOKEN_KEY) || "";

  let socket = null;
  let nextId = 1;
  const pending = new Map();
  let pollTimer = null;
  let metricsOk = metricsSameOrigin;
  const NODE_CHARS = 12;  // a Ray node id (56 hex digits) is shown by its first characters
  const workers = new Map();  // worker_id -> {worker_id, pid, state, calls, in_flight, endedAt}
  const processFigures = new Map();  // worker_id -> {rss, age}
  const history = [];  // {rate, executions, p50, p99}
  let lastTotals = null;

  const $ = (id) => document.getElementById(id);

  // -- the connection -------------------------------------------------------------------------------
  function connect() {
    const protocols = [SUBPROTOCOL];
    if (token) protocols.push(BEARER_PREFIX + token);
    setBadge($("connection"), "connecting", "connecting");
    let opened = false;
    socket = new WebSocket(wsUrl, protocols);
    socket.onopen = () => {
      opened = true;
      $("token-form").hidden = true;
      setBadge($("connection"), "connected", "connected");
      call("health/subscribe").then((reply) => applySnapshot(reply.snapshot)).catch(logError);
      poll();
      pollTimer = setInterval(poll, POLL_MS);
    };
    socket.onmessage = (message) => handle(JSON.parse(message.data));
    socket.onclose = () => {
      clearInterval(pollTimer);
      for (const { reject } of pending.values()) reject(new Error("connection closed"));
      pending.clear();
      setBadge($("connection"), "closed-connection", "disconnected");
      if (opened) {
        setTimeout(connect, RECONNECT_MS);
      } else {
        askForToken(token ? "The server refused this token (or cannot be reached)." : "");
      }
    };
  }

  function askForToken(message) {
    $("token-error").textContent = message;
    $("token-form").hidden = false;
    $("token").focus();
  }

  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    token = $("token").value.trim();
    if (token) sessionStorage.setItem(TOKEN_KEY, token); else sessionStorage.removeItem(TOKEN_KEY);
    connect();
  });

  function call(method, params) {
    const id = nextId++;
    const message = { jsonrpc: "2.0", id, method };
    if (params !== undefined) message.params = params;
    return new Promise((resolve, reject) => {
      pending.set(id, { resolve, reject });
      socket.send(JSON.stringify(message));
    });
  }

  function handle(message) {
    if (message.id !== undefined && pending.has(message.id)) {
      const { resolve, reject } = pending.get(message.id);
      pending.delete(message.id);
      if (message.error) reject(new Error(message.error.message)); else resolve(message.result);
    } else if (message.method === "health/event") {
      healthEvent(message.params);
    }
  }

  function logError(error) {
    addEvent(`dashboard: ${error.message}`, true);
  }

  // -- health events --------------------------------------------------------------------------------
  function healthEvent({ event, data }) {
    if (event === "worker_state") {
      const ended = data.to === "failed" || data.to === "stopped";
      addEvent(`worker ${data.worker_id} (pid ${data.pid}): ${data.from} -> ${data.to} (${data.reason})`, data.to === "failed");
      const worker = workers.get(data.worker_id) || { worker_id: data.worker_id, pid: data.pid, calls: 0, in_flight: 0 };
      if (!worker.endedAt) {
        worker.state = data.to;
        worker.pid = data.pid;
        if (data.node) worker.node = data.node;
        if (ended) worker.endedAt = Date.now();
      }
      workers.set(data.worker_id, worker);
      renderWorkers();
    } else if (event === "circuit") {
      addEvent(`circuit: ${data.from} -> ${data.to} (${data.reason})`, data.to === "open");
      setCircuit(data.to);
    } else if (event === "lagged") {
      addEvent(`missed ${data.missed} events; resynchronising`, false);
    } else if (event === "snapshot") {
      applySnapshot(data);
    }
  }

  function applySnapshot(snapshot) {
    setCircuit(snapshot.circuit);
    updateLive(snapshot.workers.map((w) => ({ ...w, calls: undefined })));
  }

  function updateLive(live) {
    const seen = new Set();
    for (const w of live) {
      seen.add(w.worker_id);
      const worker = workers.get(w.worker_id) || { worker_id: w.worker_id, calls: 0 };
      worker.pid = w.pid;
      worker.in_flight = w.in_flight;
      if (w.node) worker.node = w.node;
      if (w.calls !== undefined) worker.calls = w.calls;
      if (!worker.endedAt) {
        worker.state = w.state;
        if (w.state === "failed" || w.state === "stopped") worker.endedAt = Date.now();
      }
      workers.set(w.worker_id, worker);
    }
    for (const [id, worker] of workers) {
      if (!seen.has(id) && !worker.endedAt) workers.delete(id);
    }
    renderWorkers();
  }

  function addEvent(text, bad) {
    const item = document.createElement("li");
    item.textContent = `${new Date().toLocaleTimeString()}  ${text}`;
    if (bad) item.className = "failed";
    const list = $("events");
    list.insertBefore(item, list.firstChild);
    while (list.children.length > MAX_EVENTS) list.removeChild(list.lastChild);
  }

  // -- figures --------------------------------------------------------------------------------------
  function poll() {
    call("runtime/status").then(applyStatus).catch(logError);
    if (metricsOk) fetchMetrics();
  }

  function applyStatus(status) {
    const stats = status.statistics || {};
    const server = status.server || {};
    $("summary").textContent = `${status.backend} backend · launcher ${stats.launcher || "?"} · v${status.version} · ${server.url || wsUrl}`;
    $("executions").textContent = server.executions ?? "–";
    $("connections").textContent = server.connections ?? "–";
    $("in-flight").textContent = stats.in_flight ?? "–";
    $("queued").textContent = stats.queued ?? "–";
    $("restarts").textContent = stats.restarts ?? "–";
    if (status.health) setCircuit(status.health.circuit);
    if (Array.isArray(stats.workers)) {
      updateLive(stats.workers.map((w) => ({
        worker_id: w.worker_id, pid: w.pid, state: w.state, in_flight: w.in_flight,
        calls: w.calls_served + w.calls_failed, node: w.node,
      })));
    } else if (status.health) {
      applySnapshot(status.health);
    }
    const now = performance.now() / 1000;
    const done = (stats.completed || 0) + (stats.failed || 0);  // calls of every method
    const outcomes = server.execution_outcomes || {};  // executions over the websocket
    const executed = Object.values(outcomes).reduce((sum, n) => sum + n, 0);
    let rate = 0;
    let executions = 0;
    if (lastTotals && now > lastTotals.t) {
      rate = Math.max(0, (done - lastTotals.done) / (now - lastTotals.t));
      executions = Math.max(0, (executed - lastTotals.executed) / (now - lastTotals.t));
    }
    lastTotals = { t: now, done, executed };
    $("rate").textContent = rate.toFixed(1);
    $("execution-rate").textContent = executions.toFixed(1);
    const latency = stats.latency || {};
    let method = latency.execute ? "execute" : null;
    if (!method) {
      for (const [name, figures] of Object.entries(latency)) {
        if (!method || figures.count > latency[method].count) method = name;
      }
    }
    const summary = method ? latency[method] : null;
    $("latency-method").textContent = method ? `(${method}, latest calls, ms)` : "(no calls yet)";
    history.push({ rate, executions, p50: summary ? summary.p50 * 1000 : 0, p99: summary ? summary.p99 * 1000 : 0 });
    while (history.length > HISTORY_POINTS) history.shift();
    plot($("rate-plot"), [
      { values: history.map((h) => h.executions), color: "#1a7f37" },
      { values: history.map((h) => h.rate), color: "#8a94a6" },
    ], "/s");
    plot($("latency-plot"), [
      { values: history.map((h) => h.p50), color: "#2f6fdf" },
      { values: history.map((h) => h.p99), color: "#d9480f" },
    ], " ms");
    renderWorkers();
  }

  function fetchMetrics() {
    const headers = token ? { Authorization: `Bearer ${token}` } : {};
    fetch("/metrics", { headers, cache: "no-store" })
      .then((response) => {
        if (!response.ok) throw new Error(`/metrics answered ${response.status}`);
        return response.text();
      })
      .then((text) => {
        processFigures.clear();
        const line = /^dspex_worker_(resident_memory_bytes|age_seconds)\{(?:[^}]*,)?worker_id="([^"]*)"[^}]*\} (\S+)$/;
        for (const row of text.split("\n")) {
          const match = line.exec(row);
          if (!match) continue;
          const figures = processFigures.get(match[2]) || {};
          figures[match[1] === "age_seconds" ? "age" : "rss"] = Number(match[3]);
          processFigures.set(match[2], figures);
        }
        renderWorkers();
      })
      .catch((error) => {
        metricsOk = false;  // RSS and age stay unknown; not asked again
        addEvent(`RSS and age unavailable: ${error.message}`, false);
      });
  }

  // -- drawing --------------------------------------------------------------------------------------
  function setBadge(element, state, text) {
    element.dataset.state = state;
    element.textContent = text;
  }

  function setCircuit(state) {
    setBadge($("circuit"), state, `circuit: ${state}`);
  }

  function formatBytes(bytes) {
    return bytes === undefined ? "–" : `${(bytes / 1048576).toFixed(1)} MiB`;
  }

  function formatAge(seconds) {
    if (seconds === undefined) return "–";
    if (seconds < 60) return `${seconds.toFixed(0)} s`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} m ${Math.floor(seconds % 60)} s`;
    return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} m`;
  }

  function renderWorkers() {
    const now = Date.now();
    for (const [id, worker] of workers) {
      if (worker.endedAt && now - worker.endedAt > ENDED_KEEP_MS) workers.delete(id);
    }
    const body = $("workers").tBodies[0];
    const rows = [...workers.values()].sort((a, b) => (a.endedAt ? 1 : 0) - (b.endedAt ? 1 : 0)
      || a.worker_id.localeCompare(b.worker_id, undefined, { numeric: true }));
    body.replaceChildren(...rows.map((worker) => {
      const figures = worker.endedAt ? {} : processFigures.get(worker.worker_id) || {};
      const row = document.createElement("tr");
      row.dataset.workerId = worker.worker_id;
      row.dataset.state = worker.state;
      if (worker.endedAt) row.className = "failed";
      const cells = [worker.worker_id, worker.pid, worker.state, worker.calls ?? 0, worker.in_flight ?? 0,
        formatBytes(figures.rss), formatAge(figures.age), (worker.node || "").slice(0, NODE_CHARS)];
      cells.forEach((value, index) => {
        const cell = document.createElement("td");
        cell.textContent = String(value);
        if (index === 2) cell.className = `state-${worker.state}`;
        row.appendChild(cell);
      });
      return row;
    }));
  }

  function plot(canvas, series, unit) {
    const context = canvas.getContext("2d");
    const { width, height } = canvas;
    const left = 48, bottom = 18, top = 8;
    context.clearRect(0, 0, width, height);
    let max = 0;
    for (const { values } of series) for (const v of values) max = Math.max(max, v);
    max = max > 0 ? max * 1.1 : 1;
    context.strokeStyle = "#dde1e7";
    context.fillStyle = "#6b7385";
    context.font = "11px system-ui, sans-serif";
    for (let i = 0; i <= 4; i += 1) {
      const y = top + ((height - top - bottom) * i) / 4;
      context.beginPath();
      context.moveTo(left, y);
      context.lineTo(width, y);
      context.stroke();
      const label = (max * (4 - i)) / 4;
      context.fillText(`${label < 10 ? label.toFixed(1) : label.toFixed(0)}${unit}`, 2, y + 4);
    }
    context.fillText("-5 min", left, height - 4);
    context.fillText("now", width - 24, height - 4);
    for (const { values, color } of series) {
      context.strokeStyle = color;
      context.lineWidth = 1.5;
      context.beginPath();
      const offset = HISTORY_POINTS - values.length;
      values.forEach((v, i) => {
        const x = left + ((width - left) * (offset + i)) / (HISTORY_POINTS - 1);
        const y = top + (height - top - bottom) * (1 - v / max);
        if (i === 0) context.moveTo(x, y); else context.lineTo(x, y);
      });
      context.stroke();
    }
  }

  connect();
})();
