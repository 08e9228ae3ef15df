"""The excursion report: its figures on traces whose answers are known, and the report of a real
shipment through the service (readings over MQTT, an alarm raised and acknowledged, custody),
in JSON, CSV and PDF, over the API and the command line."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import numpy as np
import pytest
from pypdf import PdfReader

from coldchain import pdf
from coldchain.auth import Role
from coldchain.profiles import BUILT_IN, Direction, Limit, Metric, Profile, Severity
from coldchain.report import (
    ReportInputs,
    build,
    condition,
    duration_text,
    mean_kinetic_temperature,
    mkt_applies,
    readings_csv,
)
from coldchain.shipments import Shipment, Status
from coldchain.store import READING_CSV_COLUMNS, Store
from routing import airport_site, example_network
from sensors import Reading, encode_reading, telemetry_topic
from tests.support import eventually, make_token, publish_all, running_service, service_settings

PROFILES = {p.name: p for p in BUILT_IN}
T0 = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)


def _csv(rows: Sequence[tuple[datetime, float, float | None]]) -> bytes:
    """Readings as the store's COPY gives them: (ts, temp_c, ln2) and empty other columns."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(READING_CSV_COLUMNS)
    for seq, (ts, temp, ln2) in enumerate(rows):
        stamp = ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        writer.writerow([stamp, seq, temp, "" if ln2 is None else ln2, "", "", "f", "", "", ""])
    return out.getvalue().encode()


def _inputs(
    profile: Profile, rows: Sequence[tuple[datetime, float, float | None]], end: datetime
) -> ReportInputs:
    shipment = Shipment(
        id="SH-TEST",
        dewar_id="DW-1",
        profile=profile.name,
        origin="MFG-MPN",
        destination="TC-NKI",
        deliver_by=None,
        planned_departure=None,
        chain_of_identity=None,
        status=Status.DELIVERED,
        created_at=T0,
        created_by="test",
        starts_at=T0,
        ends_at=end,
    )
    return ReportInputs(shipment, profile, None, None, _csv(rows), [], [], end, "test")


def test_mkt_of_a_constant_temperature_is_that_temperature() -> None:
    temps = np.full(10, 5.0)
    mkt = mean_kinetic_temperature(temps, np.full(10, 60.0))
    assert mkt is not None
    assert mkt == pytest.approx(5.0, abs=1e-9)


def test_mkt_weighs_warm_hours_more_than_the_arithmetic_mean() -> None:
    # Half the time at 2 °C, half at 12 °C: USP <1160>'s formula by hand gives 8.414 °C
    # (10000 / -ln((exp(-10000/275.15) + exp(-10000/285.15)) / 2) - 273.15).
    mkt = mean_kinetic_temperature(np.array([2.0, 12.0]), np.array([3600.0, 3600.0]))
    expected = 10000 / -math.log((math.exp(-10000 / 275.15) + math.exp(-10000 / 285.15)) / 2)
    assert mkt == pytest.approx(expected - 273.15, abs=1e-9)
    assert mkt == pytest.approx(8.414, abs=1e-3)
    # Durations count: three hours at 2 °C and one at 12 °C pull it down.
    weighted = mean_kinetic_temperature(np.array([2.0, 12.0]), np.array([3 * 3600.0, 3600.0]))
    assert weighted is not None
    assert weighted == pytest.approx(5.817, abs=1e-3)  # the arithmetic mean is 4.5


def test_mkt_only_for_products_kept_above_freezing() -> None:
    assert mkt_applies(PROFILES["refrigerated"])
    assert mkt_applies(PROFILES["ambient"])
    assert not mkt_applies(PROFILES["cryo-vapor"])


