"""The alert rules and the Grafana dashboard in docs/observe parse, and every metric they
name is one a worker exposes (promtool is not here: this is the check we can run)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from omniq.metrics import METRIC_NAMES

DOCS = Path(__file__).resolve().parents[2] / "docs" / "observe"
NAME = re.compile(r"\bomniq_[a-z_]+")
SUFFIXES = ("_bucket", "_count", "_sum", "_total")


def named_metrics(expr: str) -> set[str]:
    found = set()
    for name in NAME.findall(expr):
        for suffix in SUFFIXES:
            if name.endswith(suffix) and name[: -len(suffix)] in METRIC_NAMES:
                name = name[: -len(suffix)]
        found.add(name)
    return found


def test_alert_rules() -> None:
    rules = yaml.safe_load((DOCS / "alerts.yml").read_text())
    (group,) = rules["groups"]
    assert group["rules"], "no rules"
    seen: set[str] = set()
    for rule in group["rules"]:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert rule["alert"].startswith("OmniQ") and rule["annotations"]["summary"]
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]
        names = named_metrics(rule["expr"])
        assert names and names <= set(METRIC_NAMES), (rule["alert"], names - set(METRIC_NAMES))
        seen |= names
    # The numbers an operator pages on are all covered.
    assert {"omniq_worker_up", "omniq_queue_oldest_ready_age_seconds", "omniq_tasks",
            "omniq_store_reachable", "omniq_queue_tasks"} <= seen


def test_grafana_dashboard() -> None:
    board = json.loads((DOCS / "grafana-dashboard.json").read_text())
    assert board["title"] and board["uid"] and board["schemaVersion"] >= 30
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    exprs = [t["expr"] for panel in board["panels"] for t in panel["targets"]]
    exprs += [v["query"] for v in board["templating"]["list"]]
    for expr in exprs:
        names = named_metrics(expr)
        assert names and names <= set(METRIC_NAMES), (expr, names - set(METRIC_NAMES))
    assert len({n for e in exprs for n in named_metrics(e)}) >= 12
