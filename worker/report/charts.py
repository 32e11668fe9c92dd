"""The report's charts: pygal draws them as SVG, inlined in the page, so they need no script and print.

pygal (maintained, pure Python, no browser needed) over a chart script: the page must read with scripts off
and open with no request leaving it. pygal also writes a small config script and its credits into each SVG:
both are dropped here, so no user text (camera names, keys) ever sits inside a <script>.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence

import pygal
from markupsafe import Markup
from pygal.style import Style

_STYLE = Style(
    background="white", plot_background="white", foreground="#333", foreground_strong="#111",
    foreground_subtle="#999", font_family="system-ui, sans-serif", label_font_size=11, major_label_font_size=11,
    legend_font_size=12, title_font_size=14,
    colors=("#2b7a3d", "#c0392b", "#7f8c8d", "#e67e22", "#8e44ad", "#2980b9", "#16a085", "#d35400", "#34495e",
            "#f1c40f"),
)
_SVG = "{http://www.w3.org/2000/svg}"


def _config(title: str, height: int = 260) -> dict[str, object]:
    return {"js": [], "disable_xml_declaration": True, "style": _STYLE, "width": 760, "height": height,
            "title": title, "show_legend": True, "legend_at_bottom": True, "print_values": False,
            "truncate_label": 24, "truncate_legend": 40, "x_label_rotation": 0, "y_labels_major_count": 6,
            "show_minor_y_labels": False}


def _inline(chart: pygal.graph.graph.Graph) -> Markup:
    tree = chart.render_tree()
    for parent in list(tree.iter()):
        for child in list(parent):
            if child.tag in ("script", f"{_SVG}script") or child.tag is ET.Comment:
                parent.remove(child)
    # ElementTree escapes every text and attribute it writes: the SVG is safe to inline as it is.
    return Markup(ET.tostring(tree, encoding="unicode", short_empty_elements=True))


def bars(title: str, labels: Sequence[str], series: Mapping[str, Sequence[float]], *, stacked: bool = False,
         height: int = 260) -> Markup:
    chart = (pygal.StackedBar if stacked else pygal.Bar)(**_config(title, height))
    chart.x_labels = list(labels)
    for name, values in series.items():
        chart.add(name, list(values))
    return _inline(chart)


def lines(title: str, labels: Sequence[str], series: Mapping[str, Sequence[float | None]], *,
          height: int = 260, percent: bool = False) -> Markup:
    config = _config(title, height)
    if percent:
        config["value_formatter"] = lambda v: f"{v:.1f}%"
    chart = pygal.Line(**config)
    chart.x_labels = list(labels)
    chart.x_labels_major_count = 12
    chart.show_minor_x_labels = False
    for name, values in series.items():
        chart.add(name, list(values))
    return _inline(chart)