def test_time_in_range_counts_sample_and_hold_and_never_counts_a_gap() -> None:
    profile = PROFILES["refrigerated"]  # 2-8 °C, signal lost after 15 min
    rows = [(T0 + timedelta(minutes=i), 5.0, None) for i in range(60)]  # 09:00-09:59 at 5 °C
    rows += [(T0 + timedelta(minutes=60 + i), 11.0, None) for i in range(20)]  # 20 min at 11
    # then nothing for 2 h (a dead link), then 10 more minutes at 5 °C
    rows += [(T0 + timedelta(minutes=200 + i), 5.0, None) for i in range(10)]
    end = T0 + timedelta(minutes=210)
    report = build(_inputs(profile, rows, end))
    high = next(lim for lim in report.limits if lim.rule == "temp_high")
    assert high.beyond_s == 20 * 60 - 60 + 15 * 60  # the last warm reading holds 15 min at most
    assert high.stretches == 1
    assert high.worst == 11.0
    assert report.temperature.in_range_s == 60 * 60 + 10 * 60
    assert report.monitored_s == 60 * 60 + 19 * 60 + 15 * 60 + 10 * 60
    assert report.unmonitored_s == 210 * 60 - report.monitored_s
    assert report.excursion
    assert "TEMPERATURE EXCURSION" in report.verdict
    assert report.temperature.mkt_c is not None
    assert 5.0 < report.temperature.mkt_c < 11.0
    assert report.temperature.min_c == 5.0 and report.temperature.max_c == 11.0


def test_a_calm_cryo_shipment_has_no_excursion_and_no_mkt() -> None:
    profile = PROFILES["cryo-vapor"]
    rows = [(T0 + timedelta(minutes=5 * i), -190.0 + (i % 3), 80 - i / 10) for i in range(100)]
    report = build(_inputs(profile, rows, T0 + timedelta(minutes=500)))
    assert not report.excursion
    assert report.temperature.in_range_pct == 100.0
    assert report.temperature.mkt_c is None
    assert report.ln2 is not None
    assert report.ln2.start_pct == 80.0 and report.ln2.end_pct == pytest.approx(70.1)
    assert report.verdict.startswith("No temperature excursion")


def test_a_long_series_is_thinned_for_the_plot_but_keeps_its_spike() -> None:
    profile = PROFILES["cryo-vapor"]
    rows = [(T0 + timedelta(seconds=i), -190.0, None) for i in range(20_000)]
    rows[12_345] = (rows[12_345][0], -120.0, None)
    report = build(_inputs(profile, rows, T0 + timedelta(seconds=20_000)))
    assert len(report.temperature_series.values) <= 1500
    assert max(report.temperature_series.values) == -120.0
    glass = next(lim for lim in report.limits if lim.rule == "temp_glass_transition")
    assert glass.beyond_s == 1.0 and glass.stretches == 1


def test_the_csv_flags_each_reading_with_the_limits_it_passed() -> None:
    profile = PROFILES["refrigerated"]
    rows = [
        (T0, 5.0, None),
        (T0 + timedelta(minutes=1), -0.5, None),
        (T0 + timedelta(minutes=2), 5.0, None),
    ]
    data = readings_csv(_inputs(profile, rows, T0 + timedelta(minutes=3)))
    table = list(csv.DictReader(io.StringIO(data.decode())))
    assert [r["temp_c"] for r in table] == ["5.0", "-0.5", "5.0"]
    assert table[0]["beyond_limits"] == ""
    assert set(table[1]["beyond_limits"].split(";")) >= {"temp_low", "freezing"}
    assert table[1]["held_s"] == "60.0"
    assert table[1]["lid_open"] == "false"
    assert table[0]["shipment_id"] == "SH-TEST"


