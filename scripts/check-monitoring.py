"""Checks deploy/monitoring/ against the gateway's own metrics: the alert rules are Prometheus
rule groups, the dashboard is a Grafana dashboard with queries, and every xpand_* metric they
name is one src/metrics.rs registers (a histogram's _bucket, _sum and _count included), so a
renamed metric fails here rather than in a silent panel. Run by scripts/check-deploy.sh with
the deploy venv's Python (it has PyYAML, through yamllint)."""

import json
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
NAME = re.compile(r"\bxpand_[a-z_]+")


def registered() -> set[str]:
    """The metric names src/metrics.rs registers, as Prometheus exports them."""
    source = (REPO / "src/metrics.rs").read_text()
    names = re.findall(
        r'(?:Opts|HistogramOpts|IntCounter|IntGauge)::new\(\s*"([a-z_]+)"', source
    )
    histograms = set(re.findall(r'HistogramOpts::new\(\s*"([a-z_]+)"', source))
    exported = {f"xpand_{n}" for n in names}
    for h in histograms:
        exported |= {f"xpand_{h}_{suffix}" for suffix in ("bucket", "sum", "count")}
    return exported


def unknown(exprs: list[str], known: set[str]) -> set[str]:
    return {name for e in exprs for name in NAME.findall(e)} - known


def main() -> int:
    known = registered()
    if len(known) < 10 or unknown(["xpand_no_such_metric_total"], known) != {
        "xpand_no_such_metric_total"
    }:
        print("check-monitoring: the metric names were not read from src/metrics.rs")
        return 1
    rules = yaml.safe_load((REPO / "deploy/monitoring/alerts.yaml").read_text())
    exprs = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            if not {"alert", "expr"} <= rule.keys():
                print(f"check-monitoring: a rule without alert or expr: {rule}")
                return 1
            exprs.append(rule["expr"])
    dashboard = json.loads((REPO / "deploy/monitoring/dashboard.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    if not queries or not exprs:
        print("check-monitoring: no rules or no queries")
        return 1
    missing = unknown(exprs + queries, known)
    if missing:
        print(f"check-monitoring: not metrics the gateway exports: {sorted(missing)}")
        return 1
    print(
        f"check-monitoring: {len(exprs)} alert rules and {len(queries)} dashboard queries "
        "name only exported metrics",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
