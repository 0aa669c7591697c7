"""deploy/ checked with the tools operators use, and against each other.

Real tools, no stand-ins: `promtool check config` / `check rules` / `test rules`
(Debian's `prometheus`), `docker-compose config` (Debian's `docker-compose`,
which needs no Docker engine for it), `kubernetes-validate` (PyPI, bundled
schemas), `systemd-analyze verify` (Debian's `systemd`). A missing tool fails
the test with what to install; `bash scripts/test` installs them.

No Docker engine runs here, so the image is not built; instead the wheel is
built from exactly what the Dockerfile copies, the daemon's command line of
every file is parsed by the real CLI into a DaemonConfig (a renamed flag breaks
this test), and the Dockerfile's HEALTHCHECK is run against a real daemon.
"""

from __future__ import annotations

import configparser
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from conftest import ROOT
from procs import wait_for
from setuptools.config.pyprojecttoml import read_configuration

from lrpilot.daemon.cli.main import build_parser
from lrpilot.daemon.service.config import DaemonConfig

DEPLOY = ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
RULES = PROMETHEUS_DIR / "lrpilot.rules.yml"
RULES_TEST = PROMETHEUS_DIR / "lrpilot.rules.test.yml"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
KUBERNETES = DEPLOY / "kubernetes"
UNIT = DEPLOY / "systemd" / "lrpilot.service"
GRAFANA = DEPLOY / "grafana" / "provisioning"

DATA_PORT, METRICS_PORT = 7311, 9317
STATE_DIR = Path("/var/lib/lrpilot")
DATASOURCE_UID = "lrpilot-prometheus"
# What else a dashboard may name: Grafana's built-in source (annotations), by
# its uid in current and in older Grafana.
GRAFANA_OWN_UIDS = {DATASOURCE_UID, "grafana", "-- Grafana --"}
# The oldest Kubernetes minor still in support when these manifests were
# written; kubernetes-validate>=1.30 bundles its schemas.
KUBERNETES_VERSION = "1.30.0"
OPERATOR_API = "monitoring.coreos.com/v1"

INSTALL_HINT = {
    "promtool": "Debian's `prometheus` package (apt-get install prometheus)",
    "docker-compose": "Debian's `docker-compose` package (apt-get install docker-compose)",
    "systemd-analyze": "Debian's `systemd` package (apt-get install systemd)",
}


def tool(name: str) -> str:
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} is missing: install {INSTALL_HINT[name]}, or run `bash scripts/test`")
    return found


