"""deploy/ checked offline: no network, no Docker daemon, no Kubernetes cluster.

- deploy/kubernetes/: every resource validates, strictly (unknown fields are errors), against
  the Kubernetes API schemas of kubernetes-validate for Kubernetes 1.30 (the oldest version we
  state) and the newest version the installed package bundles; kustomization.yaml lists them all.
- The ConfigMap's gateway.yaml and policies/, laid out as the Deployment's volume `items` put
  them under /etc/gateway, pass `gateway check` with the environment the pod gets (the
  Secret's values and the container's env); deploy/compose/gateway/ passes it with compose's.
  `gateway check` opens no store, so the PostgreSQL and Redis URLs are only parsed.
- The Deployment: terminationGracePeriodSeconds ≥ shutdown.drain_delay + shutdown.timeout + 5
  (read from the ConfigMap's gateway.yaml, defaults included); no preStop sleep; readiness on
  /readyz and liveness on /healthz, on the admin listener's port, readiness failing within
  drain_delay; non-root as the image's user, read-only root filesystem with /tmp writable and
  nothing else to write (PostgreSQL store, GATEWAY_SECRET_KEY set); 2 replicas; the selectors of
  the Services, PodDisruptionBudget and NetworkPolicy match the pods; the NetworkPolicy admits
  the admin port 8081 from this namespace only; every Secret key the env refers to exists.
- deploy/compose.yaml validates against the Compose specification's JSON schema (vendored,
  unedited, in tests/data/; its README.md records source, licence and hash) and makes the
  topology hold: two gateway replicas built from the repository with the same
  GATEWAY_SECRET_KEY, nginx at a fixed address inside the fixed subnet and listed in
  trusted_proxies (nothing else is), health checks on /readyz and `depends_on: condition:
  service_healthy`, a stop grace period covering the drain, the admin port published on
  127.0.0.1 only, the routes' upstream a service listening there.
- deploy/compose/nginx.conf passes `nginx -t` (missing nginx fails under CI=true, skips
  elsewhere) and balances over both replicas the way the README recommends.
- The checks themselves catch what they are for: each is run on copies broken on purpose.

(The repository's Dockerfile is hadolint-checked in tests/test_packaging.py.)
"""

from __future__ import annotations

import base64
import copy
import hashlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from gateway.config import Config, load_config
from gateway.signing import secret_from_text
from tests.conftest import IN_CI

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_GATEWAY = DEPLOY / "compose" / "gateway" / "gateway.yaml"
NGINX_CONF = DEPLOY / "compose" / "nginx.conf"
COMPOSE_SCHEMA = Path(__file__).resolve().parent / "data" / "compose-spec.json"
NGINX = "/usr/sbin/nginx"

# The oldest Kubernetes we say the manifests work on, and the newest schemas installed.
KUBERNETES_VERSIONS = tuple(dict.fromkeys(["1.30.0", kubernetes_validate.latest_version()]))
DRAIN_SLACK = 5  # seconds of terminationGracePeriodSeconds beyond drain_delay + timeout
IMAGE_USER = 10001  # Dockerfile: useradd --uid 10001, USER 10001
CONFIG_PATH = "/etc/gateway/gateway.yaml"  # Dockerfile: GATEWAY_CONFIG
# Stand-ins for deploy/.env when compose.yaml is read here (as `docker compose config` would).
COMPOSE_ENV = {"GATEWAY_SECRET_KEY": "0" * 64, "POSTGRES_PASSWORD": "test-password"}

Manifest = dict[str, Any]


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def gateway_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without any GATEWAY_* of the caller's, plus `extra`."""
    base = {key: value for key, value in os.environ.items() if not key.startswith("GATEWAY_")}
    return {**base, **extra}


def gateway_check(config: Path, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "gateway", "--config", str(config), "check"]
    return subprocess.run(argv, env=gateway_env(env), capture_output=True, text=True, timeout=60, check=False)


# --- Kubernetes -------------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(path for path in KUBERNETES.glob("*.yaml") if path.name != "kustomization.yaml")


