"""htmx-aware responses in one place: redirects, out-of-band flashes, error fragments."""

from flask import get_flashed_messages
from flask import redirect as flask_redirect
from flask import render_template
from flask import request


def is_htmx():
    """True for requests made by htmx (HX-Request header), except history restores."""
    return (
        request.headers.get("HX-Request") == "true"
        and request.headers.get("HX-History-Restore-Request") != "true"
    )


def redirect(location):
    """A 302 for normal requests; for htmx an HX-Redirect so the whole page navigates."""
    if is_htmx():
        response = flask_redirect(location)
        response.status_code = 200
        response.headers["HX-Redirect"] = location
        response.set_data(b"")
        return response
    return flask_redirect(location)


def init_app(app):
    @app.after_request
    def _flashes_out_of_band(response):
        # htmx swaps only the target; pending flash messages ride along out of band so they
        # show in the page's #flashes region instead of waiting for the next full page.
        if (
            is_htmx()
            and "HX-Redirect" not in response.headers
            and response.mimetype == "text/html"
            and not response.direct_passthrough
        ):
            messages = get_flashed_messages(with_categories=True)
            if messages:
                extra = render_template("_flashes.html", messages=messages, oob=True)
                response.set_data(response.get_data() + extra.encode())
        return response


def error_response(message, status, title=None):
    """An error as a full page, or for htmx a fragment swapped into #flashes on purpose."""
    if is_htmx():
        body = render_template("_flashes.html", messages=[("error", message)], oob=False)
        response = app_response(body, status)
        # htmx doesn't swap 4xx/5xx by default; retarget the message at the flash region.
        response.headers["HX-Retarget"] = "#flashes"
        response.headers["HX-Reswap"] = "innerHTML"
        return response
    body = render_template("errors/error.html", message=message, status=status, title=title)
    return app_response(body, status)


def app_response(body, status):
    from flask import make_response

    return make_response(body, status)
