"""packaging/kubernetes/: the DaemonSets validate against the Kubernetes schemas (offline, no kubectl)
and say what the agent needs: host PIDs, the kubelet's socket and /dev read-only, the token from a
Secret, the configuration from a ConfigMap that the agent's own loader accepts."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from capmon.agent.config import load_config
from capmon.agent.probe import config_from_mapping
from capmon.plugins.kubernetes.source import DEFAULT_SOCKET, KubernetesConfig

yaml = pytest.importorskip("yaml", reason="needs PyYAML (dev extra)")
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="needs kubernetes-validate (dev extra)"
)

HERE = Path(__file__).resolve().parents[2] / "packaging" / "kubernetes"
FILES = ("capmon-agent.yaml", "capmon-agent-ascend.yaml", "secret.example.yaml")
# The oldest Kubernetes still in wide use that has everything the manifests use, and the newest the
# validator knows.
VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((HERE / name).read_text()) if d is not None]


def everything() -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for name in FILES for d in documents(name)}


def agent_container(daemonset: dict) -> dict:
    [container] = daemonset["spec"]["template"]["spec"]["containers"]
    return container


def mounts(daemonset: dict) -> dict[str, tuple[dict, dict]]:
    """mountPath -> (volumeMount, volume)."""
    volumes = {v["name"]: v for v in daemonset["spec"]["template"]["spec"]["volumes"]}
    return {m["mountPath"]: (m, volumes[m["name"]]) for m in agent_container(daemonset)["volumeMounts"]}


DAEMONSETS = ("capmon-agent", "capmon-agent-ascend")


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", FILES)
def test_every_document_validates_against_the_kubernetes_schema(name, version):
    docs = documents(name)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_refuses_what_kubernetes_would():
    daemonset = everything()[("DaemonSet", "capmon-agent")]
    broken = copy.deepcopy(daemonset)
    agent_container(broken)["volumeMounts"][0]["readOnly"] = "yes"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[0], strict=True)
    misspelled = copy.deepcopy(daemonset)
    misspelled["spec"]["template"]["spec"]["hostPid"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelled, VERSIONS[0], strict=True)


@pytest.mark.parametrize("name", DAEMONSETS)
def test_the_daemonset_sees_host_pids_and_reads_the_kubelets_socket_read_only(name):
    daemonset = everything()[("DaemonSet", name)]
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    mount, volume = mounts(daemonset)[str(Path(DEFAULT_SOCKET).parent)]
    assert mount["readOnly"] is True
    assert volume["hostPath"]["path"] == "/var/lib/kubelet/pod-resources"
    # The agent needs no API access: no token is mounted, and there is no RBAC to grant.
    assert pod["automountServiceAccountToken"] is False
    assert not [
        k for k in everything() if k[0] in ("ClusterRole", "Role", "ClusterRoleBinding", "RoleBinding")
    ]
    # Everything from the host is read-only except the agent's own spool directory.
    writable = {
        path for path, (m, v) in mounts(daemonset).items() if "hostPath" in v and not m.get("readOnly")
    }
    assert writable == {"/var/lib/capmon"}


def test_the_ascend_daemonset_mounts_dev_and_npu_smi_read_only():
    daemonset = everything()[("DaemonSet", "capmon-agent-ascend")]
    by_path = mounts(daemonset)
    for path in ("/dev", "/usr/local/Ascend/driver", "/usr/local/bin/npu-smi"):
        mount, volume = by_path[path]
        assert mount["readOnly"] is True and volume["hostPath"]["path"] == path


def test_the_nvidia_daemonset_is_not_privileged_and_asks_for_every_gpu_for_monitoring_only():
    container = agent_container(everything()[("DaemonSet", "capmon-agent")])
    assert not container["securityContext"].get("privileged", False)
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    env = {e["name"]: e for e in container["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"
    # Requesting nvidia.com/gpu would take a GPU away from the workloads it measures.
    assert not any("nvidia.com" in key for part in container["resources"].values() for key in part)


@pytest.mark.parametrize("name", DAEMONSETS)
def test_the_token_comes_from_the_secret_and_resources_are_bounded(name):
    objects = everything()
    container = agent_container(objects[("DaemonSet", name)])
    env = {e["name"]: e for e in container["env"]}
    ref = env["CAPMON_AGENT_TOKEN"]["valueFrom"]["secretKeyRef"]
    secret = objects[("Secret", ref["name"])]
    assert ref["key"] in secret["stringData"]
    assert secret["metadata"]["namespace"] == objects[("DaemonSet", name)]["metadata"]["namespace"]
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) == {"cpu", "memory"}
    pod = objects[("DaemonSet", name)]["spec"]["template"]["spec"]
    assert pod.get("nodeSelector") or pod.get("affinity")
    assert pod["tolerations"]


@pytest.mark.parametrize("name", DAEMONSETS)
def test_the_configmap_is_a_configuration_the_agent_loads(name, tmp_path):
    objects = everything()
    daemonset = objects[("DaemonSet", name)]
    mount, volume = mounts(daemonset)["/etc/capmon"]
    assert mount["readOnly"] is True
    text = objects[("ConfigMap", volume["configMap"]["name"])]["data"]["agent.toml"]
    # What the container's command does before starting the agent.
    assert "@NODE_NAME@" in agent_container(daemonset)["args"][0]
    text = text.replace("@NODE_NAME@", "gpu-node-017")
    (tmp_path / "agent.toml").write_text(text)
    config = load_config(tmp_path / "agent.toml", env={"CAPMON_AGENT_TOKEN": "t"})
    assert config.agent.id == "gpu-node-017"
    assert config.transport.token == "t"
    values = config.allocations.options["kubernetes"]
    source = config_from_mapping(KubernetesConfig, values, "allocations.kubernetes")
    assert source.socket == DEFAULT_SOCKET
    assert str(Path(source.socket).parent) in mounts(daemonset)
