"""Static checks of docker/: the Dockerfile, compose file, nginx, Prometheus, Grafana and Kubernetes files.

Nothing here needs a Docker engine or a cluster. Checks that need nginx, promtool,
``docker compose`` or kubectl run when the program is installed and skip otherwise.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DOCKER_DIR = Path(__file__).resolve().parents[2] / "docker"

# The metric names that server/metrics.py exports, by type.
CONTRACT_METRICS = {
    "matlora_request_duration_seconds": "histogram",
    "matlora_time_to_first_token_seconds": "histogram",
    "matlora_requests_total": "counter",
    "matlora_generated_tokens_total": "counter",
    "matlora_prompt_tokens_total": "counter",
    "matlora_queue_depth": "gauge",
    "matlora_running_requests": "gauge",
    "matlora_batch_size": "histogram",
    "matlora_policy_rank_total": "counter",
    "matlora_policy_rank": "gauge",
}
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")
GRACEFUL_TIMEOUT_S = 30


def series_names(expr: str) -> set[str]:
    """Return the metric names that a PromQL expression selects (every name followed by '{')."""
    return set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", expr))


def contract_metric(series: str) -> str | None:
    """Return the contract metric that a series belongs to, e.g. ``matlora_batch_size`` for ``..._bucket``."""
    if series in CONTRACT_METRICS:
        return series
    for suffix in HISTOGRAM_SERIES:
        base = series.removesuffix(suffix)
        if base != series and CONTRACT_METRICS.get(base) == "histogram":
            return base
    return None


def load_yaml(relative: str) -> dict:
    return yaml.safe_load((DOCKER_DIR / relative).read_text())


def seconds(duration: str) -> float:
    """Parse a compose duration such as "40s" or "1m30s"."""
    units = {"h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", duration)
    assert parts, f"not a duration: {duration!r}"
    return sum(float(value) * units[unit] for value, unit in parts)


# Dashboard


def test_dashboard_queries_use_contract_metrics(dashboard_queries):
    assert dashboard_queries
    for title, expr in dashboard_queries:
        for series in series_names(expr):
            assert series == "up" or contract_metric(series), f"panel {title!r} queries unknown metric {series!r}"


@pytest.mark.parametrize(
    "needed",
    [
        r"histogram_quantile\(0\.5, sum by \(le, rank\) \(rate\(matlora_request_duration_seconds_bucket",
        r"histogram_quantile\(0\.95, sum by \(le, rank\) \(rate\(matlora_request_duration_seconds_bucket",
        r"histogram_quantile\(0\.99, sum by \(le, rank\) \(rate\(matlora_request_duration_seconds_bucket",
        r"histogram_quantile\(0\.5, sum by \(le, rank\) \(rate\(matlora_time_to_first_token_seconds_bucket",
        r"sum by \(rank\) \(rate\(matlora_requests_total",
        r"sum by \(status\) \(rate\(matlora_requests_total",
        r"matlora_policy_rank\{",
        r"sum by \(replica\) \(matlora_queue_depth",
        r"sum by \(replica\) \(rate\(matlora_batch_size_sum",
        r"rate\(matlora_generated_tokens_total",
    ],
)
def test_dashboard_has_panel(dashboard_queries, needed):
    assert any(re.search(needed, expr) for _, expr in dashboard_queries), f"no dashboard query matches {needed}"


def test_dashboard_queries_resolve_every_variable(dashboard_queries, resolve_grafana_variables):
    for title, expr in dashboard_queries:
        assert "$" not in resolve_grafana_variables(expr), f"panel {title!r} has an unknown variable: {expr}"


def test_dashboard_uses_provisioned_datasource(dashboard):
    provisioned = load_yaml("grafana/provisioning/datasources/prometheus.yaml")["datasources"]
    uids = {source["uid"] for source in provisioned}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] in uids, f"panel {panel['title']!r}"


def test_dashboard_provider_path_is_mounted():
    provider = load_yaml("grafana/provisioning/dashboards/matlora.yaml")["providers"][0]
    volumes = load_yaml("compose.yaml")["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in volumes


# Compose


def compose_servers() -> dict[str, dict]:
    services = load_yaml("compose.yaml")["services"]
    return {name: service for name, service in services.items() if name.startswith("server-")}


def test_compose_has_two_or_more_replicas():
    assert len(compose_servers()) >= 2


def test_compose_replicas_outlive_their_drain():
    for name, service in compose_servers().items():
        graceful = float(service["environment"]["MATLORA_GRACEFUL_TIMEOUT"])
        assert graceful == GRACEFUL_TIMEOUT_S
        assert seconds(service["stop_grace_period"]) > graceful, name


def test_compose_replicas_match_nginx_upstreams():
    text = (DOCKER_DIR / "nginx" / "matlora-upstreams.conf").read_text()
    # The lines of matlora_replicas; those of matlora_replay end in "max_fails=0;".
    upstreams = re.findall(r"^\s*server\s+([\w.-]+):8000;", text, flags=re.MULTILINE)
    assert upstreams == sorted(compose_servers())


def test_compose_replicas_match_prometheus_targets():
    groups = json.loads((DOCKER_DIR / "prometheus" / "targets" / "replicas.json").read_text())
    targets = {group["labels"]["replica"]: group["targets"] for group in groups}
    assert targets == {name: [f"{name}:8000"] for name in compose_servers()}


def test_compose_upstreams_match_local_stack(local_stack):
    """nginx/matlora-upstreams.conf has the blocks that the local stack writes, for the compose replicas."""
    text = (DOCKER_DIR / "nginx" / "matlora-upstreams.conf").read_text()
    compose_lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]

    written = local_stack.nginx_upstreams([f"{name}:8000" for name in sorted(compose_servers())])

    assert compose_lines == [line.strip() for line in written.splitlines()]


def test_compose_sets_every_nginx_template_variable():
    template = (DOCKER_DIR / "nginx" / "matlora.conf.template").read_text()
    environment = load_yaml("compose.yaml")["services"]["nginx"]["environment"]
    assert set(re.findall(r"\$\{(MATLORA_\w+)\}", template)) == {"MATLORA_NGINX_ADDRESS", "MATLORA_NGINX_PORT"}
    assert environment["MATLORA_NGINX_ADDRESS"] == "0.0.0.0"
    assert environment["MATLORA_NGINX_PORT"] == "8080"


def test_compose_config_is_valid():
    # "docker compose config" checks the file against the compose specification; it
    # needs the client and its compose plugin, not an engine.
    if shutil.which("docker") is None:
        pytest.skip("docker client not installed")
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker compose plugin not installed")
    for files in (["compose.yaml"], ["compose.yaml", "compose.cuda.yaml"]):
        arguments = [argument for name in files for argument in ("-f", str(DOCKER_DIR / name))]

        result = subprocess.run(["docker", "compose", *arguments, "config", "--quiet"], capture_output=True, text=True)

        assert result.returncode == 0, f"{files}: {result.stderr}"


# Dockerfile


def test_dockerfile_is_multi_stage():
    text = (DOCKER_DIR / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, flags=re.MULTILINE)) >= 2


def test_dockerfile_user_is_non_root():
    text = (DOCKER_DIR / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)", text, flags=re.MULTILINE)
    assert users, "no USER instruction"
    uid = users[-1].split(":")[0]
    assert uid.isdigit()
    assert int(uid) != 0


def test_dockerfile_makes_model_cache_readable_by_runtime_user():
    text = (DOCKER_DIR / "Dockerfile").read_text()
    assert "chmod -R a+rX /opt/matlora/cache" in text


def test_dockerfile_healthcheck_and_offline_model():
    text = (DOCKER_DIR / "Dockerfile").read_text()
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", text, flags=re.MULTILINE)
    assert "HF_HUB_OFFLINE=1" in text
    assert "resolve_base('smollm2-135m')" in text
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in text


# nginx and Prometheus, as the local stack renders them


def test_render_template_fills_variables(local_stack):
    assert local_stack.render_template("listen ${MATLORA_NGINX_PORT}; $host", {"MATLORA_NGINX_PORT": "81"}) == (
        "listen 81; $host"
    )


def test_render_template_reports_missing_variable(local_stack):
    with pytest.raises(KeyError, match="MATLORA_NGINX_PORT"):
        local_stack.render_template("listen ${MATLORA_NGINX_PORT};", {})


def test_local_nginx_listens_on_loopback(local_stack, tmp_path):
    local_stack.write_nginx_config(tmp_path, 18080, ["127.0.0.1:18001"])
    rendered = (tmp_path / "conf.d" / "matlora.conf").read_text()
    assert re.findall(r"^\s*listen (.*);$", rendered, flags=re.MULTILINE) == ["127.0.0.1:18080 default_server"]


def test_nginx_upstreams_replay_without_failure_marks(local_stack):
    assert local_stack.nginx_upstreams(["127.0.0.1:18001", "127.0.0.1:18002"]) == (
        "upstream matlora_replicas {\n"
        "    zone matlora_replicas 64k;\n"
        "    server 127.0.0.1:18001;\n"
        "    server 127.0.0.1:18002;\n"
        "}\n"
        "upstream matlora_replay {\n"
        "    zone matlora_replay 64k;\n"
        "    server 127.0.0.1:18001 max_fails=0;\n"
        "    server 127.0.0.1:18002 max_fails=0;\n"
        "}\n"
    )


def test_nginx_config_passes_nginx_test(local_stack, tmp_path):
    try:
        nginx = local_stack.find_program("nginx")
    except FileNotFoundError:
        pytest.skip("nginx not installed (apt-get install nginx)")
    nginx_dir = tmp_path / "nginx"
    local_stack.write_nginx_config(nginx_dir, 18080, ["127.0.0.1:18001", "127.0.0.1:18002"])

    result = subprocess.run(
        [nginx, "-t", "-p", str(nginx_dir), "-c", str(nginx_dir / "nginx.conf"), "-e", "stderr"],
        capture_output=True,
        text=True,
    )

    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr


def test_prometheus_config_passes_promtool(local_stack, tmp_path):
    try:
        promtool = local_stack.find_program("promtool")
    except FileNotFoundError:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    local_stack.write_prometheus_config(tmp_path, {"server-1": "127.0.0.1:18001"})

    result = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_local_prometheus_config_is_the_compose_one(local_stack, tmp_path):
    local_stack.write_prometheus_config(tmp_path, {"server-1": "127.0.0.1:18001"})
    assert (tmp_path / "prometheus.yml").read_bytes() == (DOCKER_DIR / "prometheus" / "prometheus.yml").read_bytes()


# Kubernetes


@pytest.fixture(scope="module")
def deployment() -> dict:
    return load_yaml("k8s/deployment.yaml")


@pytest.fixture(scope="module")
def container(deployment) -> dict:
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    return server


def test_k8s_probes(container):
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"


def test_k8s_resources(container):
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) >= {"cpu", "memory"}, kind


def test_k8s_grace_period_covers_pre_stop_and_drain(deployment, container):
    env = {item["name"]: item.get("value") for item in container["env"]}
    graceful = float(env["MATLORA_GRACEFUL_TIMEOUT"])
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])

    grace_period = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]

    assert grace_period > pre_stop + graceful


def test_k8s_runs_as_non_root(deployment, container):
    pod_security = deployment["spec"]["template"]["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_k8s_prometheus_scrape_annotations(deployment, container):
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == ports["http"]


def test_k8s_service_selects_deployment_pods(deployment):
    service = load_yaml("k8s/service.yaml")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_k8s_kustomization_builds():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    result = subprocess.run([kubectl, "kustomize", str(DOCKER_DIR / "k8s")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    kinds = [document["kind"] for document in yaml.safe_load_all(result.stdout)]
    assert sorted(kinds) == ["Deployment", "PodDisruptionBudget", "Service"]


def test_k8s_files_are_all_listed():
    listed = set(load_yaml("k8s/kustomization.yaml")["resources"])
    present = {path.name for path in (DOCKER_DIR / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    # The ServiceMonitor needs the Prometheus Operator's CRDs, so it is applied on its own.
    assert present - listed == {"servicemonitor.yaml"}
    assert listed <= present


def test_servicemonitor_labels_replicas():
    monitor = load_yaml("k8s/servicemonitor.yaml")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "http"
    assert {"sourceLabels": ["__meta_kubernetes_pod_name"], "targetLabel": "replica"} in endpoint["relabelings"]


def test_yaml_files_parse():
    for path in sorted(DOCKER_DIR.rglob("*.yaml")) + sorted(DOCKER_DIR.rglob("*.yml")):
        documents = list(yaml.safe_load_all(path.read_text()))
        assert documents, Path(path).relative_to(DOCKER_DIR)
