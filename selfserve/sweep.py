"""The background sweep: finishes multi-step work that a crash or an outage interrupted.

Areas register a resume function (no arguments) in `RESUMERS`, e.g. provisioning of new
accounts or claims that stopped half-way. Each resumer must be safe with several workers
running it at the same time (take work with an atomic UPDATE lease) and must return quickly
when there is nothing to do.

`start(app)` runs the sweep once right away and then every SWEEP_SECONDS in a daemon thread
(0 disables the thread: tests call `run_once` themselves).
"""

import logging
import threading

log = logging.getLogger(__name__)

RESUMERS = []


def register(resumer):
    """Add a resume function to the sweep (once, however often its module is imported)."""
    if resumer not in RESUMERS:
        RESUMERS.append(resumer)
    return resumer


def run_once(app):
    """Run every resumer once inside an app context; a failing one doesn't stop the others.

    Returns {resumer name: its result, or the exception it raised}.
    """
    from selfserve import models

    results = {}
    with app.app_context():
        opened_here = models.db.is_closed()
        models.db.connect(reuse_if_open=True)
        try:
            for resumer in list(RESUMERS):
                name = f"{resumer.__module__}.{resumer.__qualname__}"
                try:
                    results[name] = resumer()
                except Exception as exc:  # noqa: BLE001 - keep sweeping the other areas
                    log.exception("Sweep step %s failed", name)
                    results[name] = exc
        finally:
            if opened_here and not models.db.is_closed():
                models.db.close()
    return results


def start(app):
    """Start the sweep thread unless SWEEP_SECONDS is 0; return it (or None)."""
    interval = float(app.config.get("SWEEP_SECONDS") or 0)
    if interval <= 0:
        return None
    if app.extensions.get("sweep") is not None:
        return app.extensions["sweep"]
    stop = threading.Event()

    def loop():
        while True:
            try:
                run_once(app)
            except Exception:  # noqa: BLE001 - the thread must outlive any one failure
                log.exception("Sweep failed")
            if stop.wait(interval):
                return

    thread = threading.Thread(target=loop, name="selfserve-sweep", daemon=True)
    thread.stop = stop
    app.extensions["sweep"] = thread
    thread.start()
    return thread