def documents(path: Path) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@dataclass
class Cluster:
    """The resources of deploy/kubernetes/, loaded afresh for each test (a test may break them)."""

    resources: list[Manifest]

    def one(self, kind: str, name: str | None = None) -> Manifest:
        found = [r for r in self.resources if r["kind"] == kind and name in (None, r["metadata"]["name"])]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
        return found[0]

    def all(self, kind: str) -> list[Manifest]:
        return [r for r in self.resources if r["kind"] == kind]

    @property
    def deployment(self) -> Manifest:
        return self.one("Deployment", "gateway")

    @property
    def pod(self) -> Manifest:
        spec: Manifest = self.deployment["spec"]["template"]["spec"]
        return spec

    @property
    def container(self) -> Manifest:
        [container] = [c for c in self.pod["containers"] if c["name"] == "gateway"]
        found: Manifest = container
        return found


def load_cluster() -> Cluster:
    return Cluster([doc for path in manifest_files() for doc in documents(path)])


def secret_values(cluster: Cluster, name: str) -> dict[str, str]:
    """A Secret's values as the pod sees them (stringData over base64 data); none if it is missing."""
    found = [secret for secret in cluster.all("Secret") if secret["metadata"]["name"] == name]
    if not found:
        return {}
    secret = found[0]
    values = {key: base64.b64decode(value).decode() for key, value in (secret.get("data") or {}).items()}
    values.update(secret.get("stringData") or {})
    return values


def container_env(cluster: Cluster) -> dict[str, str]:
    """The gateway container's environment: plain values and Secret references resolved."""
    env: dict[str, str] = {}
    for source in cluster.container.get("envFrom", []):
        if "secretRef" in source:
            env.update(secret_values(cluster, source["secretRef"]["name"]))
    for item in cluster.container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif "secretKeyRef" in item.get("valueFrom", {}):
            ref = item["valueFrom"]["secretKeyRef"]
            values = secret_values(cluster, ref["name"])
            if ref["key"] in values:
                env[item["name"]] = values[ref["key"]]
    return env


