/*! pulse tracker: page views, events and identify for a self-hosted pulse server; no cookies */
(function (w, d) {
  "use strict";
  var script = d.currentScript;
  var key = script && script.getAttribute("data-project");
  if (!key || (w.pulse && w.pulse.flush && !w.pulse.q)) return;  // loaded already (a stub has q)
  var attr = function (name) { return script.hasAttribute(name); };
  var nav = navigator, loc = w.location;
  var api = (script.getAttribute("data-api") || new URL(script.src).origin) + "/api/v1/events/ingest?key=" + key;
  var off = (attr("data-respect-dnt") && (nav.doNotTrack == "1" || nav.globalPrivacyControl)) ||
    (/^(localhost|127\.|\[::1\]$)/.test(loc.hostname) && !attr("data-allow-localhost"));
  var queue = [], timer = 0, lastUrl;
  var HALF_HOUR = 18e5, ANON = "pulse_anon", USER = "pulse_user", SESSION = "pulse_session";

  function store(area, name, value) {
    try {
      if (value === undefined) return w[area].getItem(name);
      if (value === null) w[area].removeItem(name); else w[area].setItem(name, value);
    } catch (e) {}
  }

  // a UUIDv7: time first, so the server's index stays in order
  function uuid() {
    var time = Date.now().toString(16).padStart(12, "0"), bytes = crypto.getRandomValues(new Uint8Array(10)), hex = "";
    for (var i = 0; i < 10; i++) hex += (bytes[i] | 256).toString(16).slice(1);
    return time.slice(0, 8) + "-" + time.slice(8) + "-7" + hex.slice(1, 4) + "-" +
      (8 | bytes[2] & 3).toString(16) + hex.slice(5, 8) + "-" + hex.slice(8);
  }

  function anonymous() {
    var id = store("localStorage", ANON);
    if (!id) store("localStorage", ANON, id = uuid());
    return id;
  }

  function session() {
    var now = Date.now(), saved = (store("sessionStorage", SESSION) || "").split("|");
    var id = saved[1] && now - saved[1] < HALF_HOUR ? saved[0] : uuid();
    store("sessionStorage", SESSION, id + "|" + now);
    return id;
  }

  function track(name, props, extra) {
    if (off) return;
    var body = {
      event: String(name), uuid: uuid(), distinct_id: store("localStorage", USER) || anonymous(),
      session_id: session(), page_url: loc.href, timestamp: Date.now(),
      screen_width: w.screen.width, language: nav.language,
      properties: Object.assign({$timezone: Intl.DateTimeFormat().resolvedOptions().timeZone}, props)
    };
    if (d.referrer) body.referrer = d.referrer;
    queue.push(Object.assign(body, extra));
    if (queue.length >= 10) flush();
    else if (!timer) timer = setTimeout(flush, 2000);
  }

  function send(events, attempt) {
    fetch(api, {
      method: "POST", keepalive: true, headers: {"Content-Type": "text/plain"},
      body: JSON.stringify({events: events, sent_at: Date.now()})
    }).then(function (response) {
      if (response.status == 429 || response.status > 499) retry(events, attempt, response.headers.get("Retry-After"));
    }, function () { retry(events, attempt); });
  }

  function retry(events, attempt, after) {
    if (attempt < 2) setTimeout(function () { send(events, attempt + 1); }, Math.max(after * 1e3 || 0, 1e3 << attempt));
  }

  function flush(beacon) {
    clearTimeout(timer);
    timer = 0;
    if (!queue.length) return;
    var events = queue.splice(0);
    if (!(beacon && nav.sendBeacon && nav.sendBeacon(api, JSON.stringify({events: events, sent_at: Date.now()}))))
      send(events, 0);
  }

  function page() {
    if (loc.href != lastUrl) track("page_view", {path: loc.pathname}), lastUrl = loc.href;
  }

  var pulse = {
    event: function (name, props) { track(name, props); },
    page: page,
    flush: function () { flush(); },
    identify: function (id, traits) {
      var before = store("localStorage", USER) || anonymous();
      store("localStorage", USER, id = String(id));
      track("$identify", null, {anon_id: before != id ? before : undefined, traits: traits});
    },
    reset: function () {
      store("localStorage", USER, null);
      store("localStorage", ANON, null);
      store("sessionStorage", SESSION, null);
    }
  };
  // never throw into the page
  Object.keys(pulse).forEach(function (name) {
    var method = pulse[name];
    pulse[name] = function () { try { return method.apply(null, arguments); } catch (e) {} };
  });
  var waiting = (w.pulse && w.pulse.q) || [];
  w.pulse = pulse;

  ["pushState", "replaceState"].forEach(function (name) {
    var original = history[name];
    history[name] = function () { var result = original.apply(this, arguments); pulse.page(); return result; };
  });
  w.addEventListener("popstate", pulse.page);
  d.addEventListener("visibilitychange", function () { if (d.visibilityState == "hidden") flush(1); });
  w.addEventListener("pagehide", function () { flush(1); });
  pulse.page();
  waiting.forEach(function (call) { pulse[call[0]] && pulse[call[0]].apply(null, call.slice(1)); });
})(window, document);
