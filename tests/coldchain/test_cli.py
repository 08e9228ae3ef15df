"""The command line as a person runs it: a process, its exit status and what it prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from coldchain.auth import Actor, Role
from coldchain.shipments import EventType, Shipment, Status
from coldchain.store import Store
from routing import example_network

pytestmark = pytest.mark.postgres

COLDCHAIN = str(Path(sys.executable).with_name("coldchain"))


def run_cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLDCHAIN_DATABASE_URL=database_url)
    return subprocess.run(
        [COLDCHAIN, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def elsewhere(url: str, *, user: str | None = None, database: str | None = None) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc
    if user is not None:
        netloc = f"{user}@{parts.hostname}:{parts.port or 5432}"
    path = f"/{database}" if database is not None else parts.path
    return urlunsplit(parts._replace(netloc=netloc, path=path))


@pytest.mark.parametrize(
    "command",
    [["migrate"], ["token", "create", "--role", "viewer", "--name", "ci"]],
    ids=["migrate", "token create"],
)
def test_a_database_that_does_not_exist_is_one_line_not_a_traceback(
    server_database_url: str, command: list[str]
) -> None:
    missing = f"coldchain_missing_{uuid.uuid4().hex[:8]}"
    result = run_cli(elsewhere(server_database_url, database=missing), *command)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"coldchain {command[0]}: ")
    assert f'database "{missing}" does not exist' in line


def test_a_role_postgresql_refuses_is_one_line_without_the_password(
    server_database_url: str,
) -> None:
    user = f"nobody_{uuid.uuid4().hex[:8]}"
    url = elsewhere(server_database_url, user=f"{user}:s3cret-pass")
    result = run_cli(url, "migrate")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("coldchain migrate: ") and user in line
    assert "s3cret-pass" not in result.stderr + result.stdout


async def test_lanes_prints_each_lane_and_refuses_a_period_that_ends_first(
    database_url: str, store: Store
) -> None:
    await store.import_sites(list(example_network().sites.values()), "test")
    admin = Actor(0, "test", Role.ADMIN)
    now = datetime.now(UTC).replace(microsecond=0)
    for i, deliver_by in enumerate((now + timedelta(hours=1), now - timedelta(hours=3))):
        shipment = await store.create_shipment(
            Shipment(f"SH-LANE-{i}", f"DW-LANE-{i}", "cryo-vapor", "MFG-MPN", "TC-NKI",
                     deliver_by, None, None, Status.CREATED, now, "test", now, None),
            admin,
        )  # fmt: skip
        for kind, at in (
            (EventType.PACKED, now - timedelta(hours=12)),
            (EventType.PICKED_UP, now - timedelta(hours=11)),
            (EventType.DELIVERED, now - timedelta(hours=2)),
        ):
            await store.record_event(shipment.id, kind, at, None, None, admin)

    table = run_cli(database_url, "lanes")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith("2 shipment(s) delivered ")
    assert lines[2].split() == [
        "lane", "delivered", "on", "time", "excursions", "transit", "h", "(median/max)",
        "hold", "margin", "h",
    ]  # fmt: skip
    assert lines[3].split() == ["MFG-MPN", "->", "TC-NKI", "2", "1/2", "(50%)", "0", "(0%)",
                                "10.0/10.0", "-"]  # fmt: skip

    as_json = run_cli(
        database_url, "lanes", "--json", "--from", (now - timedelta(hours=1)).isoformat()
    )
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["delivered"] == 0  # delivered before the period

    backwards = run_cli(
        database_url,
        "lanes",
        "--from",
        now.isoformat(),
        "--to",
        (now - timedelta(days=1)).isoformat(),
    )
    assert backwards.returncode != 0
    assert backwards.stderr.strip() == "coldchain lanes: `to` must be after `from`"
