"""The `kubernetes` allocation source against a real gRPC server on a unix socket (kubelet_server.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("grpc")

from kubelet_server import HANG, UNIMPLEMENTED, FakeKubelet, container, pod

from capmon.agent import Allocation, ProbeUnavailable
from capmon.plugins.kubernetes import KubernetesConfig, KubernetesSource, PodResourcesError
from capmon.plugins.kubernetes import podresources as pr
from capmon.plugins.kubernetes.source import DeviceIdentity, identify

GPU0 = "GPU-5f3e8b2a-1c4d-4e6f-9a7b-2c3d4e5f6a7b"
GPU1 = "GPU-a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d"
SLICED = "GPU-0d9c8b7a-6f5e-4d3c-2b1a-0f9e8d7c6b5a"
MIG0 = "MIG-0e1f2a3b-4c5d-5e6f-8a9b-0c1d2e3f4a5b"
MIG1 = "MIG-9a8b7c6d-5e4f-5a3b-9c2d-1e0f9a8b7c6d"


@pytest.fixture
def kubelet(tmp_path):
    server = FakeKubelet(tmp_path / "kubelet.sock").start()
    yield server
    server.stop()


def make_source(kubelet: FakeKubelet, timeout_s: float | None = None) -> KubernetesSource:
    source = KubernetesSource(KubernetesConfig(socket=str(kubelet.socket), timeout_s=timeout_s))
    source.setup()
    return source


def held(allocations):
    """(device_id or vendor:index, namespace/pod/container, shared) per allocation, sorted."""
    out = []
    for a in allocations:
        assert isinstance(a, Allocation) and a.source == "kubernetes"
        device = a.device_id or f"{a.vendor}:{a.index}"
        out.append((device, f"{a.namespace}/{a.pod}/{a.container}", a.shared))
    return sorted(out)


def test_nvidia_gpus_mig_instances_and_a_time_sliced_gpu_shared_by_two_pods(kubelet):
    kubelet.list_answer = pr.ListPodResourcesResponse(
        pod_resources=[
            pod("trainer-0", "ml", container("main", ("nvidia.com/gpu", [GPU0, GPU1]))),
            pod(
                "notebook-7f9c",
                "research",
                container("jupyter", ("nvidia.com/mig-1g.10gb", [MIG0])),
                container("sidecar", ("nvidia.com/mig-1g.10gb", [MIG1])),
            ),
            # Time-slicing: replicas of one GPU handed to two pods (and twice to one of them).
            pod(
                "infer-a",
                "serving",
                container("server", ("nvidia.com/gpu", [f"{SLICED}::0", f"{SLICED}::3"])),
            ),
            pod("infer-b", "serving", container("server", ("nvidia.com/gpu", [f"{SLICED}::1"]))),
            # Devices of other plugins are not accelerators capmon measures.
            pod("net", "kube-system", container("cni", ("rdma/hca_shared_devices_a", ["mlx5_0"]))),
            pod("idle", "default", container("app")),
        ]
    )
    source = make_source(kubelet)
    try:
        allocations = source.allocations()
    finally:
        source.close()
    assert held(allocations) == sorted(
        [
            (GPU0, "ml/trainer-0/main", False),
            (GPU1, "ml/trainer-0/main", False),
            (MIG0, "research/notebook-7f9c/jupyter", False),
            (MIG1, "research/notebook-7f9c/sidecar", False),
            (SLICED, "serving/infer-a/server", True),
            (SLICED, "serving/infer-b/server", True),
        ]
    )
    # The scheduler's own name is kept beside capmon's id.
    assert {a.device for a in allocations if a.device_id == SLICED} == {f"{SLICED}::0", f"{SLICED}::1"}


def test_ascend_ids_as_huaweis_device_plugin_publishes_them(kubelet):
    # Ascend device plugin: `<Type>-<phyID>`; a vNPU is `<Type>-<cores>c-<vdevID>-<phyID>`.
    kubelet.list_answer = pr.ListPodResourcesResponse(
        pod_resources=[
            pod(
                "pretrain-0",
                "llm",
                container("worker", ("huawei.com/Ascend910", ["Ascend910-0", "Ascend910-3"])),
            ),
            pod("ocr", "apps", container("svc", ("huawei.com/Ascend310P", ["Ascend310P-1"]))),
            pod("tiny", "apps", container("svc", ("huawei.com/Ascend910-2c", ["Ascend910-2c-100-5"]))),
            pod(
                "tiny2",
                "apps",
                container("svc", ("huawei.com/Ascend310P-4c.3cpu", ["Ascend310P-4c.3cpu-101-2"])),
            ),
        ]
    )
    source = make_source(kubelet)
    try:
        allocations = source.allocations()
    finally:
        source.close()
    assert held(allocations) == sorted(
        [
            ("ascend:0", "llm/pretrain-0/worker", False),
            ("ascend:3", "llm/pretrain-0/worker", False),
            ("ascend:1", "apps/ocr/svc", False),
            ("ascend:5", "apps/tiny/svc", True),
            ("ascend:2", "apps/tiny2/svc", True),
        ]
    )
    assert all(a.device_id is None for a in allocations)
    assert sorted(a.device for a in allocations)[0] == "Ascend310P-1"


def test_a_dra_claim_names_its_gpu_by_uuid_where_the_cdi_device_carries_it(kubelet):
    claim = pr.DynamicResource(
        claim_name="train-gpu",
        claim_namespace="ml",
        claim_resources=[
            pr.ClaimResource(
                driver_name="gpu.nvidia.com",
                pool_name="node-a",
                device_name="gpu-0",
                cdi_devices=[pr.CDIDevice(name=f"k8s.gpu.nvidia.com/device={GPU0}")],
            ),
            # No UUID anywhere: kept under its DRA name, not matched to a device.
            pr.ClaimResource(driver_name="npu.example.com", pool_name="node-a", device_name="npu-3"),
        ],
    )
    kubelet.list_answer = pr.ListPodResourcesResponse(
        pod_resources=[pod("dra-job", "ml", container("main", dynamic=[claim]))]
    )
    source = make_source(kubelet)
    try:
        allocations = source.allocations()
    finally:
        source.close()
    by_device = {a.device: a for a in allocations}
    assert set(by_device) == {"gpu.nvidia.com/node-a/gpu-0", "npu.example.com/node-a/npu-3"}
    assert by_device["gpu.nvidia.com/node-a/gpu-0"].device_id == GPU0
    assert by_device["npu.example.com/node-a/npu-3"].device_id is None
    assert by_device["npu.example.com/node-a/npu-3"].vendor is None
    assert {(a.namespace, a.pod, a.container) for a in allocations} == {("ml", "dra-job", "main")}


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field, encoded by hand (tag = number << 3 | 2)."""

    def varint(n: int) -> bytes:
        out = b""
        while True:
            out += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
            n >>= 7
            if not n:
                return out

    return varint(number << 3 | 2) + varint(len(payload)) + payload


