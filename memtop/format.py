"""Human formatting shared by the views and the exporters' text output (humanize-based)."""

from __future__ import annotations

import datetime as dt

import humanize


def size(n: float | None) -> str:
    if n is None:
        return "-"
    if abs(n) < 1024:
        return f"{n:.0f} B"
    return humanize.naturalsize(n, binary=True, format="%.1f")


def size_rate(n: float | None) -> str:
    return "-" if n is None else f"{size(n)}/s"


def count(n: float | None) -> str:
    """1234567 -> '1.23M'; small numbers stay exact."""
    if n is None:
        return "-"
    if abs(n) < 1000:
        return f"{n:.0f}" if float(n).is_integer() or abs(n) >= 10 else f"{n:.1f}"
    return humanize.metric(n, precision=3).replace(" ", "")


def count_rate(n: float | None) -> str:
    return "-" if n is None else f"{count(n)}/s"


def percent(p: float | None) -> str:
    return "-" if p is None else f"{p:.1f}%"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return humanize.precisedelta(dt.timedelta(seconds=int(seconds)), minimum_unit="seconds", format="%0.0f")


def short_duration(seconds: float) -> str:
    """'3d 4h', '5h 12m', '7m 3s', '42s': compact, for headers."""
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d {h}h"
    if h:
        return f"{h}h {m}m"
    if m:
        return f"{m}m {s}s"
    return f"{s}s"


def clock(ts: float | None, millis: bool = True) -> str:
    """Local wall-clock time of a timestamp, to the millisecond (or the second); "-" when none."""
    if ts is None:
        return "-"
    text = dt.datetime.fromtimestamp(ts).strftime("%H:%M:%S.%f")
    return text[:-3] if millis else text[:8]


def datetime(ts: float | None) -> str:
    if ts is None or ts <= 0:
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def iso_utc(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def size_bucket(index: int) -> str:
    """Label of log2 size bucket `index`: sizes in [2**index, 2**(index+1))."""
    low = 1 << index
    return f"{size(low)}–{size((low << 1) - 1)}" if index else "0–1 B"