def test_time_too_warm_and_too_cold_count_together_against_the_range_budget() -> None:
    profile = PROFILES["refrigerated"]
    rows = [(T0 + timedelta(minutes=i), 5.0, None) for i in range(10)]
    rows += [(T0 + timedelta(minutes=10 + i), 9.0 + i / 100, None) for i in range(45)]
    rows += [(T0 + timedelta(minutes=55 + i), 5.0, None) for i in range(10)]
    rows += [(T0 + timedelta(minutes=65 + i), 0.9 - i / 100, None) for i in range(45)]
    rows += [(T0 + timedelta(minutes=110 + i), 5.0, None) for i in range(10)]
    report = build(_inputs(profile, rows, T0 + timedelta(minutes=120)))
    budget = next(lim for lim in report.limits if lim.rule == "temp_out_of_range_budget")
    assert budget.condition == "outside 2-8 °C, 1 h 00 min in all"
    assert (budget.direction, budget.low, budget.threshold) == ("outside", 2.0, 8.0)
    assert budget.beyond_s == 90 * 60 and budget.stretches == 2 and budget.longest_s == 45 * 60
    assert budget.worst == pytest.approx(0.46)  # 1.54 below the range beats 1.44 above
    assert report.temperature.in_range_s == 30 * 60
    assert report.verdict.startswith(
        "TEMPERATURE EXCURSION: outside 2-8 °C for 1 h 30 min in all, 75.0 % of monitored time;"
        " highest severity critical."
    )
    flagged = list(csv.DictReader(io.StringIO(readings_csv(_inputs(profile, rows, T0)).decode())))
    assert "temp_out_of_range_budget" in flagged[10]["beyond_limits"].split(";")
    assert "temp_out_of_range_budget" in flagged[65]["beyond_limits"].split(";")


def test_a_range_is_written_and_drawn_with_both_bounds() -> None:
    label = Limit(
        "temp_out_of_label",
        Metric.TEMP_C,
        Direction.OUTSIDE,
        7.0,
        Severity.MAJOR,
        delay_s=600,
        low=3.0,
    )
    assert condition(label) == "outside 3-7 °C for 10 min"
    cold = Limit("t", Metric.TEMP_C, Direction.OUTSIDE, -150, Severity.MAJOR, low=-190)
    assert condition(cold) == "outside -190 to -150 °C"
    profile = Profile(name="label-3-7", description="3-7 °C on the label", limits=(label,))
    assert mkt_applies(profile)
    rows = [(T0 + timedelta(minutes=i), 5.0 + (i % 3), None) for i in range(30)]
    document = pdf.render(build(_inputs(profile, rows, T0 + timedelta(minutes=30))))
    text = "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(document)).pages)
    assert "3 major" in text and "7 major" in text


def test_durations_read_as_a_person_writes_them() -> None:
    assert duration_text(42) == "42 s"
    assert duration_text(300) == "5 min"
    assert duration_text(3 * 3600 + 300) == "3 h 05 min"
    assert duration_text(50 * 3600) == "2 d 2 h"


# Through the service ---------------------------------------------------------------------------


async def _call(
    session: aiohttp.ClientSession, method: str, url: str, token: str, body: object = None
) -> tuple[int, Any]:
    async with session.request(
        method, url, json=body, headers={"Authorization": f"Bearer {token}"}
    ) as response:
        return response.status, await response.json()