def lay_out_config(cluster: Cluster, root: Path) -> Path:
    """Write the files the pod sees under `root` (as if root were /): the ConfigMap volume's
    `items` (or every key) at its mountPath; return where GATEWAY_CONFIG points."""
    volumes = {volume["name"]: volume for volume in cluster.pod.get("volumes", [])}
    for mount in cluster.container.get("volumeMounts", []):
        source = volumes[mount["name"]].get("configMap")
        if source is None:
            continue
        data = cluster.one("ConfigMap", source["name"])["data"]
        items = source.get("items") or [{"key": key, "path": key} for key in data]
        for item in items:
            target = root / mount["mountPath"].lstrip("/") / item["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(data[item["key"]])
    config_path = container_env(cluster).get("GATEWAY_CONFIG", CONFIG_PATH)
    return root / config_path.lstrip("/")


def port_number(container: Manifest, port: int | str) -> int:
    """A probe's or Service's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    [number] = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    return int(number)


def listen_port(env: Mapping[str, str], variable: str) -> int:
    """The port of GATEWAY_PROXY_LISTEN / GATEWAY_ADMIN_LISTEN: the container's, else the image's."""
    dockerfile = (REPO / "Dockerfile").read_text()
    image = re.search(rf"{variable}=(\S+)", dockerfile)
    assert image is not None, f"the Dockerfile sets {variable}"
    return int(env.get(variable, image[1]).rsplit(":", 1)[1])


def matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def prestop_sleeps(container: Manifest) -> bool:
    """Whether the container's preStop hook waits (a `sleep` action, or a command that sleeps)."""
    hook = container.get("lifecycle", {}).get("preStop")
    if not hook:
        return False
    command = " ".join(hook.get("exec", {}).get("command", []))
    return "sleep" in hook or re.search(r"\bsleep\b", command) is not None


def kubernetes_problems(cluster: Cluster, config: Config) -> list[str]:
    """What is wrong with the Deployment and its companions, for the gateway `config` it mounts."""
    problems: list[str] = []
    deployment, pod, container = cluster.deployment, cluster.pod, cluster.container
    env = container_env(cluster)
    labels = deployment["spec"]["template"]["metadata"]["labels"]

    # Drain: SIGTERM → drain_delay (still serving) → timeout (in flight) → exit.
    needed = config.shutdown.drain_delay + config.shutdown.timeout + DRAIN_SLACK
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if grace < needed:
        problems.append(f"terminationGracePeriodSeconds {grace} < drain_delay + timeout + 5 = {needed:g}")
    if prestop_sleeps(container):
        problems.append(
            "a preStop hook sleeps: the gateway's drain_delay already keeps serving while /readyz is 503"
        )

    # Probes on the admin listener.
    admin_port = listen_port(env, "GATEWAY_ADMIN_LISTEN")
    for kind, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        probe = container.get(kind, {}).get("httpGet")
        if probe is None:
            problems.append(f"{kind}: missing (an httpGet on {path})")
            continue
        if probe.get("path") != path or port_number(container, probe["port"]) != admin_port:
            problems.append(f"{kind}: must GET {path} on the admin port {admin_port}, not {probe}")
    readiness = container.get("readinessProbe", {})
    out_after = readiness.get("periodSeconds", 10) * readiness.get("failureThreshold", 3)
    if out_after >= config.shutdown.drain_delay:
        problems.append(f"readinessProbe takes {out_after}s to fail: not within drain_delay")

    # Non-root, read-only, nothing to write but /tmp.
    security = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    if security.get("runAsNonRoot") is not True:
        problems.append("runAsNonRoot must be true")
    if security.get("runAsUser") != IMAGE_USER:
        problems.append(f"runAsUser must be the image's user {IMAGE_USER}")
    if container.get("securityContext", {}).get("readOnlyRootFilesystem") is not True:
        problems.append("readOnlyRootFilesystem must be true")
    if container.get("securityContext", {}).get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation must be false")
    if "ALL" not in container.get("securityContext", {}).get("capabilities", {}).get("drop", []):
        problems.append("capabilities must drop ALL")
    if security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append("seccompProfile must be RuntimeDefault")
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    mounts = {mount["mountPath"]: mount for mount in container.get("volumeMounts", [])}
    tmp = mounts.get("/tmp")
    if tmp is None or "emptyDir" not in volumes[tmp["name"]] or tmp.get("readOnly"):
        problems.append("/tmp must be a writable emptyDir ($TMPDIR: the metrics directory of --workers)")
    config_mount = mounts.get(str(Path(CONFIG_PATH).parent))
    if config_mount is None or not config_mount.get("readOnly"):
        problems.append("the ConfigMap must be mounted read-only at /etc/gateway")
    if not env.get("GATEWAY_STORE_URL", "").startswith("postgresql"):
        problems.append(
            "GATEWAY_STORE_URL must name PostgreSQL (the image's SQLite default needs a writable disk)"
        )
    if not env.get("GATEWAY_SECRET_KEY"):
        problems.append("GATEWAY_SECRET_KEY must be set (else gateway.secret is written beside gateway.yaml)")
    for key in ("requests", "limits"):
        if not {"cpu", "memory"} <= set(container.get("resources", {}).get(key, {})):
            problems.append(f"resources.{key} must set cpu and memory")

    # Replicas and who selects the pods.
    if deployment["spec"].get("replicas") != 2:
        problems.append("replicas must be 2")
    if not matches(deployment["spec"]["selector"]["matchLabels"], labels):
        problems.append("the Deployment's selector does not match its pod labels")
    for pdb in cluster.all("PodDisruptionBudget"):
        if not matches(pdb["spec"]["selector"].get("matchLabels", {}), labels):
            problems.append(
                f"PodDisruptionBudget {pdb['metadata']['name']}: selector does not match the pods"
            )
        if pdb["spec"].get("minAvailable") != 1:
            problems.append("PodDisruptionBudget: minAvailable must be 1")
    if not cluster.all("PodDisruptionBudget"):
        problems.append("no PodDisruptionBudget")
    service_ports: set[int] = set()
    for service in cluster.all("Service"):
        if not matches(service["spec"].get("selector", {}), labels):
            problems.append(f"Service {service['metadata']['name']}: selector does not match the pods")
        for port in service["spec"]["ports"]:
            service_ports.add(port_number(container, port.get("targetPort", port["port"])))
    proxy_port = listen_port(env, "GATEWAY_PROXY_LISTEN")
    if not {proxy_port, admin_port} <= service_ports:
        problems.append(f"Services must reach ports {proxy_port} and {admin_port}, not only {service_ports}")

    problems.extend(network_policy_problems(cluster, labels, proxy_port, admin_port))

    # Every Secret reference resolves.
    secrets = {secret["metadata"]["name"] for secret in cluster.all("Secret")}
    for item in container.get("env", []):
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref is None:
            continue
        if ref["name"] not in secrets:
            problems.append(f"env {item['name']}: no Secret {ref['name']!r}")
        elif ref["key"] not in secret_values(cluster, ref["name"]):
            problems.append(f"env {item['name']}: Secret {ref['name']!r} has no key {ref['key']!r}")

    # Every ConfigMap key reaches the pod: a policy file missing from `items` is silently absent.
    for volume in volumes.values():
        source = volume.get("configMap")
        if source and source.get("items"):
            data = cluster.one("ConfigMap", source["name"])["data"]
            missing = set(data) - {item["key"] for item in source["items"]}
            if missing:
                problems.append(f"ConfigMap keys not mounted (add them to items): {sorted(missing)}")
    return problems


def network_policy_problems(cluster: Cluster, labels: Mapping[str, str], proxy: int, admin: int) -> list[str]:
    """The admin port reachable from this namespace's pods only; the proxy port open."""
    policies = [
        p
        for p in cluster.all("NetworkPolicy")
        if matches(p["spec"]["podSelector"].get("matchLabels", {}), labels)
    ]
    if not policies:
        return ["no NetworkPolicy selects the gateway pods"]
    problems: list[str] = []
    proxy_open = False
    for policy in policies:
        if "Ingress" not in policy["spec"].get("policyTypes", ["Ingress"]):
            problems.append(f"NetworkPolicy {policy['metadata']['name']}: not an Ingress policy")
        for rule in policy["spec"].get("ingress", []):
            ports = {port_number(cluster.container, p["port"]) for p in rule.get("ports", []) if "port" in p}
            all_ports = not rule.get("ports")
            peers = rule.get("from")
            if admin in ports or all_ports:
                # Only `podSelector` peers: no namespaceSelector, no ipBlock, never "from anywhere".
                if not peers or any(set(peer) != {"podSelector"} for peer in peers):
                    problems.append(f"NetworkPolicy admits port {admin} from outside the namespace: {rule}")
            if proxy in ports and not peers:
                proxy_open = True
    if not proxy_open:
        problems.append(f"no NetworkPolicy rule admits the proxy port {proxy} from anywhere")
    return problems


@pytest.fixture
def cluster() -> Cluster:
    return load_cluster()


@pytest.fixture
def kubernetes_config(cluster: Cluster, tmp_path: Path) -> Config:
    """The ConfigMap's gateway.yaml as the pod loads it (defaults and the pod's env applied)."""
    return load_config(lay_out_config(cluster, tmp_path), env=container_env(cluster))


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda path: path.name)
def test_kubernetes_manifest_validates(path: Path, version: str) -> None:
    docs = documents(path)
    assert docs, f"{path.name} holds no resource"
    errors: list[str] = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:  # the schema's own dump is pages long
            where = "/".join(str(part) for part in exc.absolute_path)
            errors.append(f"{doc.get('kind')} {doc.get('metadata', {}).get('name')}: {where}: {exc.message}")
    assert errors == [], f"{path.name} against Kubernetes {version}"


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_yaml(KUBERNETES / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted(path.name for path in manifest_files())
    namespaces = {
        doc["metadata"].get("namespace") for doc in load_cluster().resources if doc["kind"] != "Namespace"
    }
    assert namespaces == {kustomization["namespace"]}


def test_kubernetes_deployment_is_sound(cluster: Cluster, kubernetes_config: Config) -> None:
    assert kubernetes_problems(cluster, kubernetes_config) == []


def test_kubernetes_config_passes_gateway_check(cluster: Cluster, tmp_path: Path) -> None:
    config = lay_out_config(cluster, tmp_path)
    assert (config.parent / "policies").is_dir(), "the policy keys must land in /etc/gateway/policies/"
    result = gateway_check(config, container_env(cluster))
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr, result.stderr


def test_kubernetes_secret_placeholders_cannot_run(cluster: Cluster) -> None:
    """The committed secret key is a placeholder the gateway refuses, never a working secret."""
    ref = next(
        item["valueFrom"]["secretKeyRef"]
        for item in cluster.container["env"]
        if item["name"] == "GATEWAY_SECRET_KEY"
    )
    placeholder = secret_values(cluster, ref["name"])[ref["key"]]
    assert "REPLACE" in placeholder
    with pytest.raises(ValueError, match="at least 32 characters"):
        secret_from_text(placeholder)


# --- Compose ----------------------------------------------------------------------------------

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} (and $$) in every string of `value`."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        name, operator, argument = match[1], match[2] or "", match[3] or ""
        if env.get(name):
            return env[name]
        if operator.endswith("?"):
            raise KeyError(f"{name}: {argument}")
        return argument if operator.endswith("-") else ""

    return _VARIABLE.sub(one, value.replace("$$", "\0")).replace("\0", "$")


