"""Server-drawn SVG charts of device history (templates/devices/_chart.svg.html).

No library and no script: a chart is a few <path> elements with presentation attributes and
CSS classes from site.css, so it passes our strict CSP (no inline script or style) and costs
the browser nothing. Each run of known, online values is its own path: offline time is a gap.
"""

import dataclasses
import datetime

from babel.dates import format_skeleton
from flask_babel import format_time
from flask_babel import get_locale
from flask_babel import get_timezone

WIDTH = 640
HEIGHT = 200
LEFT = 52
RIGHT = 12
TOP = 10
BOTTOM = 28


@dataclasses.dataclass
class Drawing:
    paths: list  # SVG path data, one per run
    dots: list  # (x, y) runs of a single point
    y_ticks: list  # (y, label)
    x_ticks: list  # (x, label)
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    right_edge: int = WIDTH - RIGHT
    top: int = TOP
    bottom_edge: int = HEIGHT - BOTTOM


def _value_range(series):
    values = [value for segment in series.segments for _, value in segment]
    if not values:
        return 0.0, 1.0
    low, high = min(values), max(values)
    if series.unit == "%":
        return 0.0, 100.0
    if low == high:
        return low - 1.0, high + 1.0
    pad = (high - low) * 0.08
    return low - pad, high + pad


def draw(series, start, end, step):
    """A Drawing of `series` between start and end; `step` draws values as held (raw
    changes) rather than joined (hourly means)."""
    low, high = _value_range(series)
    span = (end - start).total_seconds() or 1.0
    plot_w = WIDTH - LEFT - RIGHT
    plot_h = HEIGHT - TOP - BOTTOM

    def x_of(moment):
        return round(LEFT + (moment - start).total_seconds() / span * plot_w, 1)

    def y_of(value):
        return round(TOP + (high - value) / (high - low) * plot_h, 1)

    paths, dots = [], []
    for segment in series.segments:
        points = [(x_of(moment), y_of(value)) for moment, value in segment]
        if len(points) == 1 or all(point == points[0] for point in points):
            dots.append(points[0])
            continue
        parts = [f"M{points[0][0]} {points[0][1]}"]
        for x, y in points[1:]:
            parts.append(f"H{x} V{y}" if step else f"L{x} {y}")
        paths.append(" ".join(parts))
    y_ticks = [(y_of(value), series.fmt(value)) for value in (low, (low + high) / 2, high)]
    return Drawing(paths, dots, y_ticks, _x_ticks(start, end, x_of))


def _x_ticks(start, end, x_of):
    """Ticks on whole hours / days of the reader's clock (their time zone), labelled in their
    locale ("18:00", "30. Nov.")."""
    zone = get_timezone()
    local_start = start.replace(tzinfo=datetime.UTC).astimezone(zone)
    span = end - start
    if span <= datetime.timedelta(days=1):
        every, fmt = datetime.timedelta(hours=6), "time"
        tick = local_start.replace(minute=0, second=0, microsecond=0)
        tick += datetime.timedelta(hours=(6 - tick.hour % 6) % 6)
    else:
        every = datetime.timedelta(days=1 if span <= datetime.timedelta(days=7) else 7)
        fmt = "date"
        tick = local_start.replace(hour=0, minute=0, second=0, microsecond=0) + datetime.timedelta(days=1)
    ticks = []
    while True:
        # Whole local hours/days, kept on the wall clock across a daylight-saving change.
        moment = (
            zone.normalize(zone.localize(tick.replace(tzinfo=None))) if hasattr(zone, "localize") else tick
        )
        utc = moment.astimezone(datetime.UTC).replace(tzinfo=None)
        if utc > end:
            break
        if utc >= start:
            label = (
                format_time(utc, "short")
                if fmt == "time"
                else format_skeleton("MMMd", moment, locale=get_locale())
            )
            ticks.append((x_of(utc), label))
        tick += every
    return ticks