def run_tool(*argv: str, cwd: Path = ROOT) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{shlex.join(argv)} exited {done.returncode}:\n{output}"
    return output


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def daemon_config(argv: list[str]) -> DaemonConfig:
    """What `lrpilot ARGV` would run the daemon with: the real parser, then
    DaemonConfig from the flags given, as cmd_daemon builds it."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"`lrpilot {shlex.join(argv)}` is not a valid command line (see stderr)")
    assert args.command == "daemon", f"not a daemon command line: {argv}"
    fields = DaemonConfig.model_fields
    return DaemonConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})


def tcp_port(address: str) -> int:
    port = urlsplit(address).port
    assert port is not None, address
    return port


def host_port(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host, int(port)


# --- the Dockerfile --------------------------------------------------------


def dockerfile_stages(text: str) -> list[list[tuple[str, str]]]:
    """(INSTRUCTION, arguments) per build stage; continuations joined."""
    stages: list[list[tuple[str, str]]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        instruction, _, rest = (pending + line).partition(" ")
        pending = ""
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), rest.strip()))
    return stages


def last(stage: list[tuple[str, str]], instruction: str) -> str:
    values = [rest for name, rest in stage if name == instruction]
    assert values, f"the Dockerfile's final stage has no {instruction}"
    return values[-1]


def exec_form(rest: str, what: str) -> list[str]:
    # Shell form runs under /bin/sh, which does not pass SIGTERM on: the
    # daemon would be killed without flushing its store.
    assert rest.startswith("["), f"{what} must be in exec form (a JSON array), got {rest}"
    return json.loads(rest)


@pytest.fixture(scope="module")
def image() -> list[tuple[str, str]]:
    return dockerfile_stages(DOCKERFILE.read_text())[-1]


def test_dockerfile_runs_the_daemon_as_a_non_root_user_with_its_state_in_a_volume(image):
    entrypoint = exec_form(last(image, "ENTRYPOINT"), "ENTRYPOINT")
    cmd = exec_form(last(image, "CMD"), "CMD")
    assert entrypoint == ["lrpilot"]
    config = daemon_config(cmd)
    assert tcp_port(config.address) == DATA_PORT
    assert config.metrics_host_port == ("0.0.0.0", METRICS_PORT)
    assert config.state_dir == STATE_DIR
    assert set(last(image, "EXPOSE").split()) == {str(DATA_PORT), str(METRICS_PORT)}
    assert str(STATE_DIR) in json.loads(last(image, "VOLUME"))
    assert last(image, "USER") not in ("root", "0")
    env = dict(item.split("=", 1) for item in shlex.split(last(image, "ENV")))
    assert env["LRPILOT_STATE_DIR"] == str(STATE_DIR), "the store's default: the volume"
    assert last(image, "STOPSIGNAL") == "SIGTERM"


def dockerfile_copies() -> list[str]:
    """The build context paths the Dockerfile copies (COPY without --from)."""
    sources = []
    for stage in dockerfile_stages(DOCKERFILE.read_text()):
        for name, rest in stage:
            words = rest.split()
            if name == "COPY" and not any(w.startswith("--from") for w in words):
                sources += [w.rstrip("/") for w in words[:-1] if not w.startswith("--")]
    return sources


def test_the_image_builds_its_wheel_from_what_the_dockerfile_copies_without_torch(tmp_path):
    """The Dockerfile's COPY lines carry everything `pip wheel .` needs (a new
    top-level file in pyproject would break `docker build`), .dockerignore
    keeps none of them out, and the wheel's required dependencies have no torch."""
    sources = dockerfile_copies()
    ignored = [
        line.strip().lstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert {".venv", ".git"} <= set(ignored), "the build context would carry .venv and .git"
    for source in sources:
        hit = [p for p in ignored if fnmatch.fnmatch(source, p.removeprefix("**/"))]
        assert not hit, f".dockerignore {hit} keeps {source}, which the Dockerfile copies, out"
    context = tmp_path / "context"
    for source in sources:
        origin = ROOT / source
        if origin.is_dir():
            shutil.copytree(origin, context / source, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (context / source).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, context / source)
    wheels = tmp_path / "wheels"
    run_tool(
        sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
        "--wheel-dir", str(wheels), str(context),
    )  # fmt: skip
    (wheel,) = wheels.glob("lrpilot-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        requires = [
            line.split(":", 1)[1].strip()
            for line in archive.read(meta).decode().splitlines()
            if line.startswith("Requires-Dist:")
        ]
        entry_points = archive.read(meta.replace("METADATA", "entry_points.txt")).decode()
    assert {
        "lrpilot/daemon/cli/main.py",
        "lrpilot/daemon/observability/exporter.py",
        "lrpilot/hook.py",
    } <= names
    # setuptools' own reading of pyproject (globs expanded), as the build does.
    pyproject = read_configuration(ROOT / "pyproject.toml")
    version = pyproject["project"]["version"]
    for target, files in pyproject["tool"]["setuptools"].get("data-files", []):
        for file in files:
            packed = f"lrpilot-{version}.data/data/{target}/{Path(file).name}"
            assert packed in names, f"{packed} (data-files) missing: COPY {file}"
    assert "lrpilot = lrpilot.daemon.cli:main" in entry_points
    base = [r for r in requires if "extra ==" not in r]
    assert base and not [r for r in base if r.lower().startswith("torch")], base


def test_dockerfile_healthcheck_passes_against_a_live_daemon_and_fails_without_one(
    image, running_daemon
):
    """The HEALTHCHECK's command, run as Docker runs it (with the test
    daemon's metrics port in place of 9317), against a real daemon."""
    healthcheck = last(image, "HEALTHCHECK")
    argv = exec_form(healthcheck[healthcheck.index("CMD") + 3 :].strip(), "HEALTHCHECK CMD")
    assert argv[0] == "python", "the image has python, not curl or wget"
    assert f"127.0.0.1:{METRICS_PORT}/healthz" in " ".join(argv)
    port = running_daemon.metrics.rpartition(":")[2]
    probe = [sys.executable, *(a.replace(str(METRICS_PORT), port) for a in argv[1:])]

    def healthy() -> bool:
        return subprocess.run(probe, capture_output=True, timeout=20).returncode == 0

    wait_for(healthy, 20, "the HEALTHCHECK to pass", running_daemon.log)
    running_daemon.stop()
    assert not healthy(), "the HEALTHCHECK passes with no daemon: it checks nothing"


# --- Prometheus ------------------------------------------------------------


def prometheus_configs() -> list[Path]:
    found = [p for p in PROMETHEUS_DIR.glob("*.yml") if "scrape_configs" in (load(p) or {})]
    assert len(found) >= 2, f"expected the compose and the host configs in {PROMETHEUS_DIR}"
    return sorted(found)


@pytest.mark.parametrize("config", prometheus_configs(), ids=lambda p: p.name)
def test_promtool_accepts_the_prometheus_config(config):
    output = run_tool(tool("promtool"), "check", "config", str(config))
    assert "SUCCESS" in output


def test_promtool_accepts_the_rules_here_and_in_the_prometheusrule(tmp_path):
    """The rule file, and the PrometheusRule's spec (the same groups, for the
    Prometheus operator), which must not drift from it."""
    promtool = tool("promtool")
    assert "SUCCESS: 9 rules found" in run_tool(promtool, "check", "rules", str(RULES))
    (operator_rule,) = [d for d in kubernetes_docs() if d["kind"] == "PrometheusRule"]
    assert operator_rule["apiVersion"] == OPERATOR_API
    assert operator_rule["spec"]["groups"] == load(RULES)["groups"], "edit both files"
    spec = tmp_path / "prometheusrule-spec.yml"
    spec.write_text(yaml.safe_dump(operator_rule["spec"]))
    run_tool(promtool, "check", "rules", str(spec))


def test_promtool_unit_tests_fire_each_alert_when_it_should():
    """deploy/prometheus/lrpilot.rules.test.yml: synthetic series in, alerts
    (labels and annotations) out, at times before and after each `for`."""
    output = run_tool(tool("promtool"), "test", "rules", str(RULES_TEST))
    assert "SUCCESS" in output


def documented_metrics() -> set[str]:
    text = (ROOT / "docs" / "metrics.md").read_text()
    return set(re.findall(r"`((?:lrpilot|process|python)_[a-z0-9_]+)`", text))


PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "bool", "offset"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: strings, label matchers,
    groupings and ranges removed, then every identifier that is not a
    function call, a keyword or a number."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", expr)
    return {n for n in names if n not in PROMQL_WORDS and not re.fullmatch(r"\d+\w*", n)}


