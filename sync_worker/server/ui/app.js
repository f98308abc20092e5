/* sync-worker dashboard. Plain JavaScript, no library, no build step.
 *
 * Rule: nothing that comes from the server is ever parsed as HTML. Every element is made with
 * document.createElement and every text goes in through a text node (see el()); there is no
 * innerHTML, insertAdjacentHTML or document.write in this file. Links to runs are built from
 * encodeURIComponent(id).
 *
 * Routes are hash routes (#/, #/runs?state=FAILED, #/runs/<id>): real links that work on reload.
 * Each view polls its one JSON endpoint every POLL_MS (the next poll is scheduled when the
 * previous one has finished, so a slow server is never asked twice at once); a poll that has no
 * answer within FETCH_TIMEOUT_MS gives up and says so (a stopped server keeps the connection open).
 *
 * User data (names, task keys, parameters, messages) goes through shown(): the characters that
 * change how text is laid out rather than what it says (U+202E turns "gpj.exe" into "exe.jpg")
 * are shown as their \u escape.
 */
(function () {
  "use strict";

  var POLL_MS = 2000;
  // a poll with no answer by then is given up: the banner says the server cannot be reached.
  // window.syncWorkerFetchTimeoutMs overrides it (the tests, which do not wait 10 s)
  var FETCH_TIMEOUT_MS = 10000;
  // format and control characters: bidi overrides, embeddings, isolates and marks, and the C0 and
  // C1 controls but tab, newline and carriage return (a traceback's lines)
  var CONTROL = /[\u0000-\u0008\u000B\u000C\u000E-\u001F\u007F-\u009F\u061C\u200E\u200F\u202A-\u202E\u2066-\u2069]/g;
  // names longer than this get a tooltip with the whole of them: the page may cut them (CSS .cut)
  var LONG = 80;
  var STATE_ORDER = ["SCHEDULED", "PENDING", "RUNNING", "CANCELLING", "PAUSED", "COMPLETED", "FAILED",
    "CRASHED", "CANCELLED"];
  // a symbol and a word for every state: never colour alone
  var STATE_MARK = {
    SCHEDULED: "\u25F7", PENDING: "\u25F7", PAUSED: "\u2016", RUNNING: "\u25B6", CANCELLING: "\u25A0",
    COMPLETED: "\u2713", FAILED: "\u2717", CRASHED: "\u2717", CANCELLED: "\u2300"
  };
  var ACTIVE = { SCHEDULED: 1, PENDING: 1, RUNNING: 1, PAUSED: 1 };
  var FINISHED = { COMPLETED: 1, FAILED: 1, CANCELLED: 1, CRASHED: 1 };
  var RANGES = [["", "any time"], ["15m", "last 15 minutes"], ["1h", "last hour"], ["24h", "last 24 hours"],
    ["7d", "last 7 days"]];
  var RANGE_SECONDS = { "15m": 900, "1h": 3600, "24h": 86400, "7d": 604800 };

  var main = document.getElementById("main");
  var banner = document.getElementById("banner");
  var updated = document.getElementById("updated");
  var timer = null;
  var generation = 0; // bumped at every navigation: late answers of the previous view are dropped
  var lastSuccess = null;

  // -- DOM helpers -------------------------------------------------------------------------------
  function el(tag, attrs) {
    var node = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (name) {
        var value = attrs[name];
        if (value === null || value === undefined || value === false) return;
        if (name === "text") node.textContent = String(value);
        else node.setAttribute(name, value === true ? "" : String(value));
      });
    }
    for (var i = 2; i < arguments.length; i++) append(node, arguments[i]);
    return node;
  }

  function append(node, child) {
    if (child === null || child === undefined || child === false) return;
    if (Array.isArray(child)) { child.forEach(function (c) { append(node, c); }); return; }
    node.appendChild(typeof child === "object" ? child : document.createTextNode(String(child)));
  }

  function svg(tag, attrs) {
    var node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    Object.keys(attrs || {}).forEach(function (name) { node.setAttribute(name, String(attrs[name])); });
    return node;
  }

  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

  function escapeOf(ch) { return "\\u" + ("000" + ch.charCodeAt(0).toString(16)).slice(-4); }

  // user data as text nodes, its control characters as their escape in a span of their own
  // (class "control"), so that they can be seen and cannot turn the text around them
  function shown(value) {
    var text = String(value), parts = [], last = 0;
    text.replace(CONTROL, function (ch, at) {
      if (at > last) parts.push(text.slice(last, at));
      parts.push(el("span", { "class": "control", title: "U+" + escapeOf(ch).slice(2).toUpperCase() +
        ": a control character, shown as its escape" }, escapeOf(ch)));
      last = at + 1;
      return ch;
    });
    if (last < text.length || !parts.length) parts.push(text.slice(last));
    return parts;
  }

  // the same for where there can be no markup: attributes, the window's title
  function plain(value) { return String(value).replace(CONTROL, escapeOf); }

  // a name that may be very long (up to 2,000 characters, no space): cut to a few lines (.cut)
  // with the whole of it in the tooltip, so that it cannot push the buttons or the table away
  function longName(tag, attrs, value) {
    attrs = attrs || {};
    attrs["class"] = "cut" + (attrs["class"] ? " " + attrs["class"] : "");
    if (String(value).length > LONG) attrs.title = plain(value);
    return el(tag, attrs, shown(value));
  }

  function stateLabel(type, name) {
    var text = (STATE_MARK[type] || "\u2022") + " " + (name || type || "unknown");
    if (name && type && name.toUpperCase() !== type) text += " (" + type + ")";
    return el("span", { "class": "state state-" + (type || "UNKNOWN"), "data-state": type || "" }, shown(text));
  }

  function runHref(id) { return "#/runs/" + encodeURIComponent(id); }

  function pad(n) { return (n < 10 ? "0" : "") + n; }

  function when(iso) {
    if (!iso) return "\u2013";
    var d = new Date(iso);
    if (isNaN(d.getTime())) return String(iso);
    return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " + pad(d.getHours()) + ":" +
      pad(d.getMinutes()) + ":" + pad(d.getSeconds());
  }

  // the browser's offset from UTC, e.g. "UTC+02:00" (the CLI prints UTC; the page says which zone it shows)
  function zone(date) {
    var minutes = -(date || new Date()).getTimezoneOffset();
    if (!minutes) return "UTC";
    var sign = minutes < 0 ? "-" : "+";
    minutes = Math.abs(minutes);
    return "UTC" + sign + pad(Math.floor(minutes / 60)) + ":" + pad(minutes % 60);
  }

  function utcTitle(iso) {
    var d = new Date(iso);
    return isNaN(d.getTime()) ? String(iso) : d.toISOString().replace("T", " ").replace(/(\.\d+)?Z$/, " UTC");
  }

  // local time; the column header says the zone, the title gives the time in UTC
  function timeCell(iso) {
    return el("time", { datetime: iso || null, title: iso ? utcTitle(iso) : null }, when(iso));
  }

  // a run's run time: the time it spent RUNNING or CANCELLING over all its attempts, not the
  // waits for a retry between them (the server sums its states: rt.seconds), plus, while it is
  // RUNNING or CANCELLING, the time since that state began (rt.since), refreshed at every poll
  // (refreshElapsed); "-" for a run that never ran
  function runTimeCell(rt) {
    if (!rt) return "\u2013";
    if (rt.since && !isNaN(new Date(rt.since).getTime())) {
      return el("span", { "data-since": rt.since, "data-base": rt.seconds || 0,
        title: "running: its time so far" }, elapsedText(rt.since, rt.seconds));
    }
    return seconds(rt.seconds || 0);
  }

  function elapsedText(sinceIso, base) {
    return seconds((Number(base) || 0) + Math.max(0, (Date.now() - new Date(sinceIso).getTime()) / 1000));
  }

  function refreshElapsed() {
    Array.prototype.forEach.call(main.querySelectorAll("[data-since]"), function (node) {
      node.textContent = elapsedText(node.getAttribute("data-since"), node.getAttribute("data-base"));
    });
  }

  function seconds(value) {
    if (value === null || value === undefined) return "\u2013";
    if (value < 1) return (value * 1000).toFixed(0) + " ms";
    if (value < 120) return value.toFixed(value < 10 ? 2 : 1) + " s";
    if (value < 7200) return (value / 60).toFixed(1) + " min";
    if (value < 172800) return (value / 3600).toFixed(1) + " h";
    return (value / 86400).toFixed(1) + " d";
  }

  // -- the server --------------------------------------------------------------------------------
  function ApiError(status, message) { this.status = status; this.message = message; }

  function fetchTimeout() {
    var ms = Number(window.syncWorkerFetchTimeoutMs);
    return ms > 0 ? ms : FETCH_TIMEOUT_MS;
  }

  // a GET (a poll) is given up after fetchTimeout(): a server that is stopped (SIGSTOP) or hung
  // keeps the connection open and would leave the page showing old data as current, forever.
  // A POST (a button) is not: giving up would not undo what the server may still do
  function api(path, options) {
    options = options || {};
    var init = { method: options.method || "GET", credentials: "same-origin", cache: "no-store",
      headers: { "Accept": "application/json" } };
    if (options.body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(options.body);
    }
    var limit = init.method === "GET" && window.AbortController ? fetchTimeout() : 0;
    var timedOut = false, abort = null;
    if (limit) {
      var controller = new AbortController();
      init.signal = controller.signal;
      abort = setTimeout(function () { timedOut = true; controller.abort(); }, limit);
    }
    function lost(error) { // no answer, or not all of it: the server cannot be reached
      throw new ApiError(0, timedOut ? "no answer within " + limit / 1000 + " s"
        : String(error && error.message ? error.message : error));
    }
    // an absolute URL without user:password@ (a page opened as http://user:pw@host/ may not fetch
    // relative URLs); the browser adds the credentials it has for this origin itself
    var url = location.protocol + "//" + location.host + location.pathname.replace(/[^/]*$/, "") + path;
    return fetch(url, init).then(function (response) {
      return response.text().then(function (text) {
        var body = null;
        try { body = text ? JSON.parse(text) : null; } catch (e) { body = null; }
        if (!response.ok) {
          var detail = body && body.detail ? body.detail : (text || response.statusText);
          if (typeof detail !== "string") detail = JSON.stringify(detail);
          if (response.status === 401) detail = "the server asks for its auth string again: reload the page";
          throw new ApiError(response.status, response.status + ": " + detail);
        }
        return body;
      }, lost);
    }, lost).then(function (body) {
      if (abort) clearTimeout(abort);
      return body;
    }, function (error) {
      if (abort) clearTimeout(abort);
      throw error;
    });
  }

  // redraw(box, draw): draw() rebuilds box's content; what the user had is kept where it can
  // be: the page's scroll, the scroll of the boxes (pre, tables) and the focus on the same link
  function keyOf(node) {
    return node.tagName + "|" + (node.id || "") + "|" + (node.getAttribute("href") || "") + "|" + node.textContent;
  }

  function redraw(box, draw) {
    var pageX = window.pageXOffset, pageY = window.pageYOffset;
    var scrolled = [];
    Array.prototype.forEach.call(box.querySelectorAll("pre, .scroll, .clamp"), function (node, i) {
      if (node.scrollTop || node.scrollLeft) scrolled.push([node.id || i, node.scrollTop, node.scrollLeft]);
    });
    var active = document.activeElement;
    var focusKey = active && active !== document.body && box.contains(active) ? keyOf(active) : null;
    draw();
    var boxes = box.querySelectorAll("pre, .scroll, .clamp");
    scrolled.forEach(function (s) {
      var node = typeof s[0] === "string" ? document.getElementById(s[0]) : boxes[s[0]];
      if (node && box.contains(node)) { node.scrollTop = s[1]; node.scrollLeft = s[2]; }
    });
    if (focusKey && (!document.activeElement || document.activeElement === document.body ||
        !box.contains(document.activeElement))) {
      var candidates = box.querySelectorAll("a, button, input, select, textarea, [tabindex]");
      for (var i = 0; i < candidates.length; i++) {
        if (keyOf(candidates[i]) === focusKey) {
          try { candidates[i].focus({ preventScroll: true }); } catch (e) { candidates[i].focus(); }
          break;
        }
      }
    }
    window.scrollTo(pageX, pageY);
  }

  function reachable() {
    lastSuccess = new Date();
    banner.hidden = true;
    clear(banner);
    updated.textContent = "Updated " + when(lastSuccess.toISOString()) + " " + zone(lastSuccess);
  }

  function unreachable(error) {
    clear(banner);
    banner.setAttribute("data-status", String(error.status));
    if (error.status === 0) {
      append(banner, shown("Cannot reach the sync-worker server at " + location.host + " (" + error.message + "). " +
        (lastSuccess ? "Showing what it said at " + when(lastSuccess.toISOString()) + "; " : "") +
        "retrying every " + POLL_MS / 1000 + " s."));
    } else {
      append(banner, shown("The server answered " + error.message)); // it may quote the address
    }
    banner.hidden = false;
  }

  // poll(load, render): load() returns a promise of data; render(data) draws it, only when the
  // data differs from what was drawn last (a finished run is drawn once: the user's selection,
  // scroll and focus stay); the running times are refreshed at every poll
  function poll(load, render, always, failed) {
    var mine = generation;
    var drawn = null;
    function tick() {
      timer = null;
      load().then(function (data) {
        if (mine !== generation) return;
        reachable();
        var text = JSON.stringify(data);
        if (text !== drawn) {
          render(data);
          drawn = text;
        }
        if (always) always(data);
        refreshElapsed();
      }, function (error) {
        if (mine !== generation) return;
        unreachable(error);
        if (failed) failed(error);
      }).then(function () {
        if (mine === generation) timer = setTimeout(tick, POLL_MS);
      });
    }
    tick();
  }

  // -- routing -----------------------------------------------------------------------------------
  function parseHash() {
    var hash = location.hash.replace(/^#/, "") || "/";
    var q = hash.indexOf("?");
    var path = q < 0 ? hash : hash.slice(0, q);
    var params = new URLSearchParams(q < 0 ? "" : hash.slice(q + 1));
    return { path: path, params: params };
  }

  // the current view's polls stop: its late answers are dropped, no next poll is scheduled
  function stopPolling() {
    generation++;
    if (timer) { clearTimeout(timer); timer = null; }
  }

  function route() {
    stopPolling();
    var r = parseHash();
    clear(main);
    // an error the server gave the previous page is not about this one (a lost connection is)
    if (!banner.hidden && banner.getAttribute("data-status") !== "0") { banner.hidden = true; clear(banner); }
    var runMatch = /^\/runs\/([^/]+)$/.exec(r.path);
    document.getElementById("nav-overview").removeAttribute("aria-current");
    document.getElementById("nav-runs").removeAttribute("aria-current");
    var runId = null;
    if (runMatch) {
      try { runId = decodeURIComponent(runMatch[1]); } catch (e) { runId = null; } // e.g. #/runs/%E0%A4%A
    }
    if (runMatch && runId === null) {
      document.getElementById("nav-runs").setAttribute("aria-current", "page");
      notFound("This address is not valid: a % in it is not followed by a valid escape.");
    } else if (runMatch) {
      document.getElementById("nav-runs").setAttribute("aria-current", "page");
      runView(runId);
    } else if (r.path === "/runs" || r.path === "/runs/") {
      document.getElementById("nav-runs").setAttribute("aria-current", "page");
      runsView(r.params);
    } else if (r.path === "/") {
      document.getElementById("nav-overview").setAttribute("aria-current", "page");
      overviewView();
    } else { // a page that does not exist says so: not an overview that looks like an answer
      notFound(["No page has the address #", shown(r.path), "."]);
    }
  }

  function notFound(why) {
    document.title = "Not found \u2013 sync-worker";
    append(main, [el("h1", { id: "not-found" }, "Not found"), el("p", { id: "not-found-why" }, why),
      el("p", null, el("a", { href: "#/" }, "Overview"), " \u00B7 ", el("a", { href: "#/runs" }, "All runs"))]);
  }

  // -- Overview ----------------------------------------------------------------------------------
  function overviewView() {
    document.title = "Overview \u2013 sync-worker";
    var keys = el("div", { id: "task-keys" }, el("p", { "class": "note" }, "Loading\u2026"));
    var chart = el("div", { id: "throughput" });
    var workers = el("div", { id: "workers" });
    append(main, [el("h1", null, "Overview"), el("h2", null, "Task keys"), keys,
      el("div", { "class": "grid two" },
        el("section", null, el("h2", null, "Finished runs, last 15 minutes (per 10 s)"), chart),
        el("section", null, el("h2", { id: "workers-title" }, "Workers"), workers))]);
    poll(function () { return api("api/sync_worker/dashboard/overview"); }, function (data) {
      redraw(main, function () {
        renderKeys(keys, data);
        renderChart(chart, data.throughput);
        renderWorkers(workers, data.workers);
      });
    });
  }

  function renderKeys(box, data) {
    clear(box);
    if (!data.task_keys.length) {
      append(box, el("p", { "class": "note" }, "No task runs yet."));
      return;
    }
    var present = STATE_ORDER.filter(function (type) {
      return data.task_keys.some(function (k) { return k.counts[type]; });
    });
    var head = el("tr", null, el("th", { scope: "col" }, "Task key"),
      present.map(function (type) { return el("th", { scope: "col", "class": "num" }, stateLabel(type)); }),
      el("th", { scope: "col", "class": "num" }, "Total"), el("th", { scope: "col" }, "Oldest waiting"));
    var rows = data.task_keys.map(function (k) {
      var query = "#/runs?task_key=" + encodeURIComponent(k.task_key);
      return el("tr", { "data-task-key": k.task_key },
        el("th", { scope: "row", "class": "name" }, longName("a", { href: query }, k.task_key)),
        present.map(function (type) {
          var n = k.counts[type] || 0;
          return el("td", { "class": "num", "data-state": type },
            n ? el("a", { href: query + "&state=" + type,
              "aria-label": n + " " + type + " runs of " + plain(k.task_key) },
              String(n)) : "0");
        }),
        el("td", { "class": "num", "data-total": "" }, String(k.total)),
        el("td", null, k.oldest_scheduled_id
          ? el("a", { href: runHref(k.oldest_scheduled_id), title: k.oldest_scheduled },
            "waiting " + seconds(k.oldest_scheduled_age_seconds))
          : "\u2013"));
    });
    append(box, el("div", { "class": "scroll" }, el("table", { id: "task-key-table" }, el("thead", null, head),
      el("tbody", null, rows))));
  }

  function renderChart(box, t) {
    clear(box);
    var n = t.completed.length;
    var max = 1;
    var sumDone = 0, sumFailed = 0;
    for (var i = 0; i < n; i++) {
      max = Math.max(max, t.completed[i] + t.failed[i]);
      sumDone += t.completed[i];
      sumFailed += t.failed[i];
    }
    var W = 720, H = 180, left = 40, bottom = 20, top = 10;
    var bw = (W - left - 4) / n;
    var scale = (H - bottom - top) / max;
    var summary = sumDone + " completed and " + sumFailed + " failed in the last 15 minutes";
    var s = svg("svg", { "class": "chart", viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": summary });
    var defs = svg("defs");
    var pattern = svg("pattern", { id: "hatch", width: 5, height: 5, patternUnits: "userSpaceOnUse",
      patternTransform: "rotate(45)" });
    pattern.appendChild(svg("rect", { width: 2, height: 5, fill: "#b3261e" }));
    defs.appendChild(pattern);
    s.appendChild(defs);
    s.appendChild(svg("line", { "class": "axis", x1: left, y1: H - bottom, x2: W, y2: H - bottom }));
    var yTop = svg("text", { x: left - 6, y: top + 8, "text-anchor": "end" });
    yTop.textContent = String(max);
    s.appendChild(yTop);
    var y0 = svg("text", { x: left - 6, y: H - bottom, "text-anchor": "end" });
    y0.textContent = "0";
    s.appendChild(y0);
    for (var j = 0; j < n; j++) {
      var x = left + j * bw;
      var hc = t.completed[j] * scale, hf = t.failed[j] * scale;
      var start = new Date(Date.parse(t.start) + j * t.bucket_seconds * 1000);
      if (hc > 0) {
        var rc = svg("rect", { "class": "completed", x: x.toFixed(2), y: (H - bottom - hc).toFixed(2),
          width: Math.max(bw - 1, 1).toFixed(2), height: hc.toFixed(2) });
        var tc = svg("title");
        tc.textContent = when(start.toISOString()) + ": " + t.completed[j] + " completed";
        rc.appendChild(tc);
        s.appendChild(rc);
      }
      if (hf > 0) {
        var rf = svg("rect", { "class": "failed", x: x.toFixed(2), y: (H - bottom - hc - hf).toFixed(2),
          width: Math.max(bw - 1, 1).toFixed(2), height: hf.toFixed(2) });
        var tf = svg("title");
        tf.textContent = when(start.toISOString()) + ": " + t.failed[j] + " failed";
        rf.appendChild(tf);
        s.appendChild(rf);
      }
    }
    [["-15 min", left], ["-10 min", left + (W - left) / 3], ["-5 min", left + 2 * (W - left) / 3], ["now", W - 24]]
      .forEach(function (tick) {
        var label = svg("text", { x: tick[1], y: H - 4 });
        label.textContent = tick[0];
        s.appendChild(label);
      });
    append(box, [s, el("p", { "class": "legend" },
      el("span", null, el("span", { "class": "swatch completed", "aria-hidden": "true" }), "completed (solid)"),
      el("span", null, el("span", { "class": "swatch failed", "aria-hidden": "true" }), "failed or crashed (hatched)")),
      el("p", { id: "throughput-summary" }, summary + ".")]);
  }

  function renderWorkers(box, workers) {
    clear(box);
    document.getElementById("workers-title").textContent = "Workers (" + workers.length + " connected)";
    if (!workers.length) {
      append(box, el("p", { "class": "note" }, "No worker is connected."));
      return;
    }
    var rows = workers.map(function (w) {
      return el("tr", { "data-client-id": w.client_id || "" },
        el("td", { "class": "name" }, w.client_id ? shown(w.client_id) : "\u2013"),
        el("td", null, w.host ? shown(w.host) : "\u2013"),
        el("td", { "class": "name" }, longName("span", null, (w.task_keys || []).join(", "))),
        el("td", { "class": "num" }, w.limit === null ? "\u2013" : String(w.limit)),
        el("td", { "class": "num" }, String(w.in_flight)), el("td", null, timeCell(w.connected_since)));
    });
    append(box, el("div", { "class": "scroll" }, el("table", { id: "worker-table" }, el("thead", null,
      el("tr", null, ["Client id", "Host", "Task keys", "Limit", "In flight", "Connected since (" + zone() + ")"]
        .map(function (h) {
        return el("th", { scope: "col" }, h);
      }))), el("tbody", null, rows))));
  }

  // -- Runs --------------------------------------------------------------------------------------
  function runsQuery(params) {
    var q = new URLSearchParams();
    ["state", "task_key", "since", "until", "before", "after"].forEach(function (name) {
      if (params.get(name)) q.set(name, params.get(name));
    });
    var range = params.get("range");
    if (RANGE_SECONDS[range] && !params.get("since")) {
      q.set("since", new Date(Date.now() - RANGE_SECONDS[range] * 1000).toISOString());
    }
    return q.toString();
  }

  // to the second (the inputs have step="1"); a field the user leaves as it is keeps the exact
  // time of the address (see runsView)
  function localInput(iso) {
    if (!iso) return "";
    var d = new Date(iso);
    if (isNaN(d.getTime())) return "";
    return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + "T" + pad(d.getHours()) + ":" +
      pad(d.getMinutes()) + ":" + pad(d.getSeconds());
  }

  function runsView(params) {
    document.title = "Runs \u2013 sync-worker";
    var state = el("select", { name: "state", id: "filter-state" }, el("option", { value: "" }, "any state"),
      STATE_ORDER.map(function (type) {
        return el("option", { value: type, selected: params.get("state") === type }, type);
      }));
    var key = el("input", { name: "task_key", id: "filter-task-key", type: "text", value: params.get("task_key") || "",
      placeholder: "any task key", autocomplete: "off", spellcheck: "false" });
    var range = el("select", { name: "range", id: "filter-range" }, RANGES.map(function (r) {
      return el("option", { value: r[0], selected: (params.get("range") || "") === r[0] }, r[1]);
    }));
    var since = el("input", { type: "datetime-local", id: "filter-since", step: "1",
      value: localInput(params.get("since")) });
    var until = el("input", { type: "datetime-local", id: "filter-until", step: "1",
      value: localInput(params.get("until")) });
    var initial = { since: since.value, until: until.value }; // what the fields showed for the address
    function timeValue(input, name) {
      if (params.get(name) && input.value === initial[name]) return params.get(name); // left as it was
      return new Date(input.value).toISOString();
    }
    var form = el("form", { "class": "filters", role: "search", "aria-label": "Filter runs" },
      el("label", null, "State", state), el("label", null, "Task key", key),
      el("label", null, "Created", range), el("label", null, "From (" + zone() + ")", since),
      el("label", null, "To (" + zone() + ")", until),
      el("button", { type: "submit", id: "filter-apply" }, "Apply"),
      el("a", { href: "#/runs" }, "Clear"));
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var q = new URLSearchParams();
      if (state.value) q.set("state", state.value);
      if (key.value) q.set("task_key", key.value); // as typed: a task key may begin or end with a space
      if (range.value) q.set("range", range.value);
      if (since.value) q.set("since", timeValue(since, "since"));
      if (until.value) q.set("until", timeValue(until, "until"));
      location.hash = "#/runs" + (q.toString() ? "?" + q.toString() : "");
    });
    var box = el("div", { id: "runs" }, el("p", { "class": "note" }, "Loading\u2026"));
    append(main, [el("h1", null, "Runs"), form, box]);
    poll(function () {
      var query = runsQuery(params); // at every poll: "the last 15 minutes" moves with the clock
      return api("api/sync_worker/dashboard/runs" + (query ? "?" + query : ""));
    }, function (data) { redraw(main, function () { renderRuns(box, data, params); }); }, null, function (error) {
      // a refused query (e.g. a hand-edited #/runs?state=BOGUS) will not load: say so, not "Loading..."
      if (error.status >= 400 && error.status < 500) {
        clear(box);
        append(box, el("p", { "class": "note", id: "runs-error" },
          shown("These filters cannot be shown: " + error.message)));
      }
    });
  }

  function pageHref(params, name, seq) {
    var q = new URLSearchParams();
    ["state", "task_key", "range", "since", "until"].forEach(function (p) {
      if (params.get(p)) q.set(p, params.get(p));
    });
    if (name) q.set(name, String(seq));
    return "#/runs" + (q.toString() ? "?" + q.toString() : "");
  }

  function renderRuns(box, data, params) {
    clear(box);
    var paging = params.get("before") || params.get("after");
    var summary = data.total === null ? "Not counted (runs of more than 500 task keys: the count would read every run)"
      : data.total + (data.total === 1 ? " run matches" : " runs match");
    var pager = el("nav", { "class": "pager", "aria-label": "Pages" },
      el("span", { id: "runs-total" }, summary),
      paging ? el("a", { href: pageHref(params), id: "page-newest" }, "\u00AB Newest") : null,
      data.newer !== null ? el("a", { href: pageHref(params, "after", data.newer), id: "page-newer", rel: "prev" },
        "\u2039 Newer") : null,
      data.older !== null ? el("a", { href: pageHref(params, "before", data.older), id: "page-older", rel: "next" },
        "Older \u203A") : null);
    if (!data.runs.length) {
      append(box, [pager, el("p", { "class": "note", id: "runs-empty" }, "No task runs match these filters.")]);
      return;
    }
    var rows = data.runs.map(function (r) {
      return el("tr", { "data-run-id": r.id },
        el("td", null, timeCell(r.created)),
        el("td", { "class": "name" }, longName("a", { href: runHref(r.id) }, r.name || r.id)),
        el("td", { "class": "name" }, longName("span", null, r.task_key)),
        el("td", null, stateLabel(r.state_type, r.state_name)),
        el("td", { "class": "num hide-narrow" }, String(r.run_count || 0)),
        el("td", { "class": "num hide-narrow" }, runTimeCell(r.run_time)),
        el("td", { "class": "id hide-narrow" }, el("a", { href: runHref(r.id) }, r.id)));
    });
    var head = el("tr", null, [["Created (" + zone() + ")", ""], ["Name", ""], ["Task key", ""], ["State", ""],
      ["Runs", "num hide-narrow"], ["Run time", "num hide-narrow"], ["Id", "hide-narrow"]].map(function (h) {
      return el("th", { scope: "col", "class": h[1] || null }, h[0]);
    }));
    append(box, [pager, el("div", { "class": "scroll" }, el("table", { id: "runs-table" }, el("thead", null, head),
      el("tbody", null, rows)))]);
  }

  // -- Run ---------------------------------------------------------------------------------------
  function runView(id) {
    document.title = "Run \u2013 sync-worker";
    var header = el("div", { id: "run-header" }, longName("h1", null, "Run " + id));
    var outcome = el("p", { "class": "outcome", id: "action-outcome", role: "status", "aria-live": "polite" });
    var cancel = el("button", { type: "button", id: "cancel-button", disabled: true }, "Cancel");
    var retry = el("button", { type: "button", id: "retry-button", disabled: true }, "Retry");
    var body = el("div", { id: "run-body" }, el("p", { "class": "note" }, "Loading\u2026"));
    append(main, [header, el("div", { "class": "actions" }, cancel, retry, outcome), body]);
    var path = "api/sync_worker/task_runs/" + encodeURIComponent(id);

    var busy = false;

    function act(button, url, describe) {
      busy = true;
      button.disabled = true;
      outcome.className = "outcome";
      outcome.textContent = button.textContent + "\u2026";
      api(url, { method: "POST", body: {} }).then(function (answer) {
        busy = false;
        clear(outcome);
        append(outcome, describe(answer));
      }, function (error) {
        busy = false;
        outcome.className = "outcome error";
        outcome.textContent = button.textContent + " failed: " + error.message;
        button.disabled = false;
      });
    }

    cancel.addEventListener("click", function () {
      act(cancel, path + "/cancel", function (answer) {
        var type = answer.task_run && answer.task_run.state ? answer.task_run.state.type : "";
        if (answer.status === "cancelled") return "Cancelled: the run is CANCELLED and will not run.";
        if (answer.status === "cancelling") {
          return "Cancelling: " + (answer.notified ? "its worker was told to stop it."
            : answer.held_by === "connection"
              ? "its worker cannot be told to stop it (not a sync_worker worker); the run ends as that worker reports."
              : "its worker's connection is gone; it ends CANCELLED when its lease runs out.");
        }
        return "Not cancelled: the run is already " + type + ".";
      });
    });
    retry.addEventListener("click", function () {
      act(retry, path + "/retry", function (answer) {
        return ["Retried: new run ", el("a", { href: runHref(answer.task_run.id), id: "retried-run" },
          answer.task_run.id), " (" + (answer.task_run.state ? answer.task_run.state.type : "") + ")."];
      });
    });

    poll(function () { return api("api/sync_worker/dashboard/runs/" + encodeURIComponent(id)); }, function (data) {
      var run = data.task_run;
      var st = run.state || {};
      document.title = plain(run.name || id) + " \u2013 sync-worker";
      redraw(main, function () {
        clear(header);
        append(header, [longName("h1", null, run.name || id),
          el("p", { "class": "run-state" }, "State: ", el("span", { id: "run-state" }, stateLabel(st.type, st.name))),
          st.message ? el("div", { "class": "note clamp", id: "run-message" }, shown(st.message)) : null]);
        renderRun(body, data);
      });
    }, function (data) { // at every poll, even when nothing changed: the buttons
      var st = data.task_run.state || {};
      // the server refuses to retry a COMPLETED run whose parameters record was deleted when it
      // completed (dashboard.retry_run); a run without parameters can be retried
      var gone = st.type === "COMPLETED" && data.parameters && data.parameters.value === null &&
        data.parameters.note === "deleted when the run completed";
      if (!busy) {
        cancel.disabled = !ACTIVE[st.type];
        retry.disabled = !FINISHED[st.type] || gone;
      }
      if (gone) retry.setAttribute("title", "Cannot retry: its parameters were deleted when the run completed");
      else if (!FINISHED[st.type]) retry.setAttribute("title", "Only a finished run can be retried");
      else retry.removeAttribute("title");
      if (ACTIVE[st.type]) cancel.removeAttribute("title");
      else cancel.setAttribute("title", "Only a waiting or running run can be cancelled");
    }, function (error) {
      // no such run (404; 422: not even a run id): say so instead of "Loading..." forever, and
      // stop asking (a deleted run does not come back)
      if (error.status !== 404 && error.status !== 422) return;
      stopPolling();
      banner.hidden = true;
      clear(banner);
      clear(main);
      notFound(["No run with id ", shown(id), "."]);
    });
  }

  function renderRun(box, data) {
    clear(box);
    var run = data.task_run;
    var policy = run.empirical_policy || {};
    var facts = [["Id", run.id], ["Task key", el("div", { "class": "clamp" }, shown(run.task_key))],
      ["Times in", zone()], ["Created", timeCell(run.created)],
      ["Expected start", timeCell(run.expected_start_time)], ["Started", timeCell(run.start_time)],
      ["Ended", timeCell(run.end_time)],
      ["Run time", el("span", { id: "run-time" }, runTimeCell(data.run_time))],
      ["Attempts", String(run.run_count || 0) + " (retries allowed: " + (policy.retries || 0) + ")"],
      ["Tags", shown((run.tags || []).join(", ") || "\u2013")]];
    append(box, el("dl", { "class": "facts" }, facts.map(function (f) {
      return [el("dt", null, f[0]), el("dd", null, f[1])];
    })));
    append(box, el("h2", null, "States"));
    append(box, el("div", { "class": "scroll" }, el("table", { id: "states-table" },
      el("thead", null, el("tr", null, ["Time (" + zone() + ")", "State", "Duration", "Message"].map(function (h) {
        return el("th", { scope: "col" }, h);
      }))),
      el("tbody", null, data.states.map(function (s, i) {
        var last = i === data.states.length - 1;
        var duration = s.duration_seconds !== null ? seconds(s.duration_seconds)
          : (last ? (FINISHED[s.type] ? "final" : "current") : "\u2013");
        return el("tr", null, el("td", null, timeCell(s.timestamp)), el("td", null, stateLabel(s.type, s.name)),
          el("td", { "class": "num" }, duration),
          el("td", { "class": "name message" }, s.message ? el("div", { "class": "clamp" }, shown(s.message)) : ""));
      })))));
    append(box, el("h2", null, "Parameters"));
    var p = data.parameters;
    // the server's text: JSON.parse has made a double of a big integer in p.value
    append(box, p.note ? el("p", { "class": "note", id: "parameters" }, shown(p.note))
      : el("pre", { id: "parameters" }, shown(typeof p.text === "string" ? p.text : JSON.stringify(p.value, null, 2))));
    var o = data.outcome;
    if (o.traceback !== undefined) {
      append(box, [el("h2", null, "Error"), el("p", { id: "error-summary", "class": "clamp" },
        shown((o.error_type || "Error") + ": " + (o.error_message || ""))),
        el("pre", { id: "traceback" }, shown(o.traceback))]);
    } else if (o.result !== undefined) {
      append(box, [el("h2", null, "Result"), el("pre", { id: "result" }, shown(o.result))]);
    } else if (o.note) {
      append(box, [el("h2", null, "Result"), el("p", { "class": "note", id: "result-note" }, shown(o.note))]);
    }
  }

  window.addEventListener("hashchange", route);
  var loading = document.getElementById("loading");
  if (loading) loading.parentNode.removeChild(loading);
  route();
})();
