"""A real gRPC server (grpcio) on a unix socket serving `v1.PodResourcesLister`, in place of a kubelet.

No kubelet runs here, so the test boundary is the gRPC wire itself: the source under test dials the
socket exactly as it dials the kubelet's. Each method answers what the test set: message objects, raw
bytes (for garbage, or hand-encoded wire bytes), a hang, or UNIMPLEMENTED.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from capmon.plugins.kubernetes import podresources as pr

HANG = object()
UNIMPLEMENTED = object()


class FakeKubelet:
    """`list_answer` / `allocatable_answer`: a message, bytes, HANG or UNIMPLEMENTED."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self.list_answer: Any = pr.ListPodResourcesResponse()
        self.allocatable_answer: Any = pr.AllocatableResourcesResponse()
        self.calls: list[str] = []
        self._release = threading.Event()
        self._server: grpc.Server | None = None

    def _handler(self, name: str, answer: Callable[[], Any]) -> grpc.RpcMethodHandler:
        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.calls.append(name)
            value = answer()
            if value is HANG:
                # Bounded, so a broken test cannot hang the suite; stop() releases it at once.
                self._release.wait(60)
                context.abort(grpc.StatusCode.CANCELLED, "released")
            if value is UNIMPLEMENTED:
                context.abort(grpc.StatusCode.UNIMPLEMENTED, f"unknown method {name}")
            return value if isinstance(value, bytes) else value.SerializeToString()

        # No serializers: the handler answers bytes, so a test can send bytes that are no message.
        return grpc.unary_unary_rpc_method_handler(handle)

    def start(self) -> FakeKubelet:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        handlers = {
            "List": self._handler("List", lambda: self.list_answer),
            "GetAllocatableResources": self._handler(
                "GetAllocatableResources", lambda: self.allocatable_answer
            ),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("v1.PodResourcesLister", handlers),)
        )
        if server.add_insecure_port(f"unix:{self.socket}") == 0:
            raise RuntimeError(f"could not bind {self.socket}")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.stop(None).wait()
            self._server = None


def pod(name: str, namespace: str, *containers: Any) -> Any:
    return pr.PodResources(name=name, namespace=namespace, containers=list(containers))


def container(name: str, *devices: tuple[str, list[str]], dynamic: list[Any] | None = None) -> Any:
    return pr.ContainerResources(
        name=name,
        devices=[pr.ContainerDevices(resource_name=r, device_ids=ids) for r, ids in devices],
        dynamic_resources=dynamic or [],
    )