def test_the_field_numbers_are_the_published_apis(kubelet):
    # Bytes encoded by hand from kubernetes' api.proto numbers (not from capmon's .proto), including
    # fields capmon does not read (cpu_ids = 3, topology = 3), which it must skip.
    device = _field(1, b"nvidia.com/gpu") + _field(2, GPU0.encode()) + _field(3, _field(1, b"\x08\x01"))
    cdi = _field(1, f"cdi/gpu={GPU1}".encode())
    claim_resource = _field(1, cdi) + _field(2, b"gpu.nvidia.com") + _field(3, b"pool") + _field(4, b"gpu-1")
    dynamic = _field(2, b"claim") + _field(3, b"team") + _field(4, claim_resource)
    cpu_ids = bytes([3 << 3 | 2, 2, 4, 5])  # packed int64 cpu_ids = [4, 5]
    container_bytes = _field(1, b"c1") + _field(2, device) + cpu_ids + _field(5, dynamic)
    pod_bytes = _field(1, b"p1") + _field(2, b"team") + _field(3, container_bytes)
    kubelet.list_answer = _field(1, pod_bytes)
    source = make_source(kubelet)
    try:
        allocations = source.allocations()
    finally:
        source.close()
    assert held(allocations) == sorted([(GPU0, "team/p1/c1", False), (GPU1, "team/p1/c1", False)])