def load_compose(env: Mapping[str, str] = COMPOSE_ENV) -> dict[str, Any]:
    compose: dict[str, Any] = interpolate(load_yaml(COMPOSE), env)
    return compose


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's `environment`, in either of its forms."""
    found = service.get("environment") or {}
    if isinstance(found, list):
        return dict(item.split("=", 1) for item in found if "=" in item)
    return {key: "" if value is None else str(value) for key, value in found.items()}


def command(service: Mapping[str, Any]) -> list[str]:
    found = service.get("command") or []
    return found.split() if isinstance(found, str) else [str(part) for part in found]


def seconds(duration: str | int | float) -> float:
    """A Compose duration ("1m30s", "40s", "500ms") in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", duration)
    assert "".join(f"{n}{u}" for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def builds_the_repository(service: Mapping[str, Any]) -> bool:
    build = service.get("build")
    context = build if isinstance(build, str) else (build or {}).get("context", ".")
    dockerfile = "Dockerfile" if isinstance(build, str) else (build or {}).get("dockerfile", "Dockerfile")
    return build is not None and (DEPLOY / context).resolve() == REPO and dockerfile == "Dockerfile"


def gateway_services(compose: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The services running `gateway serve` from the repository's image (not the demo upstream)."""
    return {
        name: service
        for name, service in compose["services"].items()
        if builds_the_repository(service) and command(service)[:1] in ([], ["serve"])
    }


