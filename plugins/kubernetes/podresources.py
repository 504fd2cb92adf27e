"""The kubelet PodResources v1 messages, built at run time from `api.proto` beside this file.

protobuf's runtime descriptors need no generated code (and so no `protoc` and no pinning of the
protobuf runtime to a generator's version). The reader below takes exactly the proto3 subset that
`api.proto` is written in — messages of scalar, message and repeated fields, and one service — and
raises on anything else, so the file cannot silently mean something the reader did not understand.
Importing this module needs `protobuf` (the `kubernetes` extra); it does not need `grpcio`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PROTO = Path(__file__).with_name("api.proto")

_SCALARS = {
    "string": descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
    "bytes": descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
    "bool": descriptor_pb2.FieldDescriptorProto.TYPE_BOOL,
    "int32": descriptor_pb2.FieldDescriptorProto.TYPE_INT32,
    "int64": descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
    "uint32": descriptor_pb2.FieldDescriptorProto.TYPE_UINT32,
    "uint64": descriptor_pb2.FieldDescriptorProto.TYPE_UINT64,
}
_TOKEN = re.compile(r'"[^"\n]*"|[A-Za-z_][\w.]*|\d+|[{}();=]|\S')


@dataclass(frozen=True, slots=True)
class Method:
    """One unary RPC: its gRPC path (`/v1.PodResourcesLister/List`) and message classes."""

    path: str
    request: Any
    response: Any


class _Reader:
    def __init__(self, text: str) -> None:
        text = re.sub(r"//[^\n]*", "", text)
        self.tokens = _TOKEN.findall(text)
        self.at = 0

    def peek(self) -> str | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None or (expected is not None and token != expected):
            raise ValueError(f"{PROTO.name}: expected {expected or 'more'!r}, found {token!r}")
        self.at += 1
        return token


def _read(text: str) -> tuple[descriptor_pb2.FileDescriptorProto, dict[str, list[tuple[str, str, str]]]]:
    r = _Reader(text)
    file = descriptor_pb2.FileDescriptorProto(name="capmon/kubernetes/podresources_v1.proto", syntax="proto3")
    services: dict[str, list[tuple[str, str, str]]] = {}
    while (token := r.peek()) is not None:
        if token == "syntax":
            r.take()
            r.take("=")
            value = r.take().strip('"')
            if value != "proto3":
                raise ValueError(f"{PROTO.name}: only proto3 is read, not {value!r}")
            r.take(";")
        elif token == "package":
            r.take()
            file.package = r.take()
            r.take(";")
        elif token == "message":
            r.take()
            message = file.message_type.add(name=r.take())
            r.take("{")
            while r.peek() != "}":
                label = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
                if r.peek() == "repeated":
                    r.take()
                    label = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
                kind, name = r.take(), r.take()
                r.take("=")
                number = int(r.take())
                r.take(";")
                field = message.field.add(name=name, number=number, label=label)
                if kind in _SCALARS:
                    field.type = _SCALARS[kind]
                else:
                    field.type = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
                    field.type_name = f".{file.package}.{kind}"
            r.take("}")
        elif token == "service":
            r.take()
            rpcs = services.setdefault(r.take(), [])
            r.take("{")
            while r.peek() != "}":
                r.take("rpc")
                name = r.take()
                r.take("(")
                request = r.take()
                r.take(")")
                r.take("returns")
                r.take("(")
                response = r.take()
                r.take(")")
                r.take("{")
                r.take("}")
                rpcs.append((name, request, response))
            r.take("}")
        else:
            raise ValueError(f"{PROTO.name}: unexpected {token!r}")
    return file, services


def _build() -> tuple[dict[str, Any], dict[str, Method]]:
    file, services = _read(PROTO.read_text())
    pool = descriptor_pool.DescriptorPool()  # private: never clashes with another `v1` package
    pool.Add(file)
    classes = {
        m.name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{file.package}.{m.name}"))
        for m in file.message_type
    }
    methods = {
        name: Method(f"/{file.package}.{service}/{name}", classes[request], classes[response])
        for service, rpcs in services.items()
        for name, request, response in rpcs
    }
    return classes, methods


MESSAGES, METHODS = _build()
ListPodResourcesRequest = MESSAGES["ListPodResourcesRequest"]
ListPodResourcesResponse = MESSAGES["ListPodResourcesResponse"]
AllocatableResourcesRequest = MESSAGES["AllocatableResourcesRequest"]
AllocatableResourcesResponse = MESSAGES["AllocatableResourcesResponse"]
PodResources = MESSAGES["PodResources"]
ContainerResources = MESSAGES["ContainerResources"]
ContainerDevices = MESSAGES["ContainerDevices"]
DynamicResource = MESSAGES["DynamicResource"]
ClaimResource = MESSAGES["ClaimResource"]
CDIDevice = MESSAGES["CDIDevice"]
LIST = METHODS["List"]
GET_ALLOCATABLE = METHODS["GetAllocatableResources"]
