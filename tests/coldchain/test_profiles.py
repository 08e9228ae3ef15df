"""Product profiles: what an admin may write, and the built-in profiles a database ends up with
(fresh, or migrated from an older version)."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import msgspec
import pytest

from coldchain.profiles import BUILT_IN, Direction, Profile, profile_from_json
from coldchain.store import Store, available_migrations

PROFILES = {p.name: p for p in BUILT_IN}


def _with_limit(**limit: Any) -> bytes:
    body = msgspec.to_builtins(PROFILES["refrigerated"])
    body["name"] = "custom"
    body["limits"] = [
        {
            "rule": "temp_out",
            "metric": "temp_c",
            "severity": "critical",
            "budget_s": 3600,
            **limit,
        }
    ]
    return json.dumps(body).encode()


def test_an_outside_limit_has_both_bounds() -> None:
    profile = profile_from_json(_with_limit(direction="outside", low=2, threshold=8))
    (limit,) = profile.limits
    assert limit.direction is Direction.OUTSIDE and limit.bounds == (2.0, 8.0)
    assert [limit.breached(v) for v in (1.9, 2.0, 5.0, 8.0, 8.1)] == [
        True,
        False,
        False,
        False,
        True,
    ]


@pytest.mark.parametrize(
    ("limit", "reason"),
    [
        ({"direction": "outside", "low": 8, "threshold": 8}, "low (8) must be below threshold (8)"),
        ({"direction": "outside", "low": 9, "threshold": 8}, "low (9) must be below threshold (8)"),
        ({"direction": "outside", "threshold": 8}, "an 'outside' limit needs low"),
        ({"direction": "above", "low": 2, "threshold": 8}, "a limit above a threshold has none"),
        (
            {"direction": "outside", "low": 7, "threshold": 8, "hysteresis": 0.5},
            "too narrow for a deadband of 0.5 on each side",
        ),
    ],
)
def test_an_outside_limit_without_a_range_is_refused(limit: dict[str, Any], reason: str) -> None:
    with pytest.raises(ValueError, match="rule temp_out: ") as caught:
        profile_from_json(_with_limit(**limit))
    assert reason in str(caught.value)


def test_the_band_profiles_have_one_budget_for_the_time_out_of_range() -> None:
    for name, bounds in (("refrigerated", (2.0, 8.0)), ("ambient", (15.0, 25.0))):
        budgets = [lim for lim in PROFILES[name].limits if lim.budget_s is not None]
        assert [(b.rule, b.direction, b.bounds, b.budget_s) for b in budgets] == [
            ("temp_out_of_range_budget", Direction.OUTSIDE, bounds, 3600)
        ]


# The migration of the built-ins --------------------------------------------------------------


def _old_band(name: str, low: int, high: int) -> dict[str, Any]:
    """A band profile as versions before migration 006 stored it (two budgets, one a side)."""
    body: dict[str, Any] = msgspec.to_builtins(PROFILES[name])
    old = []
    for limit in body["limits"]:
        if limit["rule"] == "temp_out_of_range_budget":
            old.append(
                dict(
                    limit,
                    direction="above",
                    threshold=float(high),
                    budget_s=3600,
                    message=f"over an hour above {high} °C in this shipment",
                )
            )
            old.append(
                dict(
                    limit,
                    rule="temp_below_range_budget",
                    direction="below",
                    threshold=float(low),
                    budget_s=3600,
                    message=f"over an hour below {low} °C in this shipment",
                )
            )
            continue
        old.append(limit)
    for limit in old:
        limit.pop("low")
    body["limits"] = old
    return body


@pytest.mark.postgres
async def test_migrating_an_older_database_combines_the_built_in_budgets(
    database_url: str,
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for migration in available_migrations():
            if migration.version <= 5:
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
        edited = _old_band("ambient", 15, 25)
        edited["limits"] = [
            dict(limit, budget_s=7200) if limit["rule"] == "temp_below_range_budget" else limit
            for limit in edited["limits"]
        ]
        await conn.executemany(
            "INSERT INTO profiles (name, body, built_in) VALUES ($1, $2::jsonb, true)",
            [
                ("refrigerated", json.dumps(_old_band("refrigerated", 2, 8))),
                ("ambient", json.dumps(edited)),  # an admin gave its cold side two hours
            ],
        )
    finally:
        await conn.close()

    store = await Store.open(database_url)
    try:
        applied = await store.migrate()
        assert 6 in {m.version for m in applied}
        fridge = await store.profile("refrigerated")
        assert fridge is not None and fridge.profile == PROFILES["refrigerated"]
        ambient = await store.profile("ambient")
        assert ambient is not None
        assert ambient.profile == msgspec.convert(edited, Profile)  # edits are kept
        audit = await store.audit_entries(entity="profile", entity_id="refrigerated")
        assert [(e.actor, e.action) for e in audit] == [("coldchain", "profile.updated")]
        assert await store.audit_entries(entity="profile", entity_id="ambient") == []
    finally:
        await store.close()
