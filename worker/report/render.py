"""report.html and index.html from the report figures: Jinja2 templates (autoescaped) with the charts inline.

One self-contained file each: no script, font, stylesheet or image is fetched when it is opened (thumbnails
are data: URIs), it reads with scripts off and prints.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
from markupsafe import Markup

from worker.report import charts
from worker.report.model import FLOOR_CENTS_PER_IMAGE, Report


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("worker.report", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    env.filters["usd"] = lambda cents: "—" if cents is None else f"${cents / 100:,.2f}"
    env.filters["duration"] = _duration
    return env


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _clock(offset_s: int) -> str:
    minutes, secs = divmod(offset_s, 60)
    hours, minutes = divmod(minutes, 60)
    return f"+{hours}:{minutes:02d}:{secs:02d}"


def report_charts(report: Report) -> dict[str, Markup]:
    labels = [_clock(t) for t, _ in report.judged_over_time]
    drawn = {
        "verdicts": charts.bars("Verdicts", ["images"], {v: [n] for v, n in report.counts.items() if n}, height=200),
        "judged": charts.bars(f"Images judged per {report.bin_s} s", labels,
                              {"judged": [n for _, n in report.judged_over_time]}),
        "confidence": charts.bars("Seller confidence (Rate, %) of live and spoof verdicts",
                                  [f"{10 * i}-{10 * i + 10}" for i in range(10)], report.confidence_bins),
    }
    series: dict[str, Sequence[float | None]] = {"calls/s": [round(v, 2) for _, v in report.calls_over_time]}
    if report.rate_limit_per_s:
        series["rate limit"] = [report.rate_limit_per_s] * len(report.calls_over_time)
    drawn["calls"] = charts.lines(f"Paid calls per second ({report.bin_s} s bins) against the rate limit",
                                  labels, series)
    return drawn


def render_report(report: Report, *, thumbnails: Mapping[str, str] | None = None) -> str:
    """The page; `thumbnails` maps a review item's key to a data: URI (only with `irlive report --thumbnails`)."""
    template = _environment().get_template("report.html.j2")
    return template.render(r=report, m=report.manifest, charts=report_charts(report), thumbs=thumbnails or {},
                           floor_cents=FLOOR_CENTS_PER_IMAGE)


def render_index(output: str, runs: Sequence[Mapping[str, Any]], chart: Markup | None,
                 shown_of: int) -> str:
    template = _environment().get_template("index.html.j2")
    return template.render(output=output, runs=runs, chart=chart, shown_of=shown_of)
