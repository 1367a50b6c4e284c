"""The baseline: a bare Flask app with one small HTML page, served by the same gunicorn
settings as the site, so the bench can say what the site's own work costs."""

from flask import Flask

app = Flask(__name__)

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>bare</title></head>
<body><main><h1>Hello</h1><p>A bare Flask page for the baseline.</p></main></body></html>
"""


@app.get("/")
def index():
    return PAGE
