// The staff "view as customer" banner: count the time left down, announce the last minutes to
// screen readers, and reload when it runs out (the server then ends the view by itself).
(function () {
  "use strict";
  function start() {
    var clock = document.getElementById("staff-view-time-left");
    if (!clock || clock.dataset.started) return;
    clock.dataset.started = "yes";
    var announce = document.getElementById("staff-view-announce");
    var endsAt = Date.now() + parseInt(clock.dataset.secondsLeft || "0", 10) * 1000;
    var announced = {};
    function tick() {
      var left = Math.max(0, Math.round((endsAt - Date.now()) / 1000));
      var minutes = Math.floor(left / 60);
      var seconds = left % 60;
      clock.textContent = window.siteText("view_clock", { minutes: minutes, seconds: (seconds < 10 ? "0" : "") + seconds });
      [5, 1].forEach(function (mark) {
        if (minutes < mark && !announced[mark] && left > 0 && announce) {
          announced[mark] = true;
          announce.textContent = window.siteText(mark === 1 ? "view_ends_1" : "view_ends_5");
        }
      });
      if (left <= 0) {
        clock.textContent = window.siteText("view_ended");
        window.clearInterval(timer);
        // A short pause so the server's clock has surely passed the end too.
        window.setTimeout(function () { window.location.reload(); }, 1500);
      }
    }
    var timer = window.setInterval(tick, 1000);
    tick();
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
