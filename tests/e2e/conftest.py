"""Fixtures for the dashboard's end-to-end tests: the real service on a fresh database with the
example network, shipments made through the API, and headless Chromium.

Without Chromium (or Playwright, or the npm-installed front-end libraries) these tests skip with
the reason, except under CI=true, where they fail: CI installs all three."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest

from coldchain.auth import Role
from coldchain.store import Store
from routing import example_network
from tests.e2e.browser import CHROMIUM_ARGS, SCREENSHOTS, chromium_path, missing
from tests.support import make_token, running_service, service_settings

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page

_ERRORS: dict[Page, list[str]] = {}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reason = missing()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("browser") is None:
            continue
        if os.environ.get("CI") == "true":
            item.add_marker(pytest.mark.usefixtures("_browser_required"))
        else:
            item.add_marker(pytest.mark.skip(reason=f"browser test: {reason}"))


@pytest.fixture
def _browser_required() -> None:
    pytest.fail(f"browser tests must run in CI: {missing()}", pytrace=False)


@dataclass
class Dashboard:
    """The running service, a token per role, and an API client."""

    base: str
    tokens: dict[Role, str]
    http: aiohttp.ClientSession

    async def call(
        self, method: str, path: str, *, role: Role, body: dict[str, Any] | None = None
    ) -> Any:
        headers = {"Authorization": f"Bearer {self.tokens[role]}"}
        async with self.http.request(
            method, f"{self.base}/api/v1{path}", json=body, headers=headers
        ) as response:
            data = await response.json()
            assert response.status < 300, f"{method} {path}: {response.status} {data}"
            return data

    async def shipment(
        self, dewar_id: str, *, chain_of_identity: str | None = None, picked_up: bool = True
    ) -> str:
        """A cryo-vapor shipment, packed 10 min and picked up 5 min ago."""
        now = datetime.now(UTC)
        created = await self.call(
            "POST",
            "/shipments",
            role=Role.PLANNER,
            body={
                "dewar_id": dewar_id,
                "profile": "cryo-vapor",
                "origin": "MFG-MPN",
                "destination": "TC-CHA",
                "deliver_by": (now + timedelta(hours=30)).isoformat(),
                "chain_of_identity": chain_of_identity,
            },
        )
        sid = str(created["id"])
        events = [("packed", 10)] + ([("picked_up", 5)] if picked_up else [])
        for kind, minutes in events:
            await self.call(
                "POST",
                f"/shipments/{sid}/events",
                role=Role.OPERATOR,
                body={"type": kind, "at": (now - timedelta(minutes=minutes)).isoformat()},
            )
        return sid


@pytest.fixture
async def dashboard(database_url: str, mqtt_url: str) -> AsyncIterator[Dashboard]:
    store = await Store.open(database_url, max_size=1)
    try:
        await store.migrate()
        network = example_network()
        await store.import_sites(list(network.sites.values()), "test")
        await store.import_lanes(list(network.lanes), "test")
        await store.import_flights(list(network.flights), "test")
    finally:
        await store.close()
    tokens = {role: await make_token(database_url, role) for role in Role}
    # A shipment made moments before its first reading is picked up by the rules on their next
    # beat: a short beat keeps the tests from waiting for it.
    settings = service_settings(
        database_url, mqtt_url, f"e2e-{uuid.uuid4().hex[:8]}", rules_beat_s=0.5
    )
    async with running_service(settings) as base, aiohttp.ClientSession() as http:
        yield Dashboard(base, tokens, http)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        launched = await p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        yield launched
        await launched.close()


async def open_dashboard(browser: Browser, dashboard: Dashboard, role: Role) -> Page:
    """A page signed in with `role`'s token, showing the fleet; page errors fail the test."""
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    _ERRORS[page] = errors
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.set_default_timeout(15_000)
    await page.goto(f"{dashboard.base}/")
    await page.fill("#token", dashboard.tokens[role])
    await page.click("#sign-in-form button[type=submit]")
    await page.wait_for_selector("#fleet-table")
    return page


def page_errors(page: Page) -> list[str]:
    """Uncaught script errors on `page` so far."""
    return _ERRORS.get(page, [])


async def screenshot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
