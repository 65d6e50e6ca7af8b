"""deploy/kubernetes/: the kustomize base, as an operator would apply it.

Rendered with `kubectl kustomize` where kubectl exists (it does on this project's machines and
CI); elsewhere with `render_by_hand`, which reads the base's `resources`, its
`configMapGenerator` and its `images` the way kustomize does for this base (without the
ConfigMap's hash suffix): `test_the_renderer_in_use` says which ran. Every object is then
validated against the Kubernetes OpenAPI schemas kubernetes-validate ships (offline, strict:
an unknown field fails), for the oldest release the base supports (1.30: gRPC probes, sleep-
free preStop) and the newest the package knows; then what a user would notice is checked
against icegate's own settings, image and renderer.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from icegate_server.settings import SECRET_SETTINGS, SETTINGS, env_name, load_settings

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "kubernetes"
DOCKERFILE = ROOT / "deploy" / "container" / "Dockerfile"
ICEGATE_SERVER = Path(sys.executable).parent / "icegate-server"
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
SECRET_NAME = "icegate-secrets"
SETTING_VARIABLES = {env_name(name) for name in SETTINGS}
SECRET_VARIABLES = {env_name(name) for name in SECRET_SETTINGS}

Manifest = dict[str, Any]


def render_by_hand() -> list[Manifest]:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    manifests: list[Manifest] = []
    for resource in kustomization["resources"]:
        manifests.extend(doc for doc in yaml.safe_load_all((BASE / resource).read_text())
                         if doc)
    for generated in kustomization.get("configMapGenerator", []):
        data: dict[str, str] = {}
        for env_file in generated.get("envs", []):
            for line in (BASE / env_file).read_text().splitlines():
                if line.strip() and not line.startswith("#"):
                    key, _, value = line.partition("=")
                    data[key] = value
        manifests.append({"apiVersion": "v1", "kind": "ConfigMap",
                          "metadata": {"name": generated["name"]}, "data": data})
    tags = {image["name"]: image for image in kustomization.get("images", [])}
    for manifest in manifests:
        for container in all_containers(manifest):
            image = tags.get(container["image"])
            if image is not None:
                container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    for label in kustomization.get("labels", []):
        for manifest in manifests:
            manifest["metadata"].setdefault("labels", {}).update(label["pairs"])
    return manifests


def render() -> tuple[list[Manifest], str]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return render_by_hand(), "render_by_hand"
    result = subprocess.run([kubectl, "kustomize", str(BASE)], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc], "kubectl kustomize"


@pytest.fixture(scope="module")
def rendered() -> tuple[list[Manifest], str]:
    return render()


@pytest.fixture(scope="module")
def manifests(rendered) -> list[Manifest]:
    return rendered[0]


def pod_spec(manifest: Manifest) -> Manifest:
    return manifest["spec"]["template"]["spec"]


def all_containers(manifest: Manifest) -> list[Manifest]:
    if manifest["kind"] not in ("Deployment", "DaemonSet"):
        return []
    spec = pod_spec(manifest)
    return [*spec.get("initContainers", []), *spec["containers"]]


def one(manifests: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    (found,) = [m for m in manifests
                if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)]
    return found


def container(manifest: Manifest, name: str) -> Manifest:
    (found,) = [c for c in all_containers(manifest) if c["name"] == name]
    return found


def plain_env(manifests: list[Manifest], item: Manifest) -> dict[str, str]:
    """A container's environment as icegate sees it: its ConfigMap's, then its own values."""
    env: dict[str, str] = {}
    for source in item.get("envFrom", []):
        env.update(one(manifests, "ConfigMap")["data"]
                   if "configMapRef" in source else {})
    env.update({var["name"]: var["value"] for var in item.get("env", []) if "value" in var})
    return env


def secret_refs(item: Manifest) -> dict[str, Manifest]:
    return {var["name"]: var["valueFrom"]["secretKeyRef"] for var in item.get("env", [])
            if "secretKeyRef" in var.get("valueFrom", {})}


def dummy_secrets(item: Manifest) -> dict[str, str]:
    """Values an operator's Secret would hold for the keys `item` reads."""
    values = {"ICEGATE_TURN_SECRETS": "k8s-test-turn-secret-0123456789",
              "ICEGATE_API_KEYS": "igk_k8s_test_admin_key_0123456789",
              "ICEGATE_MASTER_KEY": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
              "ICEGATE_STORE": "redis://:pw@icegate-redis:6379/0",
              "ICEGATE_COTURN_REDIS": "redis://:pw@icegate-redis:6379/1",
              "ICEGATE_COTURN_STATSDB": "redis://:pw@icegate-redis:6379/2"}
    return {name: values[ref["key"]] for name, ref in secret_refs(item).items()}


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def named_port(item: Manifest, name: str) -> int:
    (port,) = [p["containerPort"] for p in item["ports"] if p["name"] == name]
    return int(port)


