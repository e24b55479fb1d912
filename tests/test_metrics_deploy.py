"""The deployment files, offline: Kubernetes manifests against the Kubernetes schemas (kubernetes-validate),
the ServiceMonitor/Service/DaemonSet wiring, every PromQL expression of the Grafana dashboard and the alert
rules parsed (promql-parser, and promtool: Prometheus' own parser) with every metric it names being one the
exporter serves, and the alert rules checked and unit-tested by promtool."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from memtop.metrics import MetricsSink, metric_names

from .conftest import REPO

DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "memtop.json"
RULES = DEPLOY / "prometheus" / "memtop-rules.yaml"
RULES_TEST = DEPLOY / "prometheus" / "memtop-rules.test.yaml"
KUBERNETES = DEPLOY / "kubernetes"
KUBERNETES_VERSION = "1.30"

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")

# What Grafana substitutes before a query reaches Prometheus.
GRAFANA_DURATIONS = {"$__rate_interval": "1m", "$__interval": "30s", "$__range": "1h"}


def grafana_to_promql(expr: str) -> str:
    for name, duration in GRAFANA_DURATIONS.items():
        expr = expr.replace(name, duration)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)  # template variables appear only in =~ matchers


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def deploy_expressions() -> list[tuple[str, str]]:
    """(where, PromQL) of every query in the dashboard (variables substituted) and the alert rules."""
    found = []
    dash = dashboard()
    for panel in _panels(dash["panels"]):
        for target in panel.get("targets", []):
            found.append((f"dashboard panel {panel['title']!r}", grafana_to_promql(target["expr"])))
    for annotation in dash["annotations"]["list"]:
        found.append((f"dashboard annotation {annotation['name']!r}", grafana_to_promql(annotation["expr"])))
    for variable in dash["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((\w+), *(\w+)\)", variable["definition"])
            assert match, variable["definition"]
            found.append((f"dashboard variable {variable['name']!r}", match.group(1)))
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            found.append((f"alert {rule['alert']}", rule["expr"]))
    return found


def selector_names(expr: str) -> set[str]:
    import promql_parser

    names: set[str] = set()

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)
        return True

    promql_parser.walk(promql_parser.parse(expr), pre_visit=visit)
    return names


def served_names() -> set[str]:
    """What a scrape of the exporter holds: memtop's declared names and the process_* of its own process."""
    sink = MetricsSink()
    process = {s.name for family in sink.registry.collect() for s in family.samples}
    return metric_names() | process


# -- dashboard and rules --------------------------------------------------------------------------------


def test_dashboard_is_a_grafana_dashboard_with_unique_panel_ids() -> None:
    dash = dashboard()
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in _panels(dash["panels"])]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "node", "namespace"} <= variables
    for panel in _panels(dash["panels"]):
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]


def test_dashboard_covers_what_the_issue_asks_for() -> None:
    text = DASHBOARD.read_text()
    for name in (
        "memtop_kmalloc_bytes_total",
        "memtop_oom_kills_total",
        "memtop_leak_growth_bytes_per_second",
        "memtop_tcp_connect_latency_seconds_bucket",
        "process_cpu_seconds_total",
        "memtop_dropped_events_total",
    ):
        assert name in text, name
    assert any(p["type"] == "heatmap" for p in _panels(dashboard()["panels"]))


def test_every_query_parses_and_names_only_served_metrics() -> None:
    served = served_names()
    expressions = deploy_expressions()
    assert len(expressions) > 20
    for where, expr in expressions:
        names = selector_names(expr)
        assert names, f"{where}: {expr} names no metric"
        unknown = names - served
        assert not unknown, f"{where}: {expr} names {unknown}, which the exporter does not serve"


def test_a_wrong_metric_name_would_be_caught() -> None:
    assert selector_names('sum(rate(memtop_kmalloc_byte_total{pod!=""}[1m]))') - served_names()


@needs_promtool
def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    """Prometheus' own parser: each dashboard query as a recording rule, checked by promtool."""
    rules = [
        {"record": f"memtop:dashboard_query_{i}", "expr": expr}
        for i, (where, expr) in enumerate(deploy_expressions())
        if where.startswith("dashboard")
    ]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


@needs_promtool
def test_promtool_checks_the_alert_rules() -> None:
    result = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert {"MemtopKernelAllocationsGrowing", "MemtopOOMKill", "MemtopTCPConnectLatencyHigh"} <= alerts
    assert "MemtopMissingEvents" in alerts


@needs_promtool
def test_promtool_unit_tests_of_the_alert_rules_pass() -> None:
    result = subprocess.run(["promtool", "test", "rules", str(RULES_TEST)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# -- Kubernetes --------------------------------------------------------------------------------------


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def by_kind(kind: str) -> dict[str, Any]:
    found = [d for d in manifests() if d["kind"] == kind]
    assert len(found) == 1, kind
    return found[0]


@pytest.mark.parametrize("kind", ["Namespace", "DaemonSet", "Service"])
def test_manifests_validate_against_the_kubernetes_schemas(kind: str) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(by_kind(kind), KUBERNETES_VERSION, strict=True)


def test_schema_validation_catches_a_mistake() -> None:
    import kubernetes_validate

    daemonset = by_kind("DaemonSet")
    daemonset["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"] = "BPF"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, KUBERNETES_VERSION, strict=True)


def test_daemonset_runs_unprivileged_with_host_pids_and_read_only_host_mounts() -> None:
    spec = by_kind("DaemonSet")["spec"]["template"]["spec"]
    assert spec["hostPID"] is True
    container = spec["containers"][0]
    security = container["securityContext"]
    assert security["privileged"] is False and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert {"BPF", "PERFMON"} <= set(security["capabilities"]["add"])
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    for path in ("/sys", "/sys/kernel/tracing", "/sys/fs/cgroup", "/lib/modules", "/usr/src"):
        assert mounts[path].get("readOnly") is True, path
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[mounts["/var/lib/memtop"]["name"]]["hostPath"]["path"] == "/var/lib/memtop"


def test_service_servicemonitor_and_annotations_point_at_the_port_memtop_listens_on() -> None:
    daemonset = by_kind("DaemonSet")
    template = daemonset["spec"]["template"]
    container = template["spec"]["containers"][0]
    args = container["args"]
    listen = args[args.index("--metrics-listen") + 1]
    port = int(listen.rsplit(":", 1)[1])
    assert listen.startswith("0.0.0.0:")  # the pod's address, explicitly
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named["metrics"] == port
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and int(annotations["prometheus.io/port"]) == port
    pod_labels = template["metadata"]["labels"]
    assert daemonset["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service = by_kind("Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["metadata"]["namespace"] == daemonset["metadata"]["namespace"]
    service_port = next(p for p in service["spec"]["ports"] if p["name"] == "metrics")
    assert service_port["targetPort"] == "metrics" and service_port["port"] == port
    monitor = by_kind("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service["metadata"]["namespace"] in monitor["spec"]["namespaceSelector"]["matchNames"]
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"metrics"}


def test_daemonset_arguments_are_accepted_by_memtop() -> None:
    from memtop.cli import parse_args

    args = by_kind("DaemonSet")["spec"]["template"]["spec"]["containers"][0]["args"]
    parsed = parse_args(args)
    assert parsed.command == "exporter" and parsed.interval == 5.0
