"""The real collector app (`capmon.collector.app.create_app`) on aiohttp's test server, on the test's clock."""

from __future__ import annotations

import dataclasses
import gzip as gzip_
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from capmon.agent import wire
from capmon.collector.app import create_app
from capmon.collector.config import AuthConfig, Config, StorageConfig, TokenConfig, hash_token
from capmon.collector.storage import StorageWriter

__all__ = ["AGENT_TOKEN", "READ_TOKEN", "Answer", "DeliveryRefused", "InProcessCollector", "collector_config"]

# The kit's tokens: the agent token writes as any agent id, the read token reads the APIs.
AGENT_TOKEN = "capmon-testing-agent-token"
READ_TOKEN = "capmon-testing-read-token"


def collector_config(config: Config | None = None) -> Config:
    """`config` (default: every default, storage `none`) with the kit's tokens when it has none, and
    writes that never wait for more requests to join (flush_interval_s 0)."""
    config = (
        config
        if config is not None
        else Config(storage=StorageConfig(flush_interval_s=0.0), source="<capmon.testing>")
    )
    if not config.auth.agent_tokens and not config.auth.read_tokens:
        config = dataclasses.replace(
            config,
            auth=AuthConfig(
                agent_tokens=(
                    TokenConfig(sha256=hash_token(AGENT_TOKEN), agents=("*",), name="capmon-testing"),
                ),
                read_tokens=(TokenConfig(sha256=hash_token(READ_TOKEN), name="capmon-testing"),),
            ),
        )
    return config


@dataclass(frozen=True)
class Answer:
    """What the collector answered: the status, the decoded JSON body (None when not JSON), headers."""

    status: int
    body: Any
    headers: Mapping[str, str]

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class DeliveryRefused(AssertionError):
    """The collector refused a window an in-process agent delivered: its answer says why."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(f"collector answered {answer.status}: {answer.body}")
        self.answer = answer


class InProcessCollector:
    """A collector for one test: `await post(batch)`, `await get("/api/v1/devices")`, `url` for agents."""

    def __init__(
        self,
        clock: Callable[[], float],
        config: Config | None = None,
        *,
        writer: StorageWriter | None = None,
        agent_token: str = AGENT_TOKEN,
        read_token: str = READ_TOKEN,
    ) -> None:
        self.config = collector_config(config)
        self.clock = clock
        self.agent_token = agent_token
        self.read_token = read_token
        self.app = create_app(self.config, writer=writer, clock=clock, env={})
        self.client: TestClient | None = None

    async def start(self) -> InProcessCollector:
        if self.client is None:
            self.client = TestClient(TestServer(self.app))
            await self.client.start_server()
        return self

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None

    async def __aenter__(self) -> InProcessCollector:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def url(self) -> str:
        """The base URL an agent's `[transport] url` points at."""
        if self.client is None:
            raise RuntimeError("the collector is not started (await start())")
        return str(self.client.make_url("")).rstrip("/")

    def _client(self) -> TestClient:
        if self.client is None:
            raise RuntimeError("the collector is not started (await start())")
        return self.client

    async def post(
        self, batch: wire.Batch | Mapping[str, Any] | bytes, *, token: str | None = None, gzip: bool = False
    ) -> Answer:
        """POST a batch (a `wire.Batch`, a JSON-able mapping, or a raw body) to /api/v1/reports."""
        if isinstance(batch, wire.Batch):
            body = wire.encode(batch)
        elif isinstance(batch, bytes):
            body = batch
        else:
            body = json.dumps(batch).encode()
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token or self.agent_token}"}
        if gzip:
            body, headers["Content-Encoding"] = gzip_.compress(body), "gzip"
        async with self._client().post("/api/v1/reports", data=body, headers=headers) as resp:
            return await _answer(resp)

    async def deliver(self, batch: wire.Batch) -> Answer:
        """POST a batch an agent produced; a refusal raises `DeliveryRefused` (the test should know)."""
        answer = await self.post(batch)
        if not answer.ok:
            raise DeliveryRefused(answer)
        return answer

    async def request(self, path: str, *, token: str | None = None, **params: Any) -> Answer:
        """GET `path` with the read token; `params` become the query string."""
        headers = {"Authorization": f"Bearer {token or self.read_token}"}
        query = {k: str(v) for k, v in params.items() if v is not None}
        async with self._client().get(path, params=query, headers=headers) as resp:
            return await _answer(resp)

    async def get(self, path: str, **params: Any) -> Any:
        """GET `path` and return its JSON; an answer that is not 2xx raises, with the body."""
        answer = await self.request(path, **params)
        if not answer.ok:
            raise AssertionError(f"GET {path} answered {answer.status}: {answer.body}")
        return answer.body

    async def fleet(self, **params: Any) -> Any:
        return await self.get("/api/v1/fleet", **params)

    async def devices(self, **params: Any) -> Any:
        return await self.get("/api/v1/devices", **params)

    async def agents(self, **params: Any) -> Any:
        return await self.get("/api/v1/agents", **params)


async def _answer(resp: Any) -> Answer:
    text = await resp.text()
    try:
        body = json.loads(text) if text else None
    except ValueError:
        body = text
    return Answer(resp.status, body, dict(resp.headers))