def test_a_hanging_kubelet_raises_within_the_sources_timeout(kubelet):
    kubelet.list_answer = HANG
    source = make_source(kubelet, timeout_s=0.2)
    try:
        with pytest.raises(PodResourcesError, match=r"List at .*kubelet.sock: no answer within 0.2 s"):
            source.allocations()
    finally:
        source.close()


def test_garbage_bytes_raise_a_clear_error(kubelet):
    kubelet.list_answer = b"\xff\xff\xff\xff\x0fnot protobuf"
    source = make_source(kubelet)
    try:
        with pytest.raises(
            PodResourcesError, match=r"is not a ListPodResourcesResponse message of PodResources v1"
        ):
            source.allocations()
    finally:
        source.close()


def test_a_name_no_kubelet_sends_is_refused_naming_the_field(kubelet):
    kubelet.list_answer = pr.ListPodResourcesResponse(
        pod_resources=[
            pod("ok", "ns", container("c", ("nvidia.com/gpu", [GPU0]))),
            pod("p" * 300, "ns", container("c", ("nvidia.com/gpu", [GPU1]))),
        ]
    )
    source = make_source(kubelet)
    try:
        with pytest.raises(
            PodResourcesError, match=r"pod_resources\[1\]\.name is 300 characters, more than 253"
        ):
            source.allocations()
        kubelet.list_answer = pr.ListPodResourcesResponse(
            pod_resources=[pod("ok", "ns", container("c", ("nvidia.com/gpu", ["GPU-1\n2"])))]
        )
        with pytest.raises(
            PodResourcesError, match=r"containers\[0\]\.devices\[0\]\.device_ids\[0\] has spaces"
        ):
            source.allocations()
    finally:
        source.close()


def test_no_socket_is_unavailable_with_the_path(tmp_path):
    path = tmp_path / "pod-resources" / "kubelet.sock"
    source = KubernetesSource(KubernetesConfig(socket=str(path)))
    with pytest.raises(ProbeUnavailable, match=f"no kubelet pod-resources socket at {path}"):
        source.setup()
    source.close()
    path.parent.mkdir()
    path.write_text("")
    with pytest.raises(ProbeUnavailable, match="is not a socket"):
        source.setup()


def test_the_default_socket_is_the_kubelets():
    assert KubernetesSource().socket == "/var/lib/kubelet/pod-resources/kubelet.sock"


def test_a_kubelet_gone_after_setup_raises_and_the_source_answers_again_when_it_is_back(tmp_path):
    kubelet = FakeKubelet(tmp_path / "kubelet.sock").start()
    kubelet.list_answer = pr.ListPodResourcesResponse(
        pod_resources=[pod("a", "ns", container("c", ("nvidia.com/gpu", [GPU0])))]
    )
    source = make_source(kubelet)
    try:
        assert len(source.allocations()) == 1
        kubelet.stop()
        with pytest.raises(PodResourcesError, match=r"List at .*: kubelet unreachable"):
            source.allocations()
        again = FakeKubelet(kubelet.socket)
        again.list_answer = kubelet.list_answer
        again.start()
        try:
            # grpc reconnects on its own backoff (at most 5 s here); the agent's next ticks retry.
            for _ in range(100):
                try:
                    assert len(source.allocations()) == 1
                    break
                except PodResourcesError:
                    again._release.wait(0.1)
            else:
                pytest.fail("the source never answered again after the kubelet came back")
        finally:
            again.stop()
    finally:
        source.close()
        kubelet.stop()