def fixed_address(service: Mapping[str, Any], network: str) -> ipaddress.IPv4Address | None:
    networks = service.get("networks") or {}
    if isinstance(networks, list):
        return None
    address = (networks.get(network) or {}).get("ipv4_address")
    return ipaddress.IPv4Address(address) if address else None


def compose_problems(compose: Mapping[str, Any], config: Config) -> list[str]:
    """What is wrong with the compose topology, for the gateway `config` its replicas mount."""
    problems: list[str] = []
    services: dict[str, dict[str, Any]] = compose["services"]
    gateways = gateway_services(compose)
    if len(gateways) != 2:
        problems.append(f"expected two gateway replicas built from the repository, found {sorted(gateways)}")
    secrets = {environment(service).get("GATEWAY_SECRET_KEY") for service in gateways.values()}
    if len(secrets) != 1 or not all(secrets):
        problems.append("the gateway replicas must share one non-empty GATEWAY_SECRET_KEY")
    for name, service in gateways.items():
        env = environment(service)
        if not env.get("GATEWAY_STORE_URL", "").startswith("postgresql+asyncpg://"):
            problems.append(
                f"{name}: GATEWAY_STORE_URL must be the shared PostgreSQL (the image defaults to SQLite)"
            )
        if not env.get("GATEWAY_RATE_LIMIT_STORE_URL", "").startswith("redis://"):
            problems.append(f"{name}: GATEWAY_RATE_LIMIT_STORE_URL must be the shared Redis")
        test = " ".join(str(part) for part in (service.get("healthcheck") or {}).get("test", []))
        if service.get("healthcheck", {}).get("disable") or "/readyz" not in test:
            problems.append(f"{name}: its healthcheck must ask /readyz")
        needed = config.shutdown.drain_delay + config.shutdown.timeout + DRAIN_SLACK
        if seconds(service.get("stop_grace_period", "10s")) < needed:
            problems.append(f"{name}: stop_grace_period below drain_delay + timeout + 5 = {needed:g}s")
        for dependency, condition in (service.get("depends_on") or {}).items():
            wanted = condition.get("condition") if isinstance(condition, dict) else None
            if wanted == "service_healthy" and "healthcheck" not in services[dependency]:
                problems.append(f"{name} waits for {dependency} to be healthy, which has no healthcheck")
        if not any(volume.endswith(":/etc/gateway:ro") for volume in service.get("volumes", [])):
            problems.append(f"{name}: mount compose/gateway read-only at /etc/gateway")
        for port in service.get("ports", []):
            if str(port).split(":")[0] != "127.0.0.1":
                problems.append(f"{name}: publishes {port} beyond 127.0.0.1")

    nginx = services.get("nginx")
    if nginx is None:
        return [*problems, "no nginx service"]
    depends = nginx.get("depends_on") or {}
    for name in gateways:
        if not isinstance(depends, dict) or (depends.get(name) or {}).get("condition") != "service_healthy":
            problems.append(f"nginx must depend on {name} with condition: service_healthy")
    if not any(str(port).endswith("8080:8080") for port in nginx.get("ports", [])):
        problems.append("nginx must publish port 8080")

    [network_name] = list((nginx.get("networks") or {"default": None}).keys())
    ipam = (compose.get("networks", {}).get(network_name) or {}).get("ipam", {}).get("config", [])
    subnets = [ipaddress.ip_network(entry["subnet"]) for entry in ipam if "subnet" in entry]
    dynamic = [ipaddress.ip_network(entry["ip_range"]) for entry in ipam if "ip_range" in entry]
    address = fixed_address(nginx, network_name)
    if address is None or not any(address in subnet for subnet in subnets):
        problems.append(f"nginx needs a fixed address inside the network's fixed subnet {subnets}")
        return problems
    trusted = config.trusted_proxies
    if not any(address in network for network in trusted):
        problems.append(f"nginx's address {address} is not in trusted_proxies {[str(n) for n in trusted]}")
    if any(address in network for network in dynamic):
        problems.append(f"nginx's address {address} is inside ip_range: another container may take it")
    for name, service in services.items():
        other = fixed_address(service, network_name)
        if name != "nginx" and other is not None and any(other in network for network in trusted):
            problems.append(f"{name} ({other}) is trusted too: it could forge X-Forwarded-For")
    if any(network.overlaps(ip_range) for network in trusted for ip_range in dynamic):
        problems.append(
            "trusted_proxies overlaps ip_range: containers without a fixed address would be trusted"
        )

    # The routes reach the demo upstream where it listens.
    listening = {
        name: int(command(service)[command(service).index("--listen") + 1].rsplit(":", 1)[1])
        for name, service in services.items()
        if "--listen" in command(service)
    }
    for route in config.routes:
        host, _, port = route.upstream.split("://", 1)[1].split("/", 1)[0].partition(":")
        if listening.get(host) != int(port or 80):
            problems.append(f"route {route.name}: {route.upstream} is no service listening there")
    return problems