def test_metric_names_seen_by_the_promql_reader():
    expr = 'sum by (instance, reason) (rate(lrpilot_x_total{reason!~"a|b"}[5m])) > 0 and up == 1'
    assert metric_names(expr) == {"lrpilot_x_total", "up"}


def test_every_alert_uses_documented_metrics_and_says_what_is_wrong():
    known = documented_metrics() | {"up"}  # up: Prometheus's own, per target
    assert "lrpilot_run_step" in known, "docs/metrics.md's tables were not read"
    rules = [rule for group in load(RULES)["groups"] for rule in group["rules"]]
    assert len(rules) >= 5
    for rule in rules:
        unknown = metric_names(rule["expr"]) - known
        assert not unknown, f"{rule['alert']}: {sorted(unknown)} not in docs/metrics.md"
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
    uses = {name for rule in rules for name in metric_names(rule["expr"])}
    assert {"up", "lrpilot_run_step", "lrpilot_messages_rejected_total"} <= uses
    assert {"lrpilot_rank_lag_steps", "lrpilot_rank_records_dropped_total"} <= uses


def scrape_targets(config: Path) -> dict[str, list[str]]:
    return {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in load(config)["scrape_configs"]
    }


# --- YAML, compose, Grafana ------------------------------------------------


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))


def test_every_yaml_file_under_deploy_parses():
    assert len(yaml_files()) >= 12
    for path in yaml_files():
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), f"{path}: not a YAML mapping"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file as docker-compose resolves it (paths made absolute)."""
    output = subprocess.run(
        [tool("docker-compose"), "-f", str(COMPOSE), "config"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert output.returncode == 0, f"docker-compose config:\n{output.stderr}"
    return yaml.safe_load(output.stdout)


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> source (a named volume, or an absolute host path)."""
    found = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2] if isinstance(volume, str) else (None, None)
        found[target] = source
    return found


