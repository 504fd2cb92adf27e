"""The collector's live page (`GET /`): served with a strict CSP and nothing inline, and driven in a real
headless Chromium (Playwright, Debian's /usr/bin/chromium) as a person uses it. The browser helpers
here are shared with the report's browser test."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from collector_helpers import (
    AGENT_TOKEN,
    JSON,
    NOW,
    RACK_TOKEN,
    READ_TOKEN,
    RecordingWriter,
    auth,
    batch,
    body,
    device,
    make_config,
    report,
)

from capmon.collector.app import PAGE_CSP, create_app

CHROMIUM = os.environ.get("CAPMON_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
DOCS = Path(__file__).resolve().parents[2] / "docs"
# Set CAPMON_UPDATE_DOCS=1 to rewrite the committed screenshots under docs/.
UPDATE_DOCS = os.environ.get("CAPMON_UPDATE_DOCS") == "1"

# Collected in the page before any of its own scripts run (an init script is not subject to the CSP).
RECORD_CSP = (
    "window.__csp = [];"
    "document.addEventListener('securitypolicyviolation',"
    " e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));"
)


def async_playwright():
    """Playwright's async API, or a skip saying what to install."""
    try:
        from playwright.async_api import async_playwright as start
        from playwright.async_api import expect
    except ImportError:
        pytest.skip("playwright is not installed: pip install playwright (no browser download needed)")
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium")
    return start(), expect


@dataclass
class Recorder:
    console: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    def attach(self, page) -> None:
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("request", lambda r: self.requests.append((r.url, dict(r.headers))))

    @property
    def console_errors(self) -> list[str]:
        return [m for m in self.console if m.startswith(("error", "warning"))]


async def launch(p):
    return await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)


async def screenshots(page, tmp_path: Path, name: str) -> dict[str, Path]:
    """Desktop and phone-width full-page PNGs as test artefacts (and under docs/ with CAPMON_UPDATE_DOCS=1)."""
    out = {}
    for kind, size in (("desktop", DESKTOP), ("phone", PHONE)):
        await page.set_viewport_size(size)
        path = tmp_path / f"{name}-{kind}.png"
        await page.screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 5000, f"{path} looks empty"
        out[kind] = path
        if UPDATE_DOCS:
            DOCS.mkdir(exist_ok=True)
            # A 256-colour palette keeps the committed PNGs small.
            from PIL import Image

            Image.open(path).convert("RGB").quantize(256).save(DOCS / path.name, optimize=True)
    await page.set_viewport_size(DESKTOP)
    return out


# -- the page as served ----------------------------------------------------------------------------

EXPECTED_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
ASSETS = ("/", "/page/page.js", "/page/page.css")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_the_page_and_its_assets_come_with_the_strict_csp_and_need_no_token(aiohttp_client):
    client = await aiohttp_client(create_app(make_config(), writer=RecordingWriter()))
    assert PAGE_CSP == EXPECTED_CSP
    for path in ASSETS:
        resp = await client.get(path)
        assert resp.status == 200, path
        assert resp.headers["Content-Security-Policy"] == EXPECTED_CSP
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["Referrer-Policy"] == "no-referrer"
        assert "Set-Cookie" not in resp.headers
    assert (await client.get("/")).content_type == "text/html"
    assert (await client.get("/page/page.js")).content_type == "text/javascript"
    # Only the shipped files: no directory walk, no other package file.
    for path in ("/page/../app.py", "/page/sample.toml", "/page/", "/page/index.htm"):
        assert (await client.get(path)).status == 404, path
    # The API still wants its token.
    assert (await client.get("/api/v1/fleet")).status == 401