def compose_gateway_env(compose: Mapping[str, Any]) -> dict[str, str]:
    """The environment of the first gateway replica (they are checked to agree on the secret)."""
    return environment(next(iter(gateway_services(compose).values())))


@pytest.fixture
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture
def compose_config(compose: dict[str, Any]) -> Config:
    return load_config(COMPOSE_GATEWAY, env=compose_gateway_env(compose))


def compose_schema_errors(compose: Mapping[str, Any]) -> list[str]:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]


def test_compose_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    assert compose_schema_errors(compose) == []


def test_compose_schema_is_the_vendored_one() -> None:
    """The schema is upstream's, unedited: its hash is the one tests/data/README.md records."""
    digest = hashlib.sha256(COMPOSE_SCHEMA.read_bytes()).hexdigest()
    assert digest in (COMPOSE_SCHEMA.parent / "README.md").read_text()


def test_compose_needs_the_two_secrets() -> None:
    """Without deploy/.env Compose stops with a message instead of starting with empty secrets."""
    for name in COMPOSE_ENV:
        with pytest.raises(KeyError, match=name):
            load_compose({key: value for key, value in COMPOSE_ENV.items() if key != name})


def test_compose_topology_is_sound(compose: dict[str, Any], compose_config: Config) -> None:
    assert compose_problems(compose, compose_config) == []


def test_compose_config_passes_gateway_check(compose: dict[str, Any]) -> None:
    result = gateway_check(COMPOSE_GATEWAY, compose_gateway_env(compose))
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr, result.stderr


# --- nginx ------------------------------------------------------------------------------------


def nginx_directives(text: str) -> list[str]:
    """The config's directives, comments dropped and whitespace collapsed ("proxy_buffering off")."""
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    return [" ".join(part.split()) for part in re.split(r"[;{}]", code) if part.strip()]


def nginx_problems(text: str, compose: Mapping[str, Any]) -> list[str]:
    """The load-balancer settings the README recommends, against the compose services."""
    directives = nginx_directives(text)
    problems = [
        f"missing: {wanted}"
        for wanted in (
            "listen 8080",
            "proxy_http_version 1.1",
            "proxy_set_header Upgrade $http_upgrade",
            "proxy_set_header Connection $connection_upgrade",
            "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for",
            "proxy_request_buffering off",
            "proxy_buffering off",
            "proxy_next_upstream error timeout",
        )
        if wanted not in directives
    ]
    if not any(d.startswith("keepalive ") for d in directives):
        problems.append("missing: keepalive in the upstream block")
    servers = {d.split()[1].split(":")[0]: d.split()[1] for d in directives if d.startswith("server ")}
    for name, service in gateway_services(compose).items():
        proxy = int(environment(service).get("GATEWAY_PROXY_LISTEN", "0.0.0.0:8080").rsplit(":", 1)[1])
        if servers.get(name) != f"{name}:{proxy}":
            problems.append(f"the upstream block must name {name}:{proxy}")
    return problems


