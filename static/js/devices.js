// Device pages: fill the claim form from a label's QR link, pause live values in background
// tabs. Every page works without this file (the homeowner types the label's values; values
// then refresh on reload).
(function () {
  "use strict";

  var STASH_KEY = "selfserve.label";
  var STASH_MAX_AGE_MS = 30 * 60 * 1000;

  // --- The label's QR link: /claim#serial=...&code=... ------------------------------------
  // The fragment never reaches the server (so the setup code is in no log). We copy it into
  // the claim form and remove it from the address bar and history at once. If the visitor
  // must sign in first, the fragment survives the redirect to the sign-in page; we keep it
  // in this tab's sessionStorage until the claim form shows up.

  function labelFromFragment() {
    if (!window.location.hash || window.location.hash.length < 2) return null;
    var params = new URLSearchParams(window.location.hash.slice(1));
    var serial = params.get("serial");
    var code = params.get("code");
    if (!serial || !code) return null;
    return { serial: serial.slice(0, 64), code: code.slice(0, 64) };
  }

  function clearFragment() {
    history.replaceState(history.state, "", window.location.pathname + window.location.search);
  }

  function stash(label) {
    try {
      sessionStorage.setItem(STASH_KEY, JSON.stringify({ serial: label.serial, code: label.code, at: Date.now() }));
    } catch (e) { /* storage disabled: the visitor types the values */ }
  }

  function takeStash() {
    try {
      var raw = sessionStorage.getItem(STASH_KEY);
      sessionStorage.removeItem(STASH_KEY);
      if (!raw) return null;
      var label = JSON.parse(raw);
      if (!label || Date.now() - label.at > STASH_MAX_AGE_MS) return null;
      return label;
    } catch (e) {
      return null;
    }
  }

  function fillClaimForm(label) {
    var form = document.querySelector("form.js-claim-form");
    if (!form || !label) return false;
    form.querySelector("input[name=serial]").value = label.serial;
    form.querySelector("input[name=setup_code]").value = label.code;
    var note = document.getElementById("label-note");
    if (note) note.hidden = false;
    var button = form.querySelector("button[type=submit]");
    if (button) button.focus();
    return true;
  }

  function handleLabel() {
    var label = labelFromFragment();
    if (label) {
      clearFragment();
      if (!fillClaimForm(label)) stash(label);
      return;
    }
    if (document.querySelector("form.js-claim-form")) fillClaimForm(takeStash());
  }

  // --- Live values only while the page is visible ---------------------------------------
  // htmx filter expressions (hx-trigger="every 5s [document.visibilityState...]") need eval,
  // which our CSP forbids; instead we cancel polling requests from hidden pages and refresh
  // once when the page becomes visible again.

  function isPoller(elt) {
    return elt && elt.classList && elt.classList.contains("poll");
  }

  document.addEventListener("htmx:beforeRequest", function (event) {
    if (document.hidden && isPoller(event.detail && event.detail.elt)) event.preventDefault();
  });

  document.addEventListener("visibilitychange", function () {
    if (document.hidden || !window.htmx) return;
    document.querySelectorAll(".poll").forEach(function (elt) { window.htmx.trigger(elt, "refresh"); });
  });

  // --- Pushed values, with polling as the fallback -----------------------------------------
  // Pages with data-fallback-poll receive their changes over server-sent events (htmx's SSE
  // extension). When that connection fails (a proxy that buffers, a network that drops long
  // requests), their .poll regions poll our own cache every data-fallback-poll seconds until
  // the push connection is open again.

  var fallbackTimers = new Map();

  function pushRoot(elt) {
    return elt && elt.closest ? elt.closest("[data-fallback-poll]") : null;
  }

  function startFallback(root) {
    if (!root || fallbackTimers.has(root) || !window.htmx) return;
    var seconds = parseInt(root.getAttribute("data-fallback-poll"), 10) || 5;
    var pollers = root.classList.contains("poll") ? [root] : Array.prototype.slice.call(root.querySelectorAll(".poll"));
    fallbackTimers.set(root, window.setInterval(function () {
      if (document.hidden) return;
      pollers.forEach(function (elt) { window.htmx.trigger(elt, "refresh"); });
    }, seconds * 1000));
  }

  function stopFallback(root) {
    if (!root || !fallbackTimers.has(root)) return;
    window.clearInterval(fallbackTimers.get(root));
    fallbackTimers.delete(root);
  }

  document.addEventListener("htmx:sseError", function (event) { startFallback(pushRoot(event.target)); });
  document.addEventListener("htmx:sseOpen", function (event) { stopFallback(pushRoot(event.target)); });

  // --- Controls that follow the device's state ---------------------------------------------
  // Each values update (#device-state, from the server's catalogue rules) says which actions
  // can't apply now and why: we disable those and show the reason under each. While one command
  // is in flight every control waits, so a second one can't race it. The status region says
  // what is being sent, then what the device reports once it has settled.

  var inFlight = false;
  var pendingSince = 0;
  var valuesRequestedAt = 0;

  function controlForm(elt) {
    return elt && elt.closest ? elt.closest("#controls form[data-function-label]") : null;
  }

  function currentState() {
    var state = document.getElementById("device-state");
    if (!state) return null;
    var unavailable = {};
    try { unavailable = JSON.parse(state.getAttribute("data-unavailable") || "{}"); } catch (e) { unavailable = {}; }
    return {
      unavailable: unavailable,
      settled: state.getAttribute("data-settled") === "true",
      text: state.getAttribute("data-state-text") || "",
      fault: state.getAttribute("data-fault") || "",
      online: state.getAttribute("data-online") !== "false"
    };
  }

  function applyControls() {
    var controls = document.getElementById("controls");
    var state = currentState();
    if (!controls || !state) return;
    if (document.body.hasAttribute("data-read-only")) return; // site.js keeps them disabled
    controls.querySelectorAll("form[data-function]").forEach(function (form) {
      var reason = state.unavailable[form.dataset["function"]] || "";
      var why = form.querySelector(".why");
      if (why) {
        why.textContent = reason;
        // Offline: the note above says it once for all controls.
        why.classList.toggle("visually-hidden", !state.online);
      }
      form.querySelectorAll("button").forEach(function (button) { button.disabled = inFlight || !!reason; });
    });
    var note = document.getElementById("offline-note");
    if (note) note.hidden = state.online;
  }

  function showStatus(text, className, pending, followed) {
    var region = document.getElementById("function-result");
    if (!region) return;
    var line = document.createElement("p");
    line.className = className;
    line.textContent = text;
    if (pending) line.setAttribute("data-pending", "");
    if (followed) line.setAttribute("data-followed", "");
    region.replaceChildren(line);
  }

  // The device accepted a command ("Opening…"): once values read after it show the device
  // settled, say where it ended up ("Open", "Open 60%"), or the fault it reports.
  function followPending() {
    var state = currentState();
    if (!state) return;
    // A fault after the outcome was reported ("Done. Now: Running…") takes its place.
    if (state.fault && document.querySelector("#function-result [data-followed]")) {
      showStatus(window.siteText("fault", { fault: state.fault }), "flash flash-error");
      return;
    }
    var pending = document.querySelector("#function-result [data-pending]");
    if (!pending || valuesRequestedAt < pendingSince) return;
    if (state.fault) {
      showStatus(state.fault + ": see the alert at the top of the page.", "flash flash-error");
    } else if (!state.online) {
      showStatus(window.siteText("offline_before_report"), "flash flash-warning");
    } else if (state.settled && state.text) {
      showStatus(window.siteText("done_now", { state: state.text }), "flash flash-success", false, true);
    }
  }

  document.addEventListener("htmx:beforeRequest", function (event) {
    var elt = event.detail && event.detail.elt;
    if (elt && elt.id === "values" && !event.defaultPrevented) valuesRequestedAt = Date.now();
    var form = controlForm(elt);
    if (!form || event.defaultPrevented) return;
    inFlight = true;
    document.querySelectorAll("#controls button").forEach(function (button) { button.disabled = true; });
    showStatus(window.siteText("sending", { label: form.dataset.functionLabel }), "flash flash-info sending");
  });

  document.addEventListener("htmx:afterRequest", function (event) {
    var form = controlForm(event.detail && event.detail.elt);
    if (!form) return;
    inFlight = false;
    applyControls();
    if (event.detail.successful) return;
    showStatus(window.siteText("not_sent", { label: form.dataset.functionLabel }), "flash flash-error");
  });

  // A pushed values update (server-sent event) is rendered when it is sent: as new as a request.
  document.addEventListener("htmx:sseBeforeMessage", function (event) {
    if (event.target && event.target.id === "values" && !event.defaultPrevented) valuesRequestedAt = Date.now();
  });

  document.addEventListener("htmx:afterSwap", function (event) {
    // A pushed swap (htmx's SSE extension) names no target in its detail: the event's own is it.
    var target = (event.detail && event.detail.target) || event.target;
    if (!target) return;
    if (target.id === "function-result" && target.querySelector("[data-pending]")) pendingSince = Date.now();
    if (target.id === "values") { applyControls(); followPending(); }
  });

  // A value past a limit the device guards (data-warn-above): warn while typing, before sending.
  function checkLimit(input) {
    var limit = parseFloat(input.getAttribute("data-warn-above"));
    var warning = input.form && input.form.querySelector("[data-limit-warning]");
    if (!warning || isNaN(limit)) return;
    warning.hidden = !(parseFloat(input.value) > limit);
  }

  document.addEventListener("input", function (event) {
    var input = event.target;
    if (input.matches && input.matches("input[data-warn-above]")) checkLimit(input);
    // The slider and the number box set the same value.
    if (input.matches && input.matches("input[data-range-for]")) {
      var box = document.getElementById(input.getAttribute("data-range-for"));
      if (box) box.value = input.value;
    } else if (input.id) {
      var slider = document.querySelector("input[data-range-for='" + input.id + "']");
      if (slider && input.value !== "") slider.value = input.value;
    }
  });

  function enhanceControls() {
    document.querySelectorAll("input[data-range-for]").forEach(function (slider) { slider.hidden = false; });
    document.querySelectorAll("input[data-warn-above]").forEach(checkLimit);
    applyControls();
  }

  // --- After a rename ----------------------------------------------------------------------
  // The name region is replaced: focus would fall back to the page body, and the tab title
  // would keep the old name. Focus the new heading and retitle the tab (only on success: after
  // a refused name the form with its error keeps the focus flow of the error message).

  function isRenameSwap(event) {
    var requester = event.detail && event.detail.elt;
    if (event.target && event.target.id === "device-name") return true;
    return !!(requester && requester.getAttribute && requester.getAttribute("hx-target") === "#device-name");
  }

  document.addEventListener("htmx:afterSwap", function (event) {
    if (!isRenameSwap(event)) return;
    var region = document.getElementById("device-name");
    var heading = region && region.querySelector("h1");
    if (!heading || region.querySelector("[aria-invalid=true]")) return;
    // base.html's title is "<page title> · selfserve": replace the page-title part.
    var title = document.title;
    var separator = title.lastIndexOf(" \u00b7 ");
    document.title = heading.textContent.trim() + (separator >= 0 ? title.slice(separator) : "");
    heading.setAttribute("tabindex", "-1");
    heading.focus();
  });

  function start() { handleLabel(); enhanceControls(); }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