# --- the rendering and the schemas ---------------------------------------------------------------


def test_the_renderer_in_use(rendered):
    manifests, renderer = rendered
    print(f"rendered with {renderer}")
    assert renderer == ("kubectl kustomize" if shutil.which("kubectl") else "render_by_hand")
    kinds = sorted(m["kind"] for m in manifests)
    assert kinds == ["ConfigMap", "DaemonSet", "Deployment", "NetworkPolicy",
                     "PodDisruptionBudget", "Service", "Service"]


def test_the_hand_renderer_agrees_with_kubectl():
    """The fallback renders the same objects as kustomize (but for the ConfigMap's hash)."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: nothing to compare the hand renderer with")
    by_kustomize, _ = render()
    by_hand = render_by_hand()

    def comparable(manifests: list[Manifest]) -> list[str]:
        text = [yaml.safe_dump(m, sort_keys=True) for m in manifests]
        return sorted(re.sub(r"icegate-config-[a-z0-9]{10}", "icegate-config", t) for t in text)

    assert comparable(by_kustomize) == comparable(by_hand)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_is_valid_for_kubernetes(manifests, version):
    for manifest in manifests:
        kubernetes_validate.validate(manifest, version, strict=True)


def test_the_validator_refuses_a_misspelt_field(manifests):
    broken = copy.deepcopy(one(manifests, "Deployment"))
    pod_spec(broken)["containers"][0]["readinesProbe"] = {"grpc": {"port": 50051}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


# --- what an operator would notice -------------------------------------------------------------


def test_probes_ask_grpc_health_on_the_port_icegate_listens_on(manifests):
    icegate = container(one(manifests, "Deployment"), "icegate")
    env = plain_env(manifests, icegate)
    grpc_port = named_port(icegate, "grpc")
    assert port_of(env["ICEGATE_LISTEN"]) == grpc_port
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert icegate[probe]["grpc"] == {"port": grpc_port, "service": ""}, probe


def test_the_ports_match_the_settings(manifests):
    icegate = container(one(manifests, "Deployment"), "icegate")
    env = plain_env(manifests, icegate)
    assert port_of(env["ICEGATE_METRICS_LISTEN"]) == named_port(icegate, "metrics")
    service = one(manifests, "Service", "icegate-headless")
    assert {(p["name"], p["targetPort"]) for p in service["spec"]["ports"]} \
        == {("grpc", "grpc"), ("metrics", "metrics")}
    assert {p["port"] for p in service["spec"]["ports"]} \
        == {named_port(icegate, "grpc"), named_port(icegate, "metrics")}
    # coturn answers where the URIs handed to browsers say.
    coturn = container(one(manifests, "DaemonSet"), "coturn")
    uris = [*env["ICEGATE_TURN_URIS"].split(","), *env["ICEGATE_STUN_URIS"].split(",")]
    turn_ports = {int(port) for uri in uris for port in re.findall(r":(\d+)", uri)}
    assert turn_ports == {p["hostPort"] for p in coturn["ports"]}
    policy = one(manifests, "NetworkPolicy")
    allowed = {port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]}
    assert allowed == {"grpc", "metrics"}


def test_secrets_come_from_the_secret_under_the_settings_names(manifests):
    for workload in ("Deployment", "DaemonSet"):
        for item in all_containers(one(manifests, workload)):
            refs = secret_refs(item)
            for variable, ref in refs.items():
                assert ref["name"] == SECRET_NAME and ref["key"] == variable
                assert ref["optional"] is False  # no Secret, no pod
                assert variable in SETTING_VARIABLES, f"{variable} is no icegate setting"
            plain = plain_env(manifests, item)
            leaked = SECRET_VARIABLES & set(plain)
            assert not leaked, f"{item['name']}: secret settings given in clear: {leaked}"
    config = one(manifests, "ConfigMap")["data"]
    assert set(config) <= SETTING_VARIABLES, set(config) - SETTING_VARIABLES
    icegate = container(one(manifests, "Deployment"), "icegate")
    assert {"ICEGATE_TURN_SECRETS", "ICEGATE_API_KEYS", "ICEGATE_MASTER_KEY",
            "ICEGATE_STORE"} <= set(secret_refs(icegate))
    assert config["ICEGATE_DEV_SECRETS"] == "false"  # never generated secrets in a cluster


def test_the_server_accepts_the_settings_the_deployment_gives_it(manifests):
    icegate = container(one(manifests, "Deployment"), "icegate")
    environ = {**plain_env(manifests, icegate), **dummy_secrets(icegate)}
    settings = load_settings({}, environ)
    assert settings.store_url.startswith("redis://")  # replicas share one store
    assert settings.workers == 1
    spec = pod_spec(one(manifests, "Deployment"))
    pre_stop = int(icegate["lifecycle"]["preStop"]["exec"]["command"][1])
    assert spec["terminationGracePeriodSeconds"] > settings.shutdown_grace + pre_stop


def test_pods_run_as_the_images_non_root_user_on_a_read_only_root(manifests):
    dockerfile = DOCKERFILE.read_text()
    uid = int(re.search(r"useradd [^\n]*--uid (\d+)", dockerfile)[1])
    assert re.search(r"^USER icegate", dockerfile, re.MULTILINE)
    for workload in ("Deployment", "DaemonSet"):
        spec = pod_spec(one(manifests, workload))
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == uid != 0
        assert spec["automountServiceAccountToken"] is False
        for item in all_containers(one(manifests, workload)):
            context = item["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, item["name"]
            assert context["allowPrivilegeEscalation"] is False, item["name"]
            assert context["capabilities"]["drop"] == ["ALL"], item["name"]
            assert "requests" in item["resources"] and "memory" in item["resources"]["limits"]


def test_the_selectors_find_the_pods(manifests):
    deployment = one(manifests, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = one(manifests, "Service", "icegate-headless")
    assert service["spec"]["clusterIP"] == "None"  # headless: DNS answers every pod
    assert service["spec"]["publishNotReadyAddresses"] is False
    for selector in (service["spec"]["selector"],
                     deployment["spec"]["selector"]["matchLabels"],
                     one(manifests, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
                     one(manifests, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    assert deployment["spec"]["replicas"] > \
        one(manifests, "PodDisruptionBudget")["spec"]["maxUnavailable"]


def test_coturn_runs_on_the_hosts_network_with_the_config_icegate_renders(manifests, tmp_path):
    """The init container's own command, with the DaemonSet's environment, renders a config
    that listens and relays on the node's address, reads the secrets from the userdb icegate
    keeps and publishes to the stats Redis icegate meters."""
    daemonset = one(manifests, "DaemonSet")
    spec = pod_spec(daemonset)
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    init = container(daemonset, "coturn-config")
    coturn = container(daemonset, "coturn")
    (output,) = [init["command"][i + 1] for i, arg in enumerate(init["command"])
                 if arg == "--output"]
    assert coturn["args"][:2] == ["-c", output]
    assert any(m["mountPath"] == str(Path(output).parent) for m in coturn["volumeMounts"])

    node_ip = "192.0.2.10"
    environ = {**plain_env(manifests, init), **dummy_secrets(init), "TURN_IP": node_ip,
               "PATH": "/usr/bin:/bin"}
    environ["ICEGATE_DATA_DIR"] = str(tmp_path)
    command = [re.sub(r"\$\((\w+)\)", lambda m: environ[m[1]], arg) for arg in init["command"]]
    command[command.index("--output") + 1] = str(tmp_path / "turnserver.conf")
    command[0] = str(ICEGATE_SERVER)
    result = subprocess.run(command, env=environ, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    config = (tmp_path / "turnserver.conf").read_text()
    assert f"listening-ip={node_ip}\n" in config and f"relay-ip={node_ip}\n" in config
    assert "listening-port=3478\n" in config
    assert "min-port=49160\n" in config and "max-port=65535\n" in config
    assert 'redis-userdb="ip=icegate-redis dbname=1' in config
    assert 'redis-statsdb="ip=icegate-redis dbname=2' in config
    assert "no-cli\n" in config  # the admin CLI never leaves a node's loopback
    assert "k8s-test-turn-secret" not in config  # the secrets live in the userdb


def test_a_missing_secret_stops_the_renderer_with_the_settings_name(manifests, tmp_path):
    init = container(one(manifests, "DaemonSet"), "coturn-config")
    environ = {**plain_env(manifests, init), **dummy_secrets(init), "TURN_IP": "192.0.2.10",
               "PATH": "/usr/bin:/bin", "ICEGATE_DATA_DIR": str(tmp_path)}
    del environ["ICEGATE_TURN_SECRETS"]
    result = subprocess.run([str(ICEGATE_SERVER), "coturn-config", "--output",
                             str(tmp_path / "turnserver.conf")], env=environ,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0
    assert "ICEGATE_TURN_SECRETS" in result.stderr
    assert not (tmp_path / "turnserver.conf").exists()