def test_nginx_balances_as_recommended(compose: dict[str, Any]) -> None:
    assert nginx_problems(NGINX_CONF.read_text(), compose) == []


def test_nginx_config_passes_nginx_t(compose: dict[str, Any], tmp_path: Path) -> None:
    """`nginx -t` on a copy in which only this differs, since nothing resolves offline and the
    test must not write outside its directory: each gateway service name in a `server` line is
    127.0.0.1, and the /tmp/ of the pid and temp paths is this test's directory."""
    if not os.access(NGINX, os.X_OK):
        message = f"{NGINX} is needed (Debian package nginx-light)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    text = NGINX_CONF.read_text()
    for name in gateway_services(compose):
        text, count = re.subn(rf"(\bserver\s+){re.escape(name)}:", r"\g<1>127.0.0.1:", text)
        assert count == 1, f"{name} appears in {count} server lines"
    text = text.replace("/tmp/", f"{tmp_path}/")
    copy_path = tmp_path / "nginx.conf"
    copy_path.write_text(text)
    argv = [NGINX, "-t", "-p", f"{tmp_path}/", "-e", "stderr", "-c", str(copy_path)]
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL, check=False
    )
    assert result.returncode == 0, result.stderr


# --- the checks catch what they are for -------------------------------------------------------


def _container(cluster: Cluster) -> Manifest:
    return cluster.container


KUBERNETES_BREAKAGES: dict[str, tuple[Callable[[Cluster], None], str]] = {
    "grace period too short": (
        lambda c: c.pod.__setitem__("terminationGracePeriodSeconds", 30),
        "terminationGracePeriodSeconds",
    ),
    "preStop sleep": (
        lambda c: _container(c).__setitem__("lifecycle", {"preStop": {"exec": {"command": ["sleep", "5"]}}}),
        "preStop",
    ),
    "preStop sleep action": (
        lambda c: _container(c).__setitem__("lifecycle", {"preStop": {"sleep": {"seconds": 5}}}),
        "preStop",
    ),
    "writable root": (
        lambda c: _container(c)["securityContext"].pop("readOnlyRootFilesystem"),
        "readOnlyRootFilesystem",
    ),
    "readiness on /healthz": (
        lambda c: _container(c)["readinessProbe"]["httpGet"].__setitem__("path", "/healthz"),
        "readinessProbe",
    ),
    "liveness on the proxy port": (
        lambda c: _container(c)["livenessProbe"]["httpGet"].__setitem__("port", "proxy"),
        "livenessProbe",
    ),
    "one replica": (lambda c: c.deployment["spec"].__setitem__("replicas", 1), "replicas"),
    "PDB selects nothing": (
        lambda c: c.one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].__setitem__("app", "other"),
        "PodDisruptionBudget",
    ),
    "admin port open to all": (
        lambda c: c.one("NetworkPolicy")["spec"]["ingress"][1].pop("from"),
        "8081",
    ),
    "admin port from any namespace": (
        lambda c: c.one("NetworkPolicy")["spec"]["ingress"][1]["from"].append({"namespaceSelector": {}}),
        "8081",
    ),
    "unknown Secret key": (
        lambda c: c.one("Secret")["stringData"].pop("secret-key"),
        "has no key",
    ),
    "policy file not mounted": (
        lambda c: c.pod["volumes"][0]["configMap"]["items"].pop(),
        "not mounted",
    ),
    "SQLite store": (
        lambda c: c.one("Secret")["stringData"].__setitem__("store-url", "sqlite+aiosqlite:///gateway.db"),
        "PostgreSQL",
    ),
}


@pytest.mark.parametrize("breakage", sorted(KUBERNETES_BREAKAGES))
def test_kubernetes_checks_catch(breakage: str, cluster: Cluster, kubernetes_config: Config) -> None:
    broken = Cluster(copy.deepcopy(cluster.resources))
    change, expected = KUBERNETES_BREAKAGES[breakage]
    change(broken)
    problems = kubernetes_problems(broken, kubernetes_config)
    assert any(expected in problem for problem in problems), problems


