"""The bench (bench/run) runs end to end in its quickest mode and prints its table.

No timing asserts: speed is only measured by the bench itself, never judged by tests.
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXPECTED_ROWS = [
    "gunicorn -k gthread -w 2 --threads 8",
    "bare Flask page",
    "GET /devices",
    "requests/s",
    "dashboard / bare",
    "Particle requests during the dashboard run",
    "1 viewer",
    "4 viewers",
    "offline dev.",
    "Particle calls per view",
    "cold token cache",
    "token requests per 1000 page views",
    "Checks",
]


def test_quickest_bench_run_prints_the_table():
    command = [
        sys.executable,
        "-m",
        "bench.main",
        "--quick",
        "--duration",
        "1",
        "--users",
        "3",
        "--viewers",
        "4",
        "--views",
        "60",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    for row in EXPECTED_ROWS:
        assert row in result.stdout, f"{row!r} missing from:\n{result.stdout}"
    # The table goes to stdout, progress to stderr.
    assert "bench: starting" in result.stderr and "bench: starting" not in result.stdout
