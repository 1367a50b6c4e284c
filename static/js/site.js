// Small progressive enhancements; every page works without this file.

// A sentence for the page in the reader's language: base.html puts them, translated, on
// <body data-texts> (selfserve/i18n.py script_texts); "%(name)s" takes values[name].
window.siteText = function (key, values) {
  var texts = {};
  try { texts = JSON.parse(document.body.getAttribute("data-texts") || "{}"); } catch (e) { texts = {}; }
  var text = texts[key] || key;
  return text.replace(/%\((\w+)\)s/g, function (whole, name) {
    return values && values[name] !== undefined ? String(values[name]) : whole;
  });
};
document.addEventListener("DOMContentLoaded", function () {
  // Disable a form's submit button while its request is in flight (no double submits).
  document.body.addEventListener("submit", function (event) {
    var form = event.target;
    if (form.hasAttribute("hx-post") || form.hasAttribute("hx-get")) return; // htmx uses hx-disabled-elt
    if ((form.getAttribute("method") || "").toLowerCase() === "dialog") return;
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

  enhanceMenu();
  disableWhileViewing();
  sendBrowserTimeZone();
});

// --- The browser's time zone -------------------------------------------------------------------
// Sign-up and sign-in send it in a hidden field, so the account shows times in the person's own
// zone (selfserve/i18n.py). The settings page keeps the stored choice; it only preselects the
// browser's zone when the account has none yet (UTC).
function sendBrowserTimeZone() {
  var zone = "";
  try { zone = Intl.DateTimeFormat().resolvedOptions().timeZone || ""; } catch (e) { return; }
  if (!zone) return;
  document.querySelectorAll("input[data-browser-time-zone]").forEach(function (input) {
    if (!input.value) input.value = zone;
  });
  document.querySelectorAll("select[data-browser-time-zone-suggest][data-unset]").forEach(function (select) {
    var option = Array.prototype.find.call(select.options, function (o) { return o.value === zone; });
    if (option) option.selected = true;
  });
}

// --- The phone menu ----------------------------------------------------------------------------
// Without JavaScript "Menu" is a link to #site-nav (CSS :target opens it). Here it becomes a
// button that says whether the menu is open, and Escape closes it.
function enhanceMenu() {
  var toggle = document.querySelector("[data-menu-toggle]");
  var nav = document.getElementById("site-nav");
  if (!toggle || !nav) return;
  toggle.setAttribute("role", "button");
  toggle.setAttribute("aria-expanded", "false");
  function setOpen(open) {
    nav.classList.toggle("open", open);
    toggle.setAttribute("aria-expanded", open ? "true" : "false");
  }
  toggle.addEventListener("click", function (event) {
    event.preventDefault();
    setOpen(!nav.classList.contains("open"));
    if (nav.classList.contains("open")) {
      var first = nav.querySelector("a, button");
      if (first) first.focus();
    }
  });
  toggle.addEventListener("keydown", function (event) {
    if (event.key === " ") { event.preventDefault(); toggle.click(); }
  });
  nav.addEventListener("keydown", function (event) {
    if (event.key === "Escape" && nav.classList.contains("open")) { setOpen(false); toggle.focus(); }
  });
}

// --- In-page confirmation ----------------------------------------------------------------------
// Forms with hx-confirm ask in our own modal <dialog> (base.html) instead of the browser's
// confirm() box. A modal dialog keeps focus inside it (the page behind is inert) and Escape
// closes it (= cancel). Without JavaScript the server answers with its confirmation page.
document.addEventListener("htmx:confirm", function (event) {
  var question = event.detail && event.detail.question;
  var dialog = document.getElementById("confirm-dialog");
  if (!question || !dialog || typeof dialog.showModal !== "function") return;
  event.preventDefault();
  var source = event.detail.elt;
  var form = source.closest ? (source.closest("form") || source) : source;
  var title = form.getAttribute("data-confirm-title") || window.siteText("confirm_title");
  var yes = form.getAttribute("data-confirm-yes") || window.siteText("confirm");
  dialog.querySelector("#confirm-dialog-title").textContent = title;
  dialog.querySelector("#confirm-dialog-text").textContent = question;
  var confirmButton = dialog.querySelector("[data-dialog-confirm]");
  confirmButton.textContent = yes;
  confirmButton.className = form.getAttribute("data-confirm-danger") === "true" ? "danger" : "primary";
  var opener = document.activeElement;
  dialog.returnValue = "";
  dialog.addEventListener("close", function onClose() {
    dialog.removeEventListener("close", onClose);
    if (dialog.returnValue === "confirm") {
      event.detail.issueRequest(true);
    } else if (opener && opener.focus && document.contains(opener)) {
      opener.focus();
    }
  });
  dialog.showModal();
  // Start on the safe choice: Enter or Space by accident cancels.
  dialog.querySelector("[data-dialog-cancel]").focus();
});

// A modal <dialog> makes the page behind it inert, but Tab can still leave it for the browser's
// own controls: keep Tab and Shift+Tab cycling through the dialog's buttons.
document.addEventListener("keydown", function (event) {
  if (event.key !== "Tab") return;
  var dialog = document.querySelector("dialog[open]");
  if (!dialog) return;
  var focusable = Array.prototype.filter.call(
    dialog.querySelectorAll("button, a[href], input, select, textarea, [tabindex]:not([tabindex='-1'])"),
    function (el) { return !el.disabled && el.offsetParent !== null; });
  if (!focusable.length) return;
  var first = focusable[0], last = focusable[focusable.length - 1];
  var inside = dialog.contains(document.activeElement);
  if (event.shiftKey && (document.activeElement === first || !inside)) { event.preventDefault(); last.focus(); }
  else if (!event.shiftKey && (document.activeElement === last || !inside)) { event.preventDefault(); first.focus(); }
});

// --- Support viewing an account read-only ----------------------------------------------------
// <body data-read-only> (see base.html): the server refuses every change anyway, so make the page
// look like it instead of failing after a press. One notice says so: the banner at the top.
// Forms marked data-allowed-while-viewing (End view) and plain GET forms (search) stay usable;
// links that lead to a change (a[data-leads-to-change]) look and act unavailable.
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
  // Links marked data-leads-to-change open a form that changes something (Add a device,
  // Transfer…, Release…); plain navigation (history ranges, Details) stays usable.
  main.querySelectorAll("a[data-leads-to-change]").forEach(function (link) {
    link.setAttribute("aria-disabled", "true");
    link.setAttribute("data-read-only-disabled", "");
    link.setAttribute("tabindex", "-1");
  });
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
