// Small progressive enhancements; every page works without this file.
document.addEventListener("DOMContentLoaded", function () {
  // Disable a form's submit button while its request is in flight (no double submits).
  document.body.addEventListener("submit", function (event) {
    var form = event.target;
    if (form.hasAttribute("hx-post") || form.hasAttribute("hx-get")) return; // htmx uses hx-disabled-elt
    var buttons = form.querySelectorAll("button[type=submit]");
    buttons.forEach(function (b) { b.setAttribute("aria-disabled", "true"); b.classList.add("busy"); });
  });
});

// Error fragments (selfserve.htmx.error_response) come with HX-Retarget: #flashes and a 4xx/5xx
// status, which htmx 2 doesn't swap by default; let exactly those through so the message shows.
document.addEventListener("htmx:beforeSwap", function (event) {
  var xhr = event.detail.xhr;
  if (xhr && xhr.status >= 400 && xhr.getResponseHeader("HX-Retarget") === "#flashes") {
    event.detail.shouldSwap = true;
    event.detail.isError = false;
  }
});