def test_compose_runs_the_daemon_on_the_documented_ports_with_a_named_volume(compose, image):
    services = compose["services"]
    assert set(services) == {"lrpilot", "prometheus", "grafana"}
    daemon = services["lrpilot"]
    assert daemon["build"]["context"] == str(ROOT)
    assert (ROOT / daemon["build"]["dockerfile"]).resolve() == DOCKERFILE
    command = daemon.get("command") or exec_form(last(image, "CMD"), "CMD")
    config = daemon_config(command)
    ports = {(int(p["published"]), int(p["target"])) for p in daemon["ports"]}
    assert ports == {(DATA_PORT, DATA_PORT), (METRICS_PORT, METRICS_PORT)}
    assert tcp_port(config.address) == DATA_PORT
    assert config.metrics_host_port == ("0.0.0.0", METRICS_PORT)
    volume = mounts(daemon)[str(config.state_dir)]
    assert volume in compose["volumes"], "the store must be on a named volume"
    assert config.state_dir == STATE_DIR
    assert daemon["restart"] == "unless-stopped"
    if config.grafana_url:  # annotations for LR changes: compose's Grafana, its port
        url = urlsplit(config.grafana_url)
        grafana_ports = {int(p["target"]) for p in services["grafana"]["ports"]}
        assert url.hostname == "grafana" and url.port in grafana_ports, config.grafana_url


def test_compose_prometheus_scrapes_the_daemon_with_its_rules_mounted(compose):
    prometheus = compose["services"]["prometheus"]
    flags = dict(f.removeprefix("--").split("=", 1) for f in prometheus["command"])
    config_in_container = Path(flags["config.file"])
    mounted = mounts(prometheus)
    source = Path(mounted[str(config_in_container)])
    assert source == PROMETHEUS_DIR / "prometheus.yml"
    for rule_file in load(source)["rule_files"]:
        assert mounted[str(config_in_container.parent / rule_file)] == str(RULES)
    host, port = host_port(scrape_targets(source)["lrpilot"][0])
    assert (host, port) == ("lrpilot", METRICS_PORT), "compose's service name and metrics port"


