"""The Grafana dashboards of the compose stack: their JSON is well formed and points at the
provisioned data source, and every panel's SQL runs against the real schema."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from coldchain.store import DeadLetter, IncomingReading, Store
from sensors import Reading

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "dashboards" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))


def _datasource_uid() -> str:
    provisioned = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "coldchain.yaml").read_text()
    )
    (source,) = provisioned["datasources"]
    assert source["type"] == "grafana-postgresql-datasource"
    uid: str = source["uid"]
    return uid


def _queries() -> list[tuple[str, str, str]]:
    found = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                found.append((path.name, panel["title"], target["rawSql"]))
    return found


def test_three_dashboards_with_unique_uids_on_the_provisioned_data_source() -> None:
    assert {p.name for p in DASHBOARDS} == {"alarms.json", "fleet-temperatures.json", "ingest.json"}
    uid = _datasource_uid()
    uids = []
    for path in DASHBOARDS:
        board: dict[str, Any] = json.loads(path.read_text())
        assert board["title"] and board["uid"]
        uids.append(board["uid"])
        assert board["panels"], path.name
        for panel in board["panels"]:
            assert panel["datasource"]["uid"] == uid, (path.name, panel["title"])
            assert panel.get("targets"), (path.name, panel["title"])
    assert len(set(uids)) == len(uids)


def _expand(sql: str) -> str:
    """Grafana's macros, as its PostgreSQL data source expands them."""
    sql = re.sub(
        r"\$__timeGroupAlias\((\w+),\s*'(\d+)([mh])'\)",
        lambda m: (
            f"date_bin('{m[2]} {'minutes' if m[3] == 'm' else 'hours'}', "
            f"{m[1]}, timestamptz 'epoch') AS time"
        ),
        sql,
    )
    sql = re.sub(
        r"\$__timeFilter\((\w+)\)",
        lambda m: f"{m[1]} BETWEEN now() - interval '6 hours' AND now()",
        sql,
    )
    assert "$__" not in sql, f"a macro this test does not know: {sql}"
    return sql


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("board", "title", "sql"), _queries(), ids=[f"{b}:{t}" for b, t, _ in _queries()]
)
async def test_every_panel_query_runs_against_the_schema(
    store: Store, database_url: str, board: str, title: str, sql: str
) -> None:
    now = datetime.now(UTC)
    await store.write_batch(
        [
            IncomingReading(
                "DW-G1",
                Reading(seq=i, ts=now - timedelta(minutes=i), temp_c=-190.0, ln2_level_pct=80.0),
                now,
            )
            for i in range(30)
        ],
        [DeadLetter(now, "coldchain/v1/dewars/DW-G1/telemetry", "DW-G1", None, "not JSON", b"x")],
    )
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(_expand(sql))
    finally:
        await conn.close()
    if "readings" in sql or "dead_letters" in sql:
        assert rows, f"{board} / {title} returned nothing over fresh data"
