"""What the dashboards' and alerts' PromQL refers to, and what the code's /metrics exports: enough
PromQL lexing to list the metric names and the label names each selector uses."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
            "unless", "offset", "inf", "nan", "atan2"}
# Series every scrape target gets from Prometheus itself, and the labels it adds to every series.
SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_series_added"}
TARGET_LABELS = {"job", "instance"}
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "gauge": ("",),
    "unknown": ("",),
}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{([^}]*)\}")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?")


@dataclass
class Exported:
    """Sample names a set of /metrics pages can produce, with the label names seen on each."""

    labels: dict[str, set[str] | None] = field(default_factory=dict)

    def add_exposition(self, text: str) -> None:
        for family in text_string_to_metric_families(text):
            for suffix in SUFFIXES.get(family.type, ("",)):
                # A labelled metric no code path has touched yet has no samples: its labels are unknown.
                self.labels.setdefault(family.name + suffix, None)
            for sample in family.samples:
                seen = self.labels.get(sample.name) or set()
                self.labels[sample.name] = seen | set(sample.labels)

    def __contains__(self, name: str) -> bool:
        return name in self.labels


def strip_strings(expr: str) -> str:
    return _STRING.sub('""', expr)


def selectors(expr: str) -> list[tuple[str | None, set[str]]]:
    """(metric name or None, label names matched) of every ``name{...}`` selector in ``expr``."""
    out = []
    for m in _SELECTOR.finditer(strip_strings(expr)):
        labels = {part.split("=")[0].split("!")[0].strip() for part in m.group(2).split(",") if part.strip()}
        labels = {re.split(r"[=!~]", lbl)[0].strip() for lbl in labels}
        out.append((m.group(1), labels))
    return out


def metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` selects (functions, keywords, label names and durations left out)."""
    text = strip_strings(expr)
    text = re.sub(r"\{[^}]*\}", " ", text)   # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery durations
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\boffset\s+\w+", " ", text)
    names = set()
    for m in _IDENT.finditer(text):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in KEYWORDS or re.fullmatch(r"\d\w*", name):
            continue
        names.add(name)
    return names


def grouping_labels(expr: str) -> set[str]:
    """Label names of the ``by (...)`` / ``without (...)`` / ``on (...)`` / ``ignoring (...)`` clauses."""
    out: set[str] = set()
    for m in re.finditer(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", strip_strings(expr)):
        out |= {lbl.strip() for lbl in m.group(1).split(",") if lbl.strip()}
    return out


def problems(expr: str, exported: Exported) -> list[str]:
    """Why ``expr`` does not fit what the code exports (empty when it does)."""
    found = []
    names = metric_names(expr)
    if not names:
        found.append(f"{expr!r} selects no metric")
    for name in sorted(names):
        if name not in exported and name not in SYNTHETIC:
            found.append(f"{expr!r} uses {name}, which no /metrics exports")
    for name, labels in selectors(expr):
        if name is None or name in SYNTHETIC or name not in exported:
            continue
        known = exported.labels[name]
        if known is None:
            continue
        extra = labels - known - TARGET_LABELS - {"__name__"}
        if extra:
            found.append(f"{expr!r}: {name} has no label {sorted(extra)} (it has {sorted(known)})")
    # Grouping labels must be on some metric of the expression (checked where all their labels are known).
    label_sets = [exported.labels.get(n) for n in names if n in exported]
    if label_sets and all(ls is not None for ls in label_sets):
        available = set().union(*label_sets) | TARGET_LABELS
        missing = grouping_labels(expr) - available
        if missing:
            found.append(f"{expr!r} groups by {sorted(missing)}, a label none of its metrics has")
    return found
