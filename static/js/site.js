// Small progressive enhancements; every page works without this file.
document.addEventListener("DOMContentLoaded", function () {
  // Disable a form's submit button while its request is in flight (no double submits).
  document.body.addEventListener("submit", function (event) {
    var form = event.target;
    if (form.hasAttribute("hx-post") || form.hasAttribute("hx-get")) return; // htmx uses hx-disabled-elt
    var buttons = form.querySelectorAll("button[type=submit]");
    buttons.forEach(function (b) { b.setAttribute("aria-disabled", "true"); b.classList.add("busy"); });
  });

  // A form that came back with errors: move focus to its summary, so keyboard and screen-reader
  // users land on what went wrong (the summary links to each field).
  var summary = document.querySelector("main .error-summary");
  if (summary) {
    if (!summary.hasAttribute("tabindex")) summary.setAttribute("tabindex", "-1");
    summary.focus();
  }

  disableWhileViewing();
});

// Support is viewing this account read-only (<body data-read-only>, see base.html): the server
// refuses every change anyway, so make the page look like it instead of failing after a press.
// Forms marked data-allowed-while-viewing (End view) and plain GET forms (search) stay usable.
var READ_ONLY_HINT = "You're viewing this account read-only: controls are disabled.";
var STATE_CHANGING = "[hx-post], [hx-put], [hx-patch], [hx-delete]";

function changesState(control) {
  if (control.matches(STATE_CHANGING)) return true;
  var form = control.form;
  if (!form) return control.matches("button");
  return form.matches(STATE_CHANGING) || (form.getAttribute("method") || "get").toLowerCase() !== "get";
}

function disableWhileViewing() {
  if (!document.body.hasAttribute("data-read-only")) return;
  var main = document.querySelector("main");
  if (!main) return;
  main.querySelectorAll("button, input, select, textarea").forEach(function (control) {
    if (control.type === "hidden" || control.closest("[data-allowed-while-viewing]")) return;
    if (!changesState(control)) return;
    control.disabled = true;
    control.setAttribute("data-read-only-disabled", "");
  });
  if (!main.querySelector("[data-read-only-hint]")) {
    var hint = document.createElement("p");
    hint.className = "read-only-hint";
    hint.setAttribute("data-read-only-hint", "");
    hint.textContent = READ_ONLY_HINT;
    main.insertBefore(hint, main.firstChild);
  }
}

// Fragments swapped in later (device values, forms coming back) get the same treatment.
document.addEventListener("htmx:afterSettle", disableWhileViewing);
document.addEventListener("htmx:load", disableWhileViewing);

// Error fragments (selfserve.htmx.error_response) come with HX-Retarget: #flashes and a 4xx/5xx
// status, which htmx 2 doesn't swap by default; let exactly those through so the message shows.
document.addEventListener("htmx:beforeSwap", function (event) {
  var xhr = event.detail.xhr;
  if (xhr && xhr.status >= 400 && xhr.getResponseHeader("HX-Retarget") === "#flashes") {
    event.detail.shouldSwap = true;
    event.detail.isError = false;
  }
});