@pytest.mark.postgres
@pytest.mark.mqtt
async def test_the_report_of_a_real_shipment_in_json_csv_and_pdf(
    database_url: str, mqtt_url: str, unique: str
) -> None:
    store = await Store.open(database_url)
    await store.migrate()
    await store.import_sites(list(example_network().sites.values()), "test")
    await store.close()
    tokens = {r: await make_token(database_url, r) for r in Role}
    dewar = f"DW-REP-{unique}"
    now = datetime.now(UTC).replace(microsecond=0)
    packed = now - timedelta(hours=2)
    settings = service_settings(database_url, mqtt_url, f"svc-{unique}", rules_beat_s=0.5)
    async with running_service(settings) as base, aiohttp.ClientSession() as session:
        api = f"{base}/api/v1"
        status, created = await _call(
            session,
            "POST",
            f"{api}/shipments",
            tokens[Role.PLANNER],
            {
                "dewar_id": dewar,
                "profile": "cryo-vapor",
                "origin": "MFG-MPN",
                "destination": "TC-NKI",
                "chain_of_identity": "W1234 26 123456 <b>COI</b>",
                "deliver_by": (now + timedelta(days=3)).isoformat(),
            },
        )
        assert status == 201, created
        sid = created["id"]
        for kind, at in (("packed", packed), ("picked_up", packed + timedelta(seconds=30))):
            status, body = await _call(
                session,
                "POST",
                f"{api}/shipments/{sid}/events",
                tokens[Role.OPERATOR],
                {"type": kind, "at": at.isoformat(), "location": "Morris Plains dock 3"},
            )
            assert status == 201, body
        # 40 min at -190 °C, 8 min at -140 °C (past -150 °C for longer than the 5 min delay),
        # 30 min at -190 °C: one reading a minute from a minute after pack-out.
        temps = [-190.0] * 40 + [-140.0] * 8 + [-190.0] * 30
        readings = [
            Reading(
                seq=i,
                ts=packed + timedelta(minutes=1 + i),
                temp_c=t,
                ln2_level_pct=80.0 - i / 100,
                tilt_deg=3.0,
            )
            for i, t in enumerate(temps)
        ]
        await asyncio.to_thread(
            publish_all,
            mqtt_url,
            [(telemetry_topic(dewar), encode_reading(r)) for r in readings],
            client_id=f"dev-{unique}",
        )

        async def alarms() -> list[dict[str, Any]]:
            _, page = await _call(
                session, "GET", f"{api}/alarms?shipment_id={sid}", tokens[Role.VIEWER]
            )
            return list(page["items"])

        found = await eventually(
            alarms, lambda items: any(a["rule"] == "temp_high" and a["cleared_at"] for a in items)
        )
        alarm = next(a for a in found if a["rule"] == "temp_high")
        status, body = await _call(
            session,
            "POST",
            f"{api}/alarms/{alarm['id']}/ack",
            tokens[Role.OPERATOR],
            {"comment": "courier checked: lid seal <ok>, dewar recharged"},
        )
        assert status == 200, body
        delivered = packed + timedelta(minutes=80)
        status, body = await _call(
            session,
            "POST",
            f"{api}/shipments/{sid}/events",
            tokens[Role.OPERATOR],
            {"type": "delivered", "at": delivered.isoformat(), "location": "NKI pharmacy"},
        )
        assert status == 201, body

        status, report = await _call(
            session, "GET", f"{api}/shipments/{sid}/report", tokens[Role.VIEWER]
        )
        assert status == 200, report
        assert report["readings"] == 78
        assert report["excursion"] is True
        assert report["verdict"].startswith("TEMPERATURE EXCURSION: > -150 °C for 8 min")
        high = next(lim for lim in report["limits"] if lim["rule"] == "temp_high")
        assert high["beyond_s"] == 8 * 60
        assert high["stretches"] == 1 and high["alarms"] == 1 and high["worst"] == -140.0
        glass = next(lim for lim in report["limits"] if lim["rule"] == "temp_glass_transition")
        assert glass["beyond_s"] == 0 and glass["alarms"] == 0
        # 77 one-minute intervals, and the last reading holds the 2 minutes until delivery.
        assert report["monitored_s"] == 77 * 60 + 2 * 60
        assert report["unmonitored_s"] == 60  # pack-out to the first reading
        assert report["temperature"]["in_range_s"] == report["monitored_s"] - 8 * 60
        assert report["temperature"]["mkt_c"] is None
        assert report["on_time"] is True
        assert report["origin"]["name"] and report["destination"]["id"] == "TC-NKI"
        logged = next(a for a in report["alarms"] if a["alarm"]["rule"] == "temp_high")
        assert logged["alarm"]["ack_comment"] == "courier checked: lid seal <ok>, dewar recharged"
        assert logged["alarm"]["acknowledged_by"].startswith("test operator")
        assert [c["state"] for c in logged["changes"]][:1] == ["open"]
        # Acknowledged after it cleared: the change keeps state "cleared" and carries who and why.
        assert any(
            c["comment"] == "courier checked: lid seal <ok>, dewar recharged"
            and c["actor"].startswith("test operator")
            for c in logged["changes"]
        )
        assert [e["type"] for e in report["custody"]] == ["packed", "picked_up", "delivered"]
        assert report["temperature_series"]["values"].count(-140.0) == 8

        async with session.get(
            f"{api}/shipments/{sid}/report?format=csv",
            headers={"Authorization": f"Bearer {tokens[Role.VIEWER]}"},
        ) as response:
            assert response.status == 200
            assert response.content_type == "text/csv"
            assert f'filename="{sid}-report.csv"' in response.headers["Content-Disposition"]
            table = list(csv.DictReader(io.StringIO(await response.text())))
        assert len(table) == 78
        assert sum("temp_high" in r["beyond_limits"] for r in table) == 8
        assert table[0]["ts"].endswith("Z") and table[0]["seq"] == "0"

        async with session.get(
            f"{api}/shipments/{sid}/report?format=pdf",
            headers={"Authorization": f"Bearer {tokens[Role.VIEWER]}"},
        ) as response:
            assert response.status == 200
            assert response.content_type == "application/pdf"
            pdf = await response.read()
        text = "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages)
        flat = " ".join(text.split())
        assert f"shipment {sid}" in flat
        assert "TEMPERATURE EXCURSION" in flat
        assert "courier checked: lid seal <ok>, dewar recharged" in flat
        assert "W1234 26 123456 <b>COI</b>" in flat
        assert "NKI pharmacy" in flat

        for query, expected in (("?format=xml", 400), ("?format=", 400)):
            status, body = await _call(
                session, "GET", f"{api}/shipments/{sid}/report{query}", tokens[Role.VIEWER]
            )
            assert status == expected and body["error"]["message"], body
        status, body = await _call(
            session, "GET", f"{api}/shipments/NO-SUCH/report", tokens[Role.VIEWER]
        )
        assert status == 404 and body["error"]["code"]

    # The command line writes the same report.
    done = await asyncio.to_thread(_cli, database_url, "report", sid)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["limits"] == report["limits"]
    missing = await asyncio.to_thread(_cli, database_url, "report", "NO-SUCH")
    assert missing.returncode != 0
    assert missing.stderr.decode().count("\n") == 1 and "NO-SUCH" in missing.stderr.decode()


