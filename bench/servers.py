"""Processes the bench starts: gunicorn servers on free loopback ports, stopped by their own
process group (each is started in a new session) even after Ctrl-C or an error."""

import os
import signal
import socket
import subprocess
import sys
import time

import requests

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKERS = 2
THREADS = 8
START_TIMEOUT_SECONDS = 60


class BenchError(RuntimeError):
    """The bench could not do what it set out to do (the message says what)."""


def loopback_site_env(database_url, particle_url, secret_key, **settings):
    """The environment of a site process started here (a bench, or a test that runs the site
    as production does): this process's environment, the database, the Particle simulator with
    the demo product's credentials, and plain http on loopback, so the session cookie is not
    Secure (an http client never sends a Secure cookie back). `settings` are further
    SELFSERVE_* variables, named without the prefix."""
    from selfserve import config

    env = dict(os.environ)
    env.update(
        {
            "SELFSERVE_DATABASE_URL": database_url,
            "SELFSERVE_PARTICLE_API_URL": particle_url,
            "SELFSERVE_PARTICLE_PRODUCT": config.DEMO_PARTICLE_PRODUCT,
            "SELFSERVE_PARTICLE_CLIENT_ID": config.DEMO_PARTICLE_CLIENT_ID,
            "SELFSERVE_PARTICLE_CLIENT_SECRET": config.DEMO_PARTICLE_CLIENT_SECRET,
            "SELFSERVE_SECRET_KEY": secret_key,
            "SELFSERVE_BASE_URL": "http://127.0.0.1",
            "SELFSERVE_SESSION_COOKIE_SECURE": "false",
        }
    )
    env.update({f"SELFSERVE_{name}": str(value) for name, value in settings.items()})
    return env


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Gunicorn:
    """One gunicorn master (+ workers) serving `app_path` with the production settings."""

    def __init__(self, name, app_path, env, log_dir):
        self.name = name
        self.app_path = app_path
        self.env = env
        self.port = free_port()
        self.log_path = os.path.join(log_dir, f"gunicorn-{name}.log")
        self.process = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    @property
    def command(self):
        return [
            sys.executable,
            "-m",
            "gunicorn",
            "-k",
            "gthread",
            "-w",
            str(WORKERS),
            "--threads",
            str(THREADS),
            "-b",
            f"127.0.0.1:{self.port}",
            "--chdir",
            REPO_ROOT,
            "--graceful-timeout",
            "5",
            "--log-level",
            "warning",
            self.app_path,
        ]

    def start(self, ready_path="/"):
        """Start it and wait until `ready_path` answers; raise BenchError with the log if not."""
        self.launch()
        return self.wait_ready(ready_path)

    def launch(self):
        """Start the process without waiting for it to answer."""
        log = open(self.log_path, "wb")
        try:
            self.process = subprocess.Popen(
                self.command,
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        return self

    def wait_ready(self, ready_path="/"):
        """Wait until `ready_path` answers (any status below 500)."""
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(
                    f"gunicorn ({self.name}) exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                answer = requests.get(self.url + ready_path, timeout=2, allow_redirects=False)
                if answer.status_code < 500:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise BenchError(
            f"gunicorn ({self.name}) did not answer within {START_TIMEOUT_SECONDS} s:\n{self.log_tail()}"
        )

    def stop(self):
        """SIGTERM to its process group (master and workers), SIGKILL after 10 s."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(timeout=5)

    def log_tail(self, lines=30):
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as handle:
                return "".join(handle.readlines()[-lines:])
        except OSError:
            return "(no log)"