def test_allocatable_devices_say_which_vendors_the_source_covers(kubelet):
    source = make_source(kubelet)
    try:
        # Before an answer, every vendor a source can know of.
        assert source.covers("nvidia") and source.covers("ascend")
        kubelet.allocatable_answer = pr.AllocatableResourcesResponse(
            devices=[pr.ContainerDevices(resource_name="huawei.com/Ascend910", device_ids=["Ascend910-0"])]
        )
        source.allocations()
        assert source.covers("ascend") and not source.covers("nvidia")
        assert kubelet.calls == ["List", "GetAllocatableResources"]
    finally:
        source.close()


def test_a_kubelet_without_get_allocatable_is_asked_once(kubelet):
    kubelet.allocatable_answer = UNIMPLEMENTED
    source = make_source(kubelet)
    try:
        assert source.allocations() == []
        assert source.allocations() == []
        assert kubelet.calls == ["List", "GetAllocatableResources", "List"]
        assert source.covers("nvidia") and source.covers("ascend")
    finally:
        source.close()


@pytest.mark.parametrize(
    ("resource", "device", "identity"),
    [
        ("nvidia.com/gpu", GPU0, DeviceIdentity(device_id=GPU0)),
        ("nvidia.com/gpu.shared", f"{GPU0}::7", DeviceIdentity(device_id=GPU0, shared=True)),
        ("nvidia.com/mig-3g.40gb", MIG0, DeviceIdentity(device_id=MIG0)),
        ("nvidia.com/mig-1g.10gb", f"{MIG0}::2", DeviceIdentity(device_id=MIG0, shared=True)),
        # MIG ids before driver R470.
        ("nvidia.com/mig-1g.5gb", f"MIG-{GPU0}/7/0", DeviceIdentity(device_id=f"MIG-{GPU0}/7/0")),
        # GKE's plugin names /dev/nvidia<minor>; deviceIDStrategy=index the nvidia-smi index.
        ("nvidia.com/gpu", "nvidia3", DeviceIdentity(vendor="nvidia", index=3)),
        ("nvidia.com/gpu", "2", DeviceIdentity(vendor="nvidia", index=2)),
        ("nvidia.com/gpu", "0:1", DeviceIdentity()),
        ("huawei.com/Ascend910", "Ascend910-7", DeviceIdentity(vendor="ascend", index=7)),
        ("huawei.com/Ascend310", "Ascend310-12", DeviceIdentity(vendor="ascend", index=12)),
        (
            "huawei.com/Ascend910-16c",
            "Ascend910-16c-160-1",
            DeviceIdentity(vendor="ascend", index=1, shared=True),
        ),
        ("huawei.com/npu-core", "npu-core-4", DeviceIdentity()),
        ("rdma/hca", "mlx5_0", None),
        ("smarter-devices/fuse", "fuse0", None),
    ],
)
def test_identify(resource, device, identity):
    assert identify(resource, device) == identity


def test_the_hook_registers_the_source():
    from capmon.plugins import kubernetes

    assert kubernetes.capmon_allocation_sources() == [KubernetesSource]


def test_the_sample_decodes_to_the_defaults():
    from pathlib import Path

    from capmon.agent.configfile import parse_toml
    from capmon.agent.probe import config_from_mapping

    path = Path(__file__).parents[2] / "plugins" / "kubernetes" / "sample.toml"
    sample = parse_toml(path.read_text(), str(path))
    config = config_from_mapping(
        KubernetesConfig, sample["allocations"]["kubernetes"], "allocations.kubernetes"
    )
    assert config == KubernetesConfig()
    with pytest.raises(ValueError, match="unknown key 'sockt'"):
        config_from_mapping(KubernetesConfig, {"sockt": "/x"}, "allocations.kubernetes")