def _cli(database_url: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "coldchain.cli", *args],
        capture_output=True,
        env={**os.environ, "COLDCHAIN_DATABASE_URL": database_url},
        timeout=120,
        check=False,
    )


def test_chinese_japanese_and_korean_names_are_written_in_the_pdf() -> None:
    # A treatment centre in Tokyo, a manufacturing site in Seoul: DejaVu Sans has none of these
    # glyphs, WenQuanYi Micro Hei has them all. CI installs it; elsewhere the test says so.
    fonts = pdf._find_font() is not None and pdf._find_fallbacks()[:1] == [pdf._FALLBACK_FONTS[0]]
    if not fonts:
        reason = "needs fonts-dejavu-core and fonts-wqy-microhei (apt-get install them)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    profile = next(p for p in BUILT_IN if p.name == "cryo-vapor")
    rows = [(T0 + timedelta(minutes=i), -190.0 + i % 3, 80.0) for i in range(30)]
    inputs = _inputs(profile, rows,
                     T0 + timedelta(minutes=30))  # fmt: skip
    tokyo = airport_site("HND", customs_minutes=0)
    inputs = replace(
        inputs,
        origin=replace(tokyo, id="MFG-SEOUL", name="서울 세포치료 제조소"),
        destination=replace(tokyo, id="TC-TOKYO", name="国立がん研究センター中央病院"),
    )
    document = pdf.render(build(inputs))
    text = "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(document)).pages)
    assert "国立がん研究センター中央病院" in text
    assert "서울 세포치료 제조소" in text
