"""bench/events runs end to end in its quickest mode and prints its table (polling today vs
events). No timing asserts: the bench measures, tests don't judge speed."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXPECTED_ROWS = [
    "polling (today)",
    "Particle calls per watched online device per minute",
    "devices kept live under 10,000 req/5 min",
    "publish -> value on open pages, median / p95",
    "webhook events taken in per second",
    "Particle calls for one view of a 3-device dashboard",
    "memory per 1,000 open push connections",
]


def test_quickest_events_bench_prints_the_table():
    command = [
        sys.executable,
        "-m",
        "bench.events",
        "--quick",
        "--seconds",
        "2",
        "--pages",
        "3",
        "--dashboard",
        "3",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    for row in EXPECTED_ROWS:
        assert row in result.stdout, f"{row!r} missing from:\n{result.stdout}"
    assert "starting the Particle Cloud simulator" in result.stderr
