// pulse's web dashboard: the read API's numbers for one project, drawn with the DOM and SVG, nothing else.
// Every value that came from an event is set as text (textContent, setAttribute), never parsed as HTML.
"use strict";
(function () {
  const API = "/api/v1/projects/";
  const RANGES = ["24h", "7d", "30d", "90d"];
  const FILTERS = ["event", "path", "referrer", "utm_source", "utm_medium", "utm_campaign", "browser", "os",
    "device", "country", "language", "screen"];
  const MIN_COMPARABLE_EVENTS = 20; // as the TUI: fewer events before, and a percentage would be noise
  const REFRESH_MS = 30000; // numbers of a window that ends now are read again this often
  const FEED_ROWS = 50;
  const HOUR_LIMIT_DAYS = 31; // the read API's longest window per hour
  const CLOSE_TOKEN_REVOKED = 4001;
  const BEARER_PROTOCOL = "pulse.bearer"; // the WebSocket's token goes as a subprotocol, not in its URL
  // breakdown tabs: [label, endpoint, extra query, filter a row adds, what its count counts]
  const TABS = [
    ["Pages", "pages", null, "path", "Views"],
    ["Entry pages", "entry-pages", null, "path", "Sessions"],
    ["Exit pages", "exit-pages", null, "path", "Sessions"],
    ["Referrers", "referrers", null, "referrer", "Sessions"],
    ["UTM source", "utm", "source", "utm_source", "Sessions"],
    ["UTM medium", "utm", "medium", "utm_medium", "Sessions"],
    ["UTM campaign", "utm", "campaign", "utm_campaign", "Sessions"],
    ["Browsers", "browsers", null, "browser", "Events"],
    ["OS", "os", null, "os", "Events"],
    ["Devices", "devices", null, "device", "Events"],
    ["Countries", "countries", null, "country", "Events"],
    ["Languages", "languages", null, "language", "Events"],
    ["Screens", "screens", null, "screen", "Events"],
    ["Goals", "goals", null, null, "Rate"],
  ];
  const CARDS = [
    ["Events", "events", "count"], ["Visitors", "unique_users", "count"], ["Sessions", "sessions", "count"],
    ["Bounce rate", "bounce_rate", "rate", true], ["Avg. duration", "avg_session_seconds", "seconds"],
    ["Pages / session", "pages_per_session", "decimal"], ["Daily average", "daily_average", "decimal"],
  ];

  const $ = (id) => document.getElementById(id);
  const path = location.pathname.match(/^\/dashboard\/(\d+)\/?$/);
  const projectId = path ? path[1] : null;
  const share = (location.hash.match(/(?:^#|&)share=([A-Za-z0-9_-]+)/) || [])[1] || null;
  let params = new URLSearchParams(location.search);
  let feed = null;
  let refreshTimer = 0;
  let generation = 0; // answers to an older view are dropped
  let revoked = false;

  // -- text --------------------------------------------------------------------------------------------
  // control and bidirectional formatting characters shown as visible marks: a name cannot reorder or hide
  // the text around it
  const INVISIBLE = /[\u0000-\u001f\u007f-\u009f\u200e\u200f\u202a-\u202e\u2066-\u2069]/g;
  function clean(value) {
    if (value === null || value === undefined) return "(none)";
    return String(value).replace(INVISIBLE, (c) => "\u27e8U+" + c.charCodeAt(0).toString(16).toUpperCase().padStart(4, "0") + "\u27e9");
  }
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else node.setAttribute(k, v);
    }
    for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    return node;
  }
  const numberFormat = new Intl.NumberFormat("en-US");
  const decimalFormat = new Intl.NumberFormat("en-US", { maximumFractionDigits: 1 });
  function format(value, kind) {
    if (kind === "rate") return decimalFormat.format(value * 100) + "%";
    if (kind === "seconds") {
      const s = Math.round(value);
      return s < 60 ? s + "s" : Math.floor(s / 60) + "m " + String(s % 60).padStart(2, "0") + "s";
    }
    if (kind === "decimal") return decimalFormat.format(value);
    return numberFormat.format(value);
  }
  function change(current, previous, previousEvents) {
    if (previous === 0) return [current ? "new" : "", ""];
    if (previousEvents < MIN_COMPARABLE_EVENTS) return ["", ""];
    const delta = (current - previous) / previous;
    if (Math.abs(delta) < 0.0005) return ["±0%", ""];
    const arrow = delta > 0 ? "▲" : "▼";
    const text = delta >= 9.995 ? numberFormat.format(Math.round(current / previous)) + "×"
      : (Math.abs(delta) * 100).toFixed(Math.abs(delta) >= 0.1 ? 0 : 1) + "%";
    return [arrow + text, delta > 0 ? "up" : "down"];
  }

  // -- the token ---------------------------------------------------------------------------------------
  const TOKEN_KEY = "pulse.token";
  function token() { return share || sessionStorage.getItem(TOKEN_KEY); }
  class Refused extends Error {}
  async function get(endpoint, query) {
    const response = await fetch(endpoint + (query ? "?" + query : ""), {
      headers: { Authorization: "Bearer " + token() }, cache: "no-store", referrerPolicy: "no-referrer",
    });
    const body = await response.json().catch(() => ({ error: response.statusText }));
    if (response.status === 401) throw new Refused(body.error || "refused");
    if (!response.ok) throw new Error(body.error || response.statusText);
    return body;
  }
  function login(note) {
    $("board").hidden = true;
    $("projects").hidden = true;
    $("login").hidden = false;
    if (note) $("login-note").textContent = note;
    $("token").focus();
  }
  $("login").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    $("login").hidden = true;
    start();
  });
  function fail(error) {
    if (error instanceof Refused) {
      stopFeed();
      if (share) {
        revoked = true;
        $("board").hidden = true;
        showError("This share link has been revoked or has expired.");
      } else {
        sessionStorage.removeItem(TOKEN_KEY);
        login("The token was refused (" + error.message + "). Enter the project's read token (sk_…).");
      }
      return;
    }
    showError(error.message);
  }
  function showError(text) {
    $("error").textContent = text;
    $("error").hidden = !text;
  }

  // -- the view in the URL -----------------------------------------------------------------------------
  function windowQuery() {
    const q = new URLSearchParams();
    for (const [k, v] of params) if (k !== "tab" && k !== "interval") q.append(k, v);
    if (!q.has("range") && !q.has("from")) q.set("range", "7d");
    return q;
  }
  function interval() {
    const chosen = params.get("interval");
    if (chosen === "hour" || chosen === "day") return chosen;
    return params.get("range") === "24h" ? "hour" : "day";
  }
  function spanDays() {
    if (params.get("from")) {
      const to = params.get("to") || new Date().toISOString().slice(0, 10);
      return (Date.parse(to.slice(0, 10)) - Date.parse(params.get("from").slice(0, 10))) / 86400000 + 1;
    }
    return { "24h": 1, "7d": 7, "30d": 30, "90d": 90 }[params.get("range") || "7d"] || 7;
  }
  function navigate(change) {
    change(params);
    history.pushState(null, "", location.pathname + (params.toString() ? "?" + params : "") + location.hash);
    load();
  }
  window.addEventListener("popstate", () => { params = new URLSearchParams(location.search); load(); });
  function addFilter(key, value) {
    if (value === null || value === undefined) return;
    navigate((p) => p.set(key, value));
  }

  // -- controls ----------------------------------------------------------------------------------------
  for (const button of $("ranges").querySelectorAll("button")) {
    button.addEventListener("click", () => navigate((p) => {
      p.delete("from"); p.delete("to"); p.delete("interval"); p.set("range", button.dataset.range);
    }));
  }
  $("custom").addEventListener("submit", (e) => {
    e.preventDefault();
    const from = $("from").value, to = $("to").value;
    if (!from || !to) return;
    navigate((p) => { p.delete("range"); p.delete("interval"); p.set("from", from); p.set("to", to); });
  });
  for (const button of $("intervals").querySelectorAll("button")) {
    button.addEventListener("click", () => navigate((p) => p.set("interval", button.dataset.interval)));
  }
  function drawControls() {
    const range = params.get("from") ? null : (params.get("range") || "7d");
    for (const b of $("ranges").querySelectorAll("button")) b.setAttribute("aria-pressed", String(b.dataset.range === range));
    $("from").value = (params.get("from") || "").slice(0, 10);
    $("to").value = (params.get("to") || "").slice(0, 10);
    const each = interval();
    for (const b of $("intervals").querySelectorAll("button")) {
      b.setAttribute("aria-pressed", String(b.dataset.interval === each));
      b.disabled = b.dataset.interval === "hour" && spanDays() > HOUR_LIMIT_DAYS;
    }
    const chips = [];
    for (const [key, value] of params) {
      if (!FILTERS.includes(key) && !key.startsWith("prop.") && !key.startsWith("trait.")) continue;
      const chip = el("button", { type: "button", class: "chip", title: "Remove this filter", "data-filter": key },
        key + ": " + clean(value) + " ×");
      chip.addEventListener("click", () => navigate((p) => p.delete(key)));
      chips.push(chip);
    }
    $("chips").replaceChildren(...chips);
  }

  // -- the numbers -------------------------------------------------------------------------------------
  function drawCards(overview) {
    const previous = overview.previous;
    const cards = CARDS.map(([label, field, kind, lowerIsBetter]) => {
      const [text, direction] = change(overview[field], previous[field], previous.events);
      const good = lowerIsBetter ? { up: "down", down: "up" }[direction] || "" : direction;
      return el("div", { class: "card", "data-card": field },
        el("h3", {}, label),
        el("span", { class: "value", "data-value": String(overview[field]) }, format(overview[field], kind)),
        el("span", { class: "change " + good, "data-change": text }, text || "\u00a0"));
    });
    const top = overview.top_event;
    cards.push(el("div", { class: "card", "data-card": "top_event" }, el("h3", {}, "Top event"),
      el("span", { class: "value name", "data-value": top ? top.event : "" }, top ? clean(top.event) : "–"),
      el("span", { class: "change" }, top ? format(top.count, "count") : "\u00a0")));
    $("cards").replaceChildren(...cards);
    $("live-count").textContent = format(overview.live_visitors, "count");
    $("live-count").dataset.value = String(overview.live_visitors);
    $("live").hidden = false;
  }

  const SVG = "http://www.w3.org/2000/svg";
  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function label(start, each) {
    const day = start.slice(5, 10).replace("-", "/");
    return each === "hour" ? start.slice(11, 16) : day;
  }
  let drawn = null; // the series on the chart, drawn again when its width changes (a window resized, a scrollbar)
  let drawnWidth = 0;
  new ResizeObserver(() => { if (drawn && $("chart").clientWidth !== drawnWidth) drawChart(drawn); }).observe($("chart"));
  function drawChart(series) {
    drawn = series;
    drawnWidth = $("chart").clientWidth;
    const W = Math.max(240, drawnWidth || 800), H = 220, left = 44, right = 12, top = 10, bottom = 24;
    const now = series.buckets, before = series.previous;
    const most = Math.max(1, ...now.map((b) => b.events), ...before.map((b) => b.events));
    const step = Math.pow(10, Math.floor(Math.log10(most)));
    const ceiling = Math.ceil(most / step) * step;
    const x = (i) => left + (now.length < 2 ? (W - left - right) / 2 : i * (W - left - right) / (now.length - 1));
    const y = (v) => top + (H - top - bottom) * (1 - v / ceiling);
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img",
      "aria-label": "events per " + series.interval });
    for (let i = 0; i <= 4; i++) {
      const v = ceiling * i / 4;
      root.append(svg("line", { class: "grid", x1: left, x2: W - right, y1: y(v), y2: y(v) }),
        svg("text", { class: "axis", x: left - 6, y: y(v) + 4, "text-anchor": "end" }, format(v, "decimal")));
    }
    const line = (rows) => rows.map((b, i) => (i ? "L" : "M") + x(i).toFixed(1) + " " + y(b.events).toFixed(1)).join(" ");
    if (now.length) {
      root.append(svg("path", { class: "area", d: line(now) + ` L${x(now.length - 1)} ${y(0)} L${x(0)} ${y(0)} Z` }));
      root.append(svg("path", { class: "before", d: line(before.slice(0, now.length)), "data-series": "previous" }));
      root.append(svg("path", { class: "now", d: line(now), "data-series": "current" }));
    }
    const ticks = Math.max(1, Math.ceil(now.length / Math.max(2, Math.floor(W / 90))));
    const width = (W - left - right) / Math.max(1, now.length);
    now.forEach((b, i) => {
      if (i % ticks === 0) {
        const anchor = i === 0 && now.length > 1 ? "start" : i === now.length - 1 ? "end" : "middle";
        root.append(svg("text", { class: "axis", x: x(i), y: H - 6, "text-anchor": anchor }, label(b.start, series.interval)));
      }
      const hit = svg("rect", { class: "hit", x: x(i) - width / 2, y: top, width, height: H - top - bottom,
        "data-start": b.start, "data-events": b.events, "data-previous": before[i] ? before[i].events : 0 });
      hit.append(svg("title", {}, `${b.start.slice(0, 16).replace("T", " ")}: ${format(b.events, "count")} events, ` +
        `${format(b.unique_users, "count")} visitors (before: ${format(before[i] ? before[i].events : 0, "count")})`));
      root.append(hit);
    });
    $("chart").replaceChildren(root);
    $("chart-title").textContent = params.get("event") ? "Events: " + clean(params.get("event")) : "Events";
  }

  function drawTop(answer) {
    const most = Math.max(1, ...answer.rows.map((r) => r.count));
    $("top").replaceChildren(...answer.rows.map((row) => {
      const button = el("button", { type: "button", title: "Show only this event" },
        el("span", { class: "fill" }),
        el("span", { class: "row" }, el("span", { class: "name" }, clean(row.value)),
          el("span", { class: "num" }, format(row.count, "count"))));
      button.firstChild.style.width = (100 * row.count / most).toFixed(1) + "%";
      button.addEventListener("click", () => addFilter("event", row.value));
      return el("li", { "data-value": row.value, "data-count": row.count, "data-users": row.unique_users }, button);
    }));
    if (!answer.rows.length) $("top").replaceChildren(el("li", { class: "muted" }, "No events in this window."));
  }

  function tab() {
    const chosen = TABS.find((t) => t[0] === params.get("tab"));
    return chosen || TABS[0];
  }
  function drawTabs() {
    const current = tab();
    $("tabs").replaceChildren(...TABS.map((t) => {
      const b = el("button", { type: "button", role: "tab", "aria-pressed": String(t === current), "data-tab": t[1] + (t[2] ? ":" + t[2] : "") }, t[0]);
      b.addEventListener("click", () => navigate((p) => p.set("tab", t[0])));
      return b;
    }));
  }
  function drawBreakdown(t, answer) {
    const goals = t[1] === "goals";
    const heads = goals ? ["Goal", "Visitors", "Events", "Rate"] : [t[0].replace(/s$/, "").replace(/^OS$/, "OS"), "Visitors", t[4]];
    $("breakdown").tHead.rows[0].replaceChildren(...heads.map((h, i) => el("th", { class: i ? "num" : "" }, h)));
    const rows = answer.rows.map((row) => {
      const value = goals ? row.goal : row.value;
      const shown = row.label ? row.label + " (" + value + ")" : value;
      const key = goals ? (row.kind === "event" ? "event" : row.goal.endsWith("*") ? null : "path") : t[3];
      const name = key && value !== null ? el("button", { type: "button", title: "Filter on this value" }, clean(shown)) : clean(shown);
      if (typeof name !== "string") name.addEventListener("click", () => addFilter(key, value));
      const cells = goals ? [row.visitors, row.events, format(row.conversion_rate, "rate")] : [row.unique_users, row.count];
      return el("tr", { "data-value": value === null ? "" : value, "data-count": goals ? row.events : row.count,
        "data-users": goals ? row.visitors : row.unique_users },
        el("td", { class: "name" }, name), ...cells.map((c) => el("td", { class: "num" }, typeof c === "number" ? format(c, "count") : c)));
    });
    if (!rows.length) rows.push(el("tr", {}, el("td", { class: "muted", colspan: heads.length }, "Nothing in this window.")));
    $("breakdown").tBodies[0].replaceChildren(...rows);
  }

  async function load() {
    const mine = ++generation;
    clearTimeout(refreshTimer);
    drawControls();
    drawTabs();
    const base = API + projectId + "/";
    const q = windowQuery();
    const t = tab();
    const series = new URLSearchParams(q);
    series.set("interval", interval());
    const rows = new URLSearchParams(q);
    if (t[2]) rows.set("dimension", t[2]);
    document.body.dataset.state = "loading";
    try {
      const [overview, timeseries] = await Promise.all([get(base + "overview", q), get(base + "timeseries", series)]);
      if (mine !== generation) return;
      drawCards(overview);
      drawChart(timeseries);
      if (window.pulseFirstPaint === undefined) window.pulseFirstPaint = performance.now();
      const [top, breakdown] = await Promise.all([get(base + "top-events", q), get(base + t[1], rows)]);
      if (mine !== generation) return;
      drawTop(top);
      drawBreakdown(t, breakdown);
      showError("");
      document.body.dataset.state = "ready";
      if (!params.get("from")) refreshTimer = setTimeout(() => { if (!document.hidden) load(); else refreshTimer = setTimeout(load, REFRESH_MS); }, REFRESH_MS);
    } catch (error) {
      if (mine !== generation) return;
      document.body.dataset.state = "failed";
      fail(error);
    }
  }

  // -- the live feed -----------------------------------------------------------------------------------
  function stopFeed() {
    if (feed) { feed.onclose = null; feed.close(); feed = null; }
  }
  function feedState(text, away) {
    $("feed-state").textContent = text;
    $("feed-state").dataset.state = away ? "away" : "open";
    $("live").classList.toggle("away", !!away);
  }
  function openFeed(attempt) {
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    const socket = new WebSocket(scheme + location.host + "/api/v1/ws/events/" + projectId, [BEARER_PROTOCOL, token()]);
    feed = socket;
    feedState("connecting…", true);
    socket.onopen = () => { attempt = 0; };
    socket.onmessage = (message) => {
      const body = JSON.parse(message.data);
      if (body.type === "hello") feedState("waiting for events", false);
      if (body.type !== "events") return;
      feedState("", false);
      const list = $("feed");
      for (const item of body.events) {
        const time = new Date(item.ts).toTimeString().slice(0, 8);
        list.prepend(el("li", {}, el("span", { class: "time" }, time), el("span", { class: "name" }, clean(item.event)),
          el("span", { class: "name muted" }, clean(item.path || ""))));
      }
      while (list.children.length > FEED_ROWS) list.lastChild.remove();
    };
    socket.onclose = (event) => {
      feed = null;
      if (event.code === CLOSE_TOKEN_REVOKED) {
        feedState("closed: access was revoked", true);
        $("feed").dataset.closed = "revoked";
        load(); // the numbers are refused too: the page says so
        return;
      }
      feedState("reconnecting…", true);
      setTimeout(() => { if (!revoked && !feed) openFeed(attempt + 1); }, Math.min(30000, 1000 * 2 ** attempt));
    };
  }

  // -- without a project: the projects the token sees ---------------------------------------------------
  async function listProjects() {
    try {
      const answer = await get("/api/v1/projects", "");
      if (answer.projects.length === 1) { location.replace("/dashboard/" + answer.projects[0].id + location.hash); return; }
      $("projects").replaceChildren(el("h2", {}, "Projects"), ...answer.projects.map((p) =>
        el("a", { href: "/dashboard/" + p.id }, clean(p.name) + " · " + format(p.events_today, "count") + " events today")));
      $("projects").hidden = false;
    } catch (error) {
      fail(error);
    }
  }

  async function start() {
    if (!token()) { login(); return; }
    if (!projectId) { listProjects(); return; }
    $("board").hidden = false;
    get("/api/v1/projects", "").then((answer) => {
      const found = answer.projects.find((p) => String(p.id) === projectId);
      if (found) { $("project").textContent = clean(found.name); document.title = "pulse · " + clean(found.name); }
    }, () => {});
    await load();
    if (!revoked && $("login").hidden && !feed) openFeed(0);
  }
  start();
})();