async def test_the_page_ships_everything_it_needs_and_runs_nothing_inline(aiohttp_client):
    client = await aiohttp_client(create_app(make_config(), writer=RecordingWriter()))
    texts = {path: await (await client.get(path)).text() for path in ASSETS}
    html = texts["/"]
    scripts = re.findall(r"<script\b[^>]*>", html)
    assert scripts and all('src="/page/' in s for s in scripts)
    assert re.search(r"<script\b[^>]*>\s*[^<\s]", html) is None, "inline script"
    assert re.search(r"\son\w+\s*=", html) is None, "inline event handler"
    assert " style=" not in html
    for path, text in texts.items():
        # No CDN, no external font or image: nothing but this origin (and data: for the favicon).
        assert re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I) is None, path
        assert "@import" not in text and "url(" not in text, path
    js = texts["/page/page.js"]
    # The token stays in sessionStorage and travels only as the Authorization header.
    assert "sessionStorage" in js and "localStorage" not in js and "document.cookie" not in js
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "eval(" not in js


# -- in a real browser -----------------------------------------------------------------------------


async def post(client, agent_id: str, token: str, reports: list[dict], labels: dict | None = None) -> int:
    resp = await client.post(
        "/api/v1/reports",
        data=body(batch(reports, agent_id=agent_id, host=f"{agent_id}.example", labels=labels)),
        headers={**auth(token), **JSON},
    )
    return resp.status


def fleet_devices(end: int, training_state: str) -> list[dict]:
    alice = {"source": "process", "pid": 4242, "user": "alice", "command": "python3", "held_s": 60.0}
    return [
        device("GPU-free-0", "free", idle_since=end - 7200, state_since=end - 7200),
        device("GPU-free-1", "free", idle_since=end - 600, state_since=end - 600),
        device("GPU-held", "allocated_idle", idle_since=end - 3600, state_since=end - 3600, holders=[alice]),
        device("GPU-train", training_state, **({"idle_since": end - 60} if training_state != "busy" else {})),
        device("GPU-lost", "unavailable", error="NVML_ERROR_GPU_IS_LOST"),
        device("NPU-0", "free", model="910B3", vendor="ascend", idle_since=end - 300, state_since=end - 300),
    ]


async def fleet_api(client) -> dict:
    resp = await client.get("/api/v1/fleet", headers=auth(READ_TOKEN))
    assert resp.status == 200
    return await resp.json()


async def texts(page, selector: str) -> list[str]:
    return [t.strip() for t in await page.locator(selector).all_inner_texts()]