def test_kubernetes_checks_catch_a_longer_drain(cluster: Cluster, tmp_path: Path) -> None:
    """The grace period follows the ConfigMap: a longer shutdown.timeout there needs a longer one."""
    gateway_yaml = cluster.one("ConfigMap")["data"]["gateway.yaml"]
    cluster.one("ConfigMap")["data"]["gateway.yaml"] = gateway_yaml.replace("timeout: 30", "timeout: 60")
    config = load_config(lay_out_config(cluster, tmp_path), env=container_env(cluster))
    assert config.shutdown.timeout == 60
    assert any("terminationGracePeriodSeconds" in problem for problem in kubernetes_problems(cluster, config))


def test_kubernetes_validation_catches_an_unknown_field(cluster: Cluster) -> None:
    deployment = copy.deepcopy(cluster.deployment)
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def _gateway_named(compose: dict[str, Any], index: int) -> dict[str, Any]:
    return list(gateway_services(compose).values())[index]


COMPOSE_BREAKAGES: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "different secrets": (
        lambda c: _gateway_named(c, 1)["environment"].__setitem__("GATEWAY_SECRET_KEY", "1" * 64),
        "GATEWAY_SECRET_KEY",
    ),
    "one replica": (lambda c: c["services"].pop("gateway-2"), "two gateway replicas"),
    "nginx moved": (
        lambda c: c["services"]["nginx"]["networks"]["gateway"].__setitem__("ipv4_address", "172.28.0.20"),
        "trusted_proxies",
    ),
    "nginx in the dynamic range": (
        lambda c: c["networks"]["gateway"]["ipam"]["config"][0].__setitem__("ip_range", "172.28.0.0/25"),
        "ip_range",
    ),
    "nginx starts before the gateways are healthy": (
        lambda c: c["services"]["nginx"]["depends_on"]["gateway-2"].__setitem__(
            "condition", "service_started"
        ),
        "service_healthy",
    ),
    "short stop grace": (
        lambda c: _gateway_named(c, 0).__setitem__("stop_grace_period", "10s"),
        "stop_grace_period",
    ),
    "admin published on all interfaces": (
        lambda c: _gateway_named(c, 0).__setitem__("ports", ["8081:8081"]),
        "beyond 127.0.0.1",
    ),
    "SQLite store": (lambda c: _gateway_named(c, 0)["environment"].pop("GATEWAY_STORE_URL"), "PostgreSQL"),
}


@pytest.mark.parametrize("breakage", sorted(COMPOSE_BREAKAGES))
def test_compose_checks_catch(breakage: str, compose: dict[str, Any], compose_config: Config) -> None:
    broken = copy.deepcopy(compose)
    change, expected = COMPOSE_BREAKAGES[breakage]
    change(broken)
    problems = compose_problems(broken, compose_config)
    assert any(expected in problem for problem in problems), problems


def test_compose_checks_catch_a_trusted_subnet(compose: dict[str, Any], tmp_path: Path) -> None:
    """Trusting the whole network would let any container forge X-Forwarded-For."""
    text = COMPOSE_GATEWAY.read_text().replace(
        'trusted_proxies: ["172.28.0.10"]', 'trusted_proxies: ["172.28.0.0/24"]'
    )
    shutil.copytree(COMPOSE_GATEWAY.parent, tmp_path / "gateway")
    (tmp_path / "gateway" / "gateway.yaml").write_text(text)
    config = load_config(tmp_path / "gateway" / "gateway.yaml", env=compose_gateway_env(compose))
    problems = compose_problems(compose, config)
    assert any("trusted too" in problem for problem in problems), problems
    assert any("overlaps ip_range" in problem for problem in problems), problems


def test_compose_schema_catches_an_unknown_key(compose: dict[str, Any]) -> None:
    broken = copy.deepcopy(compose)
    broken["services"]["nginx"]["depend_on"] = ["gateway-1"]
    assert any("depend_on" in error for error in compose_schema_errors(broken))


def test_nginx_checks_catch(compose: dict[str, Any]) -> None:
    text = NGINX_CONF.read_text()
    for directive in ("proxy_buffering off;", "proxy_request_buffering off;", "server gateway-2:8080"):
        broken = text.replace(directive, f"# {directive}")
        assert nginx_problems(broken, compose), directive
