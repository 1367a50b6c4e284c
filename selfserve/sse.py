"""Server-sent events from the site to open pages (the device page, the dashboard).

One response per open page: it waits on the process's push hub (selfserve/push.py) for the ids
of its devices and, for each change, renders the page's fragment again from the shared cache
and sends it as one SSE event (htmx's SSE extension swaps it in). Every round, before anything
is rendered, the viewer's login session is loaded again (signed out, timed out, or a support
view ended: the stream ends) and `render` looks every device up again through
`devices.device_for` (a device that left the account: the stream ends). Only ids travel through
the hub, so no push channel can carry another customer's values.

Every `tick` seconds without a change, `render` may check the device (values older than their
heartbeat plus a grace, or firmware that doesn't publish: one read for every viewer, as polling
did). A stream lasts at most PUSH_STREAM_MAX_SECONDS; the browser reconnects by itself.
"""

import time

from flask import Response
from flask import current_app
from flask import stream_with_context

from selfserve import models
from selfserve import push


class Gone(Exception):
    """The page may not show this any more: end the stream, after `last` ([(event, html)]:
    what the page shows instead, e.g. that access ended)."""

    def __init__(self, last=()):
        super().__init__("gone")
        self.last = list(last)


def frame(event, html):
    """One SSE event; every line of the HTML as a data line."""
    lines = "".join(f"data: {line}\n" for line in html.split("\n"))
    return f"event: {event}\n{lines}\n"


def stream(device_ids, render):
    """The SSE response for a page showing `device_ids`.

    `render(user, changed, check)` returns [(event name, html)] for the devices in `changed`
    (all of them when `check` is true: connect and every tick) or raises Gone.
    """
    from flask_login import current_user

    from selfserve.security import _load_user

    app = current_app._get_current_object()
    cookie_id = current_user.login_session.cookie_id
    tick = float(app.config.get("VALUES_POLL_SECONDS", 5) or 5)
    max_seconds = float(app.config.get("PUSH_STREAM_MAX_SECONDS", 3600))
    subscription = push.subscribe(app, device_ids)
    # Close this request's connection now: a page may stay open for hours.
    if not models.db.is_closed():
        models.db.close()

    def frames():
        try:
            yield "retry: 3000\n\n"
            started = time.monotonic()
            sent = {}
            changed, check = set(device_ids), True
            while True:
                models.db.connect(reuse_if_open=True)
                try:
                    user = _load_user(cookie_id)
                    if user is None:
                        yield frame("signed-out", "")
                        return
                    for event, html in render(user, changed, check):
                        if sent.get(event) != html:
                            sent[event] = html
                            yield frame(event, html)
                except Gone as gone:
                    for event, html in gone.last:
                        yield frame(event, html)
                    yield frame("gone", "")
                    return
                finally:
                    if not models.db.is_closed():
                        models.db.close()
                left = max_seconds - (time.monotonic() - started)
                if left <= 0:
                    return
                changed = subscription.wait(timeout=min(tick, left))
                check = not changed
                if check:
                    changed = set(device_ids)
                    yield ": tick\n\n"  # a dead browser connection shows up as an error here
        finally:
            push_unsubscribe(app, subscription)

    response = Response(stream_with_context(frames()), mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
    return response


def push_unsubscribe(app, subscription):
    app.extensions["push_hub"].unsubscribe(subscription)