async def test_a_person_signs_in_and_sees_the_fleet_move(aiohttp_client, tmp_path):
    clock = Clock(NOW + 1)
    app = create_app(make_config(stale_windows=3), writer=RecordingWriter(), clock=clock)
    client = await aiohttp_client(app, server_kwargs={"host": "127.0.0.1"})
    base = str(client.make_url("/"))
    assert (
        await post(client, "node-1", AGENT_TOKEN, [report(1, NOW, devices=fleet_devices(NOW, "busy"))]) == 200
    )
    # An agent whose clock is an hour ahead: every report refused, so it shows among the agents to fix.
    assert await post(client, "rack2-7", RACK_TOKEN, [report(1, NOW + 7200)]) == 400

    playwright, expect = async_playwright()
    async with playwright as p:
        browser = await launch(p)
        context = await browser.new_context(viewport=DESKTOP)
        await context.add_init_script(RECORD_CSP)
        page = await context.new_page()
        seen = Recorder()
        seen.attach(page)
        await page.goto(base)

        # A wrong token is refused: the login stays, says so, and keeps nothing.
        await page.fill("#token", "not-the-read-token")
        await page.click("#login-button")
        await page.wait_for_selector("#login-error:not([hidden])")
        assert (await page.inner_text("#login-error")) == "token refused"
        assert await page.is_hidden("#fleet")
        assert await page.evaluate("sessionStorage.length") == 0
        # An agent token is not a read token either.
        await page.fill("#token", AGENT_TOKEN)
        await page.click("#login-button")
        await expect(page.locator("#login-error")).to_have_text("not a read token")

        await page.fill("#token", READ_TOKEN)
        await page.click("#login-button")
        await page.wait_for_selector("#fleet:not([hidden])")
        fleet = await fleet_api(client)
        totals = fleet["totals"]
        for state in ("free", "allocated_idle", "busy", "unavailable"):
            assert await page.inner_text(f"#n-{state}") == str(totals["states"][state]), state
        assert totals["states"] == {"free": 3, "allocated_idle": 1, "busy": 1, "unavailable": 1}
        assert await page.inner_text("#idle-value") == f"{totals['idle_value_per_hour']:.2f} USD"
        # By model and by each label key, as /api/v1/fleet counts them.
        rows = await texts(page, "#by-model tbody tr")
        for model, m in fleet["by_model"].items():
            (row,) = [r for r in rows if r.startswith(model)]
            cells = row.split("\t")
            assert cells[1:5] == [
                str(m["states"][s]) for s in ("free", "allocated_idle", "busy", "unavailable")
            ]
            assert cells[5] == f"{m['idle_value_per_hour']:.2f}"
        for key in ("site", "cluster", "pool"):
            rows = await texts(page, f"#by-label-{key} tbody tr")
            assert [r.split("\t")[0] for r in rows] == list(fleet["by_label"][key])
        # Longest idle first, as /api/v1/devices?state=idle lists them.
        resp = await client.get("/api/v1/devices?state=idle&limit=15", headers=auth(READ_TOKEN))
        idle = (await resp.json())["devices"]
        rows = await texts(page, "#idle-devices tbody tr")
        assert [r.split("\t")[0] for r in rows] == [d["device_id"] for d in idle]
        assert rows[0].split("\t")[0] == "GPU-free-0" and "2h 0m" in rows[0]
        # Who holds the allocated-idle device, and the agent refused for its clock.
        (holder,) = await texts(page, "#holders tbody tr")
        assert holder.startswith("alice\t1\t")
        (agent_row,) = await texts(page, "#agents tbody tr")
        assert agent_row.startswith("rack2-7") and "clock" in agent_row

        # The token never left the Authorization header of /api/v1/* on this origin.
        assert await page.evaluate("sessionStorage.getItem('capmon.readToken')") == READ_TOKEN
        assert await context.cookies() == []
        for url, headers in seen.requests:
            assert url.startswith(base), url
            assert READ_TOKEN not in url and "token" not in url.lower(), url
            if "/api/v1/" in url:
                assert headers.get("authorization", "").startswith("Bearer "), url
            else:
                assert "authorization" not in headers, url

        # A device changes state: the page shows it at its next refresh, without a reload.
        clock.now = NOW + 61
        devices = fleet_devices(NOW + 60, "free")
        assert await post(client, "node-1", AGENT_TOKEN, [report(2, NOW + 60, devices=devices)]) == 200
        await expect(page.locator("#n-busy")).to_have_text("0", timeout=20_000)
        fleet = await fleet_api(client)
        assert await page.inner_text("#n-free") == str(fleet["totals"]["states"]["free"]) == "4"

        shots = await screenshots(page, tmp_path, "live-page")
        assert set(shots) == {"desktop", "phone"}
        # Usable on a phone: nothing wider than the screen except inside the scrolling tables.
        await page.set_viewport_size(PHONE)
        width = await page.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"], width

        # Sign out forgets the token; a reload asks for it again.
        await page.click("#logout")
        assert await page.evaluate("sessionStorage.length") == 0
        await page.reload()
        await page.wait_for_selector("#login:not([hidden])")

        assert seen.errors == []
        assert await page.evaluate("window.__csp") == []
        # The wrong tokens' 401 and 403 are the only complaints the console may carry.
        unexpected = [m for m in seen.console_errors if "status of 401" not in m and "status of 403" not in m]
        assert unexpected == []
        await browser.close()


async def test_capmon_demo_prints_the_page_address_first():
    import io

    from capmon.collector.demo import default_args, run_demo

    out = io.StringIO()
    await run_demo(default_args(hosts=1, devices=2, window=1, port=0, seconds=1.5), out)
    first = out.getvalue().splitlines()[0]
    assert re.fullmatch(
        r"capmon demo: live page http://127\.0\.0\.1:\d+/  \(read token: demo-read-token\)", first
    )