def test_grafana_is_provisioned_with_the_datasource_and_dashboards_compose_mounts(compose):
    grafana = compose["services"]["grafana"]
    mounted = mounts(grafana)
    assert Path(mounted["/etc/grafana/provisioning"]) == GRAFANA
    (datasource,) = load(GRAFANA / "datasources" / "lrpilot.yml")["datasources"]
    assert datasource["uid"] == DATASOURCE_UID
    assert datasource["type"] == "prometheus"
    url = urlsplit(datasource["url"])
    assert url.hostname in compose["services"]
    published = {int(p["target"]) for p in compose["services"][url.hostname]["ports"]}
    assert url.port in published
    (provider,) = load(GRAFANA / "dashboards" / "lrpilot.yml")["providers"]
    assert provider["type"] == "file"
    dashboards_in_container = provider["options"]["path"]
    assert Path(mounted[dashboards_in_container]) == ROOT / "dashboards"


def datasource_uids(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = set()
        source = node.get("datasource")
        if isinstance(source, dict) and isinstance(source.get("uid"), str):
            found.add(source["uid"])
        for value in node.values():
            found |= datasource_uids(value)
        return found
    if isinstance(node, list):
        return set().union(*(datasource_uids(v) for v in node)) if node else set()
    return set()


def test_the_dashboards_name_the_provisioned_datasource():
    """Grafana loads dashboards/*.json as they are: a panel that names another
    datasource uid shows "datasource not found". (Variables like ${ds} and
    Grafana's built-in annotation source are fine.)"""
    dashboards = sorted((ROOT / "dashboards").glob("*.json"))
    assert dashboards, "dashboards/ has no JSON: the provisioned Grafana would be empty"
    for path in dashboards:
        uids = datasource_uids(json.loads(path.read_text()))
        stray = {u for u in uids if not u.startswith("$") and u not in GRAFANA_OWN_UIDS}
        assert not stray, f"{path.name} names datasource uids {sorted(stray)}"


# --- Kubernetes -------------------------------------------------------------


def kubernetes_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [dict(d, _file=path.name) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(kind: str) -> dict[str, Any]:
    (found,) = [d for d in kubernetes_docs() if d["kind"] == kind]
    return found


def test_kubernetes_manifests_validate_against_the_bundled_schemas():
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail("kubernetes-validate is missing: pip install -e '.[test]' (bash scripts/test)")
    checked = []
    for doc in kubernetes_docs():
        if doc["apiVersion"] == OPERATOR_API:
            continue  # a CRD: no bundled schema; its shape is checked below
        manifest = {k: v for k, v in doc.items() if k != "_file"}
        try:
            kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{doc['_file']}: {path}: {exc.message}")
        checked.append(doc["kind"])
    assert sorted(checked) == ["ConfigMap", "Deployment", "PersistentVolumeClaim", "Service"]


def test_kustomization_lists_every_manifest():
    listed = load(KUBERNETES / "kustomization.yaml")["resources"]
    on_disk = sorted(p.name for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk


def container() -> dict[str, Any]:
    (found,) = by_kind("Deployment")["spec"]["template"]["spec"]["containers"]
    return found


def test_deployment_runs_one_writer_non_root_with_a_read_only_root(image):
    deployment = by_kind("Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate", "one store writer"
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    uid = re.search(r"--uid (\d+)", last(image, "RUN"))
    assert uid and pod["securityContext"]["runAsUser"] == int(uid.group(1)), "the image's user"
    security = container()["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert container()["resources"]["requests"] and container()["resources"]["limits"]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if
              "persistentVolumeClaim" in v}  # fmt: skip
    assert list(claims.values()) == [by_kind("PersistentVolumeClaim")["metadata"]["name"]]
    (state_mount,) = [m for m in container()["volumeMounts"] if m["name"] in claims]
    assert not state_mount.get("readOnly"), "the store's volume must be writable"
    assert Path(state_mount["mountPath"]) == STATE_DIR


def test_deployment_command_line_with_the_configmap_environment(monkeypatch):
    """The daemon as the pod runs it: the Deployment's args through the real
    CLI, with the ConfigMap's data as the environment."""
    data = by_kind("ConfigMap")["data"]
    refs = [e["configMapRef"]["name"] for e in container()["envFrom"]]
    assert refs == [by_kind("ConfigMap")["metadata"]["name"]]
    read_by_the_daemon = {"LRPILOT_METRICS_ADDR", "LRPILOT_STATE_DIR"}
    assert set(data) <= read_by_the_daemon, f"not read: {set(data) - read_by_the_daemon}"
    for name, value in data.items():
        monkeypatch.setenv(name, value)
    config = daemon_config(container()["args"])
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert ports == {"data": DATA_PORT, "metrics": METRICS_PORT}
    assert tcp_port(config.address) == ports["data"]
    assert config.metrics_host_port == ("0.0.0.0", ports["metrics"])
    assert config.state_dir == STATE_DIR
    # Liveness asks only whether the loop turns (a restart mends that, not a
    # full disk); readiness and startup ask /healthz, which the store fails.
    paths = {"startupProbe": "/healthz", "readinessProbe": "/healthz", "livenessProbe": "/livez"}
    for probe, path in paths.items():
        check = container()[probe]["httpGet"]
        assert (check["path"], check["port"]) == (path, "metrics"), probe


def test_service_and_servicemonitor_reach_the_pods_ports_by_name():
    service = by_kind("Service")
    pod_labels = by_kind("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    container_ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert {n: p["port"] for n, p in ports.items()} == {"data": DATA_PORT, "metrics": METRICS_PORT}
    assert all(p["targetPort"] in container_ports for p in ports.values())
    monitor = by_kind("ServiceMonitor")
    assert monitor["apiVersion"] == OPERATOR_API
    selected = monitor["spec"]["selector"]["matchLabels"]
    assert selected.items() <= service["metadata"]["labels"].items(), "selects no Service"
    assert monitor["spec"]["endpoints"], "no endpoint to scrape"
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] == "metrics" and endpoint["port"] in ports
        assert endpoint.get("path", "/metrics") == "/metrics"
    # The alert rules match job="lrpilot": the operator names the job after the Service.
    assert service["metadata"]["name"] == "lrpilot" and "jobLabel" not in monitor["spec"]


# --- systemd ----------------------------------------------------------------


def read_unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read_string(UNIT.read_text())
    return unit


def test_systemd_unit_runs_the_daemon_with_its_state_directory_and_hardening():
    service = read_unit()["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0].startswith("/") and Path(argv[0]).name == "lrpilot", argv[0]
    config = daemon_config(argv[1:])
    assert tcp_port(config.address) == DATA_PORT
    # systemd creates /var/lib/<StateDirectory> for the dynamic user.
    assert config.state_dir == Path("/var/lib") / service["StateDirectory"] == STATE_DIR
    host, port = config.metrics_host_port or ("", 0)
    target = scrape_targets(PROMETHEUS_DIR / "prometheus-host.yml")["lrpilot"]
    assert target == [f"{host}:{port}"] and port == METRICS_PORT
    assert service["KillSignal"] == "SIGTERM" and service["Restart"] == "on-failure"
    assert service["TimeoutStopSec"]
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
    }.items():
        assert service.get(key) == value, key
    assert service.get("DynamicUser") == "yes" or service.get("User") not in (None, "root")


def test_systemd_analyze_verifies_the_unit(tmp_path, lrpilot_exe):
    """`systemd-analyze verify` checks every key and that ExecStart's binary
    exists: the unit is verified with the installed `lrpilot` in its place."""
    unit = tmp_path / "lrpilot.service"
    text = UNIT.read_text()
    binary = shlex.split(read_unit()["Service"]["ExecStart"])[0]
    unit.write_text(text.replace(f"ExecStart={binary} ", f"ExecStart={lrpilot_exe} "))
    output = run_tool(tool("systemd-analyze"), "verify", str(unit))
    complaints = [line for line in output.splitlines() if unit.name in line]
    assert not complaints, "\n".join(complaints)
