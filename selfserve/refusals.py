"""One base for the refusals a service gives a person (a wrong setup code, a transfer that is
no longer open, a staff action without a reason...).

A service raises a `Refusal` (or its area's subclass) with a message safe to show, a `kind`
naming the case (views choose a next step by it), the form `field` at fault, and the HTTP
`status`. A view that has a form to show again catches it and renders the message next to the
field; anything it doesn't catch is answered by one htmx-aware handler (views/__init__.py):
the error page, or for htmx the message in the page's flash region, with `status`.
"""


class Refusal(Exception):
    def __init__(self, message, kind="error", field=None, status=400):
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.field = field
        self.status = status
