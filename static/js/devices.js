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

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", handleLabel);
  } else {
    handleLabel();
  }
})();
