"""The /demo page in headless Chromium (driven over the DevTools protocol) against the real app,
a real worker and the fake Hatched: bootstrap a user, wait out the hatch, mount the widget.

Skipped when no Chromium is installed (`apt-get install chromium`, or set CHROMIUM_BIN).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect

from service import store
from service.app import create_app
from service.auth import user_tokens
from service.config import Settings
from service.dev.samples import build_delivery
from tests.support.bootstrap import configured, deliver_outbox
from tests.support.config import SECRET
from tests.support.fake_hatched import FakeHatched, serve_fake
from tests.support.running import running_worker, serving
from tests.support.tools import missing

USER_TOKEN_KEY = "demo-page-test-user-token-key-" + "d" * 34
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
    # Offline on purpose: only the app under test resolves (widget.js fails to load, as expected).
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
)


def chromium_binary() -> str | None:
    explicit = os.environ.get("CHROMIUM_BIN")
    if explicit:
        return explicit if Path(explicit).exists() else None
    for name in BROWSERS:
        if found := shutil.which(name):
            return found
    return None


class Tab:
    """The least of the Chrome DevTools Protocol: call a method, evaluate an expression."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        await self._ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            reply = json.loads(await self._ws.recv())
            if reply.get("id") == call_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result

    async def evaluate(self, expression: str) -> Any:
        result = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, within: float = 30.0) -> Any:
        deadline = time.monotonic() + within
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                state = await self.evaluate("JSON.stringify(window.demo || null)")
                raise AssertionError(f"{expression} still falsy after {within}s; demo: {state}")
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def chromium(binary: str) -> AsyncIterator[Tab]:
    # Chromium's helpers may still touch the profile for a moment after it exits.
    with tempfile.TemporaryDirectory(prefix="hm-chromium-", ignore_cleanup_errors=True) as profile:
        log = Path(profile) / "chromium.log"
        with log.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                binary,
                *FLAGS,
                f"--user-data-dir={profile}",
                "about:blank",
                stdout=asyncio.subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,  # its own process group: it and its helpers end together
            )
        try:
            # Chromium writes the port it picked here once DevTools listens.
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + 30
            while not (port_file.exists() and port_file.read_text().strip()):
                if process.returncode is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"chromium did not start: {log.read_text()[-2000:]}")
                await asyncio.sleep(0.05)
            port = int(port_file.read_text().split()[0])
            async with httpx.AsyncClient() as client:
                targets = (await client.get(f"http://127.0.0.1:{port}/json/list")).json()
            page = next(t for t in targets if t["type"] == "page")
            async with connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
                yield Tab(ws)
        finally:
            await _end(process)


async def _end(process: asyncio.subprocess.Process) -> None:
    """SIGTERM to the browser's process group, SIGKILL after 10 s; helpers included."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            await asyncio.wait_for(process.wait(), 10)
            break
        except TimeoutError:
            continue
    deadline = time.monotonic() + 5
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # any helper that outlived the browser
        while time.monotonic() < deadline:  # gone, so the profile can be removed
            os.killpg(process.pid, 0)
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def hatched_webhooks(url: str, fake: FakeHatched) -> AsyncIterator[None]:
    """Plays Hatched's part: POSTs each buddy.hatched the fake queues to the receiver."""

    async def forward(http: httpx.AsyncClient) -> None:
        sent = 0
        while True:
            if len(fake.outbox) > sent:
                sent = await deliver_outbox(http, fake, sent)
            await asyncio.sleep(0.05)

    async with httpx.AsyncClient(base_url=url) as http:
        task = asyncio.create_task(forward(http))
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_demo_page_bootstraps_and_mounts_the_widget(
    settings: Settings, migrated: str, redis_url: str, pool: store.Pool
) -> None:
    binary = chromium_binary()
    if binary is None:
        missing("no Chromium found (install chromium or set CHROMIUM_BIN)")  # fails in CI
    fake = FakeHatched(hatch_delay_s=1.0)  # long enough for the page to show "hatching"
    async with serve_fake(fake) as fake_url:
        boot_settings = await configured(migrated, redis_url, pool, fake_url)
        boot_settings = boot_settings.model_copy(update={"user_token_secrets": [USER_TOKEN_KEY]})
        await drive_demo(binary, boot_settings, fake)


async def drive_demo(binary: str, boot_settings: Settings, fake: FakeHatched) -> None:
    # What `hatched-mirror dev` prints: the page holds a user token, never the API token.
    token = user_tokens.mint(USER_TOKEN_KEY, "demo_user", None, 3600, int(time.time()))
    async with (
        serving(create_app(boot_settings, demo=True)) as url,
        running_worker(boot_settings),
        hatched_webhooks(url, fake),
        chromium(binary) as tab,
    ):
        await tab.call("Page.navigate", url=f"{url}/demo#token={token}")
        await tab.wait_for("document.readyState === 'complete' && !!window.demo")
        assert await tab.evaluate("document.getElementById('user-id').value") == "demo_user"
        await tab.evaluate("document.getElementById('bootstrap').click()")
        state = await tab.wait_for(
            "['mounted', 'error'].includes(document.body.dataset.state)"
            " && document.body.dataset.state"
        )
        page = await tab.evaluate(
            """(() => {
                const script = document.querySelector('#widget script');
                return {
                  state: document.body.dataset.state,
                  states: window.demo.states,
                  error: window.demo.error || null,
                  shown: document.getElementById('token').textContent,
                  src: script && script.src,
                  token: script && script.dataset.token,
                  buddy: script && script.dataset.buddyId,
                };
            })()"""
        )
        assert state == "mounted", page
        (session,) = fake.widget_sessions.values()
        assert page["token"] == page["shown"] == session["token"]
        assert page["src"] == "https://cdn.hatched.live/widget.js"
        (hatched,) = fake.outbox
        assert page["buddy"] == session["buddy_id"] == hatched.buddy_id
        states = page["states"]
        assert states.index("hatching") < states.index("mounted"), states

        # Again, as after a reload: the mirror answers at once, no second egg or hatch.
        await tab.evaluate("window.demo.states = []; document.getElementById('bootstrap').click()")
        await tab.wait_for(
            "window.demo.states.includes('mounted') && document.body.dataset.state === 'mounted'"
        )
        assert "hatching" not in await tab.evaluate("window.demo.states")
        assert len(fake.eggs) == 1 and fake.calls["POST /eggs/{egg_id}/hatch"] == 1
        assert len(fake.widget_sessions) == 2

        # The page follows its buddy with an EventSource (`?access_token=`): a delivery shows.
        buddy_id = page["buddy"]
        await tab.wait_for(f"window.demo.seen && window.demo.seen.buddy_id === '{buddy_id}'")
        headers, body = build_delivery(
            "coins.earned", "v2", secret=SECRET, buddy_id=buddy_id, data={"amount": 9, "balance": 9}
        )
        async with httpx.AsyncClient(base_url=url) as http:
            sent = await http.post("/webhooks/hatched", content=body, headers=headers)
            assert sent.status_code == 202, sent.text
        await tab.wait_for("window.demo.seen.coins === 9", within=10)
        shown = await tab.evaluate("document.getElementById('live-coins').textContent")
        assert shown == "9"
