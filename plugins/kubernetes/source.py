"""The `kubernetes` allocation source: which pod and container the kubelet gave which device.

Asks the kubelet's PodResources API v1 (`List`, and `GetAllocatableResources` where served) over its
unix socket, and turns device-plugin ids and dynamic-resource-allocation (DRA) claims into capmon
`Allocation`s. The id mapping is in README.md beside this file, with the device-plugin source it was
read from. Containment is the agent's: every failure to answer raises.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from capmon.agent import Allocation, AllocationSource, ProbeConfig, ProbeUnavailable

DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
# The kubelet's own pod-resources client allows answers of up to 16 MiB (a node with many pods).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# Kubernetes' own bounds: a pod name is a DNS subdomain, a namespace and a container name DNS labels.
# A longer or non-printable value is not something a kubelet sends: the answer is garbage.
_MAX_POD_NAME = 253
_MAX_LABEL_NAME = 63
_MAX_DEVICE_ID = 253

# NVIDIA device plugin ids: GPU UUIDs, MIG UUIDs (`MIG-<uuid>`, or before driver R470
# `MIG-GPU-<uuid>/<gi>/<ci>`). Time-slicing and MPS replicas append `::<replica>`.
_NVIDIA_UUID = re.compile(r"(?:GPU|MIG)-[0-9A-Za-z][0-9A-Za-z/-]*")
_NVIDIA_UUID_IN = re.compile(
    r"(?:GPU|MIG)-[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
# GKE's NVIDIA device plugin names devices by their /dev/nvidia<minor>.
_GKE_NVIDIA = re.compile(r"nvidia(\d+)")
# Huawei's Ascend device plugin: `<Type>-<phyID>` for a whole chip (`Ascend910-3`, `Ascend310P-0`),
# `<Type>-<cores>c[.<cpu>cpu…]-<vdevID>-<phyID>` for a vNPU carved from one (`Ascend910-2c-100-3`).
_ASCEND = re.compile(r"Ascend[0-9A-Za-z]+-(?:(\d+c[0-9A-Za-z._]*)-(\d+)-)?(\d+)")
_PRINTABLE = re.compile(r"[\x21-\x7e]+")


class PodResourcesError(RuntimeError):
    """The kubelet's pod-resources API did not give a usable answer (the agent marks the devices this
    source covers "allocation unknown: kubernetes: <this message>")."""


@dataclass(frozen=True, slots=True)
class KubernetesConfig(ProbeConfig):
    """Options of the `kubernetes` allocation source."""

    # The kubelet's pod-resources socket (inside the agent's container: where the DaemonSet mounts
    # /var/lib/kubelet/pod-resources). The source is active where this socket exists.
    socket: str = DEFAULT_SOCKET


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """What a device-plugin id says about the device."""

    device_id: str | None = None
    vendor: str | None = None
    index: int | None = None
    shared: bool = False


def identify(resource_name: str, device_id: str) -> DeviceIdentity | None:
    """capmon's identity of one device-plugin id; None when the resource is not an accelerator
    capmon measures (RDMA, SR-IOV, FUSE plugins). Pure: tested table-driven."""
    base, replica, _ = device_id.partition("::")
    shared = bool(replica)
    nvidia = resource_name.startswith("nvidia.com/")
    if _NVIDIA_UUID.fullmatch(base):
        return DeviceIdentity(device_id=base, shared=shared)
    if nvidia:
        if m := _GKE_NVIDIA.fullmatch(base):
            return DeviceIdentity(vendor="nvidia", index=int(m.group(1)), shared=shared)
        # deviceIDStrategy=index publishes the nvidia-smi index instead of the UUID.
        if base.isdigit():
            return DeviceIdentity(vendor="nvidia", index=int(base), shared=shared)
        return DeviceIdentity(shared=shared)
    if resource_name.startswith("huawei.com/"):
        if m := _ASCEND.fullmatch(base):
            # A vNPU is a share of its chip; the physical id is the chip's /dev/davinci<phyID>.
            return DeviceIdentity(vendor="ascend", index=int(m.group(3)), shared=shared or bool(m.group(1)))
        return DeviceIdentity(shared=shared)
    return None


class KubernetesSource(AllocationSource):
    """Pods holding devices, from the kubelet's PodResources API v1 over its unix socket."""

    name = "kubernetes"
    Config = KubernetesConfig
    default_interval_s = 10.0
    default_timeout_s = 5.0

    def __init__(self, config: KubernetesConfig | None = None, **boundary: Any) -> None:
        super().__init__(config, **boundary)
        self._grpc: Any = None
        self._channel: Any = None
        self._calls: dict[str, Any] = {}
        self._allocatable_served = True
        # Vendors of the devices the kubelet can allocate on this node, once GetAllocatableResources
        # has answered with some; until then (or where it is not served) the default of every source.
        self._vendors: frozenset[str] | None = None

    @property
    def socket(self) -> str:
        return self.config.socket

    def setup(self) -> None:
        try:
            mode = os.stat(self.socket).st_mode
        except OSError:
            raise ProbeUnavailable(f"no kubelet pod-resources socket at {self.socket}") from None
        if not stat.S_ISSOCK(mode):
            raise ProbeUnavailable(f"{self.socket} is not a socket (the kubelet's pod-resources socket)")
        try:
            import grpc

            from capmon.plugins.kubernetes import podresources
        except ImportError as exc:
            raise ProbeUnavailable(
                f"{exc.name} not installed: pip install '.[kubernetes]' in a capmon checkout (README: Install)"
            ) from None
        self._grpc = grpc
        self._channel = grpc.insecure_channel(
            f"unix://{self.socket}",
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                # A restarted kubelet makes a new socket: reconnect within a tick, not grpc's minutes.
                ("grpc.initial_reconnect_backoff_ms", 500),
                ("grpc.max_reconnect_backoff_ms", 5000),
            ],
        )
        # Raw bytes in, decoded here: an answer that is not the message is reported as such.
        for method in (podresources.LIST, podresources.GET_ALLOCATABLE):
            self._calls[method.path] = (
                self._channel.unary_unary(method.path, request_serializer=method.request.SerializeToString),
                method,
            )

    def close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            try:
                channel.close()
            except Exception:  # close must not raise
                pass

    def covers(self, vendor: str) -> bool:
        vendors = self._vendors
        return super().covers(vendor) if vendors is None else vendor in vendors

    def allocations(self) -> Sequence[Allocation]:
        from capmon.plugins.kubernetes import podresources

        answer = self._call(podresources.LIST)
        allocations = list(self._from_list(answer))
        if self._allocatable_served:
            self._refresh_vendors(podresources.GET_ALLOCATABLE)
        return allocations

    def _call(self, method: Any, *, optional: bool = False) -> Any:
        """One unary call under the source's timeout; every failure is a PodResourcesError, except
        an `optional` method this kubelet does not serve, which answers None."""
        if self._channel is None:
            raise PodResourcesError("the source is not set up")
        grpc = self._grpc
        call, _ = self._calls[method.path]
        rpc = method.path.rsplit("/", 1)[1]
        where = f"kubelet pod-resources {rpc} at {self.socket}"
        try:
            raw = call(method.request(), timeout=self.timeout_s)
        except grpc.RpcError as exc:
            code = exc.code() if callable(getattr(exc, "code", None)) else None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise PodResourcesError(f"{where}: no answer within {self.timeout_s:g} s") from None
            if code == grpc.StatusCode.UNIMPLEMENTED and optional:
                return None
            if code == grpc.StatusCode.UNAVAILABLE:
                raise PodResourcesError(f"{where}: kubelet unreachable ({exc.details()})") from None
            name = code.name if code is not None else "error"
            raise PodResourcesError(f"{where}: {name}: {exc.details()}") from None
        try:
            return method.response.FromString(raw)
        except Exception as exc:  # protobuf's DecodeError, or bytes that are no message at all
            raise PodResourcesError(
                f"{where}: the answer ({len(raw)} bytes) is not a {method.response.__name__} "
                f"message of PodResources v1 ({exc})"
            ) from None

    def _refresh_vendors(self, method: Any) -> None:
        answer = self._call(method, optional=True)
        if answer is None:
            # Kubelets before 1.23 (or with the KubeletPodResourcesGetAllocatable gate off).
            self._allocatable_served = False
            return
        vendors = set()
        for i, devices in enumerate(answer.devices):
            where = f"devices[{i}]"
            for j, device_id in enumerate(devices.device_ids):
                _check(f"{where}.device_ids[{j}]", device_id, _MAX_DEVICE_ID)
                ident = identify(devices.resource_name, device_id)
                if ident is not None:
                    vendor = ident.vendor or ("nvidia" if ident.device_id else None)
                    if vendor:
                        vendors.add(vendor)
        if vendors:
            self._vendors = frozenset(vendors)

    def _from_list(self, answer: Any) -> Iterable[Allocation]:
        seen: set[tuple[str, str, str, str]] = set()
        for p, pod in enumerate(answer.pod_resources):
            where = f"pod_resources[{p}]"
            _check(f"{where}.name", pod.name, _MAX_POD_NAME)
            _check(f"{where}.namespace", pod.namespace, _MAX_LABEL_NAME)
            for c, container in enumerate(pod.containers):
                cwhere = f"{where}.containers[{c}]"
                _check(f"{cwhere}.name", container.name, _MAX_LABEL_NAME)
                holder = {"namespace": pod.namespace, "pod": pod.name, "container": container.name}
                for d, devices in enumerate(container.devices):
                    for i, device_id in enumerate(devices.device_ids):
                        _check(f"{cwhere}.devices[{d}].device_ids[{i}]", device_id, _MAX_DEVICE_ID)
                        ident = identify(devices.resource_name, device_id)
                        if ident is None:
                            continue
                        key = (
                            ident.device_id or device_id.partition("::")[0],
                            pod.namespace,
                            pod.name,
                            container.name,
                        )
                        if key in seen:  # two replicas of one GPU in one container: one holding
                            continue
                        seen.add(key)
                        yield Allocation(
                            source=self.name,
                            device=device_id,
                            device_id=ident.device_id,
                            vendor=ident.vendor,
                            index=ident.index,
                            shared=ident.shared,
                            **holder,
                        )
                for r, claim in enumerate(container.dynamic_resources):
                    for k, resource in enumerate(claim.claim_resources):
                        rwhere = f"{cwhere}.dynamic_resources[{r}].claim_resources[{k}]"
                        names = [resource.device_name, *(cdi.name for cdi in resource.cdi_devices)]
                        for n, name in enumerate(names):
                            _check(
                                f"{rwhere}.{'device_name' if n == 0 else 'cdi_devices'}",
                                name,
                                _MAX_DEVICE_ID,
                                empty=True,
                            )
                        device = "/".join(
                            x for x in (resource.driver_name, resource.pool_name, resource.device_name) if x
                        )
                        uuid = next(
                            (m.group(0) for name in names if (m := _NVIDIA_UUID_IN.search(name))), None
                        )
                        key = (uuid or device, pod.namespace, pod.name, container.name)
                        if not device or key in seen:
                            continue
                        seen.add(key)
                        yield Allocation(source=self.name, device=device, device_id=uuid, **holder)


def _check(where: str, value: str, limit: int, *, empty: bool = False) -> None:
    """Refuse what no kubelet sends, naming the field: a kubelet answer is trusted only in shape."""
    if not value:
        if empty:
            return
        raise PodResourcesError(f"kubelet pod-resources answer: {where} is empty")
    if len(value) > limit:
        raise PodResourcesError(
            f"kubelet pod-resources answer: {where} is {len(value)} characters, more than {limit}"
        )
    if not _PRINTABLE.fullmatch(value):
        raise PodResourcesError(
            f"kubelet pod-resources answer: {where} has spaces or control characters: {value[:64]!r}"
        )
