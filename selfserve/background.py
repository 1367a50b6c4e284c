"""A web worker's background threads: the sweep (services' jobs), the alert sender and the
outbox sender. Each is a daemon loop that does one round of its work when woken and at least
every `interval` seconds, in an app context with a database connection of its own, and
outlives any one failure. There is one per app and name (`app.extensions[name]`), started by
the worker's first request, never by CLI commands (`flask sweep` runs the jobs itself).

`stop_all(app)` ends every one of them, and whatever else registered a stop with `on_stop`
(the event-stream listener): tests that build a live app call it, since a thread left running
would work in the databases of the tests that follow (the models' binding is process-wide).
"""

import logging
import threading

log = logging.getLogger(__name__)

_start_guard = threading.Lock()


class Loop(threading.Thread):
    """One background loop. `work()` runs once per round; `wakeup` (a threading.Event) starts
    a round early; `stop` (an Event) ends the loop after the current round."""

    def __init__(self, app, name, work, interval, wakeup, at_once):
        super().__init__(name=f"selfserve-{name}", daemon=True)
        self.app = app
        self.work = work
        self.interval = interval
        self.wakeup = wakeup
        self.at_once = at_once
        self.stop = threading.Event()

    def run(self):
        from selfserve import models

        first = self.at_once
        while not self.stop.is_set():
            if not first:
                self.wakeup.wait(self.interval)
                self.wakeup.clear()
                if self.stop.is_set():
                    return
            first = False
            try:
                with self.app.app_context():
                    opened_here = models.db.is_closed()
                    models.db.connect(reuse_if_open=True)
                    try:
                        self.work()
                    finally:
                        if opened_here and not models.db.is_closed():
                            models.db.close()
            except Exception:  # noqa: BLE001 - the thread must outlive any one failure
                log.exception("Background %s failed", self.name)

    def halt(self, timeout=30):
        self.stop.set()
        self.wakeup.set()
        self.join(timeout)


def start(app, name, work, interval, wakeup=None, at_once=False):
    """Start the app's loop `name` unless it runs already or `interval` is 0 (tests run the
    work themselves); return it, or None. `at_once`: the first round runs now, not after the
    first wait."""
    interval = float(interval or 0)
    if interval <= 0:
        return None
    with _start_guard:
        running = app.extensions.get(name)
        if running is not None:
            return running
        thread = Loop(app, name, work, interval, wakeup or threading.Event(), at_once)
        app.extensions[name] = thread
        app.extensions.setdefault("background_loops", []).append(name)
        thread.start()
        return thread


def on_stop(app, stop):
    """Have `stop_all` call `stop()` too (a background part that is not a Loop)."""
    app.extensions.setdefault("background_stops", []).append(stop)


def stop_all(app, timeout=30):
    """End the app's background loops (each after its current round) and call the stops
    registered with `on_stop`."""
    for name in app.extensions.pop("background_loops", []):
        thread = app.extensions.pop(name, None)
        if thread is not None:
            thread.halt(timeout)
    for stop in app.extensions.pop("background_stops", []):
        stop()
