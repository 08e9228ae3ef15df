"""The excursion report as a PDF (A4): the verdict first, then the facts, the temperature plot
with its limits drawn and the alarms shaded, the limits table, LN2 and handling, the alarm log
with every acknowledgement, and the custody log.

Drawn with fpdf2's vector primitives, so the plot stays sharp at any zoom and nothing but fpdf2
is needed. Text is set in DejaVu Sans where the machine has it (Latin, Greek, Cyrillic, Arabic,
Hebrew...), with WenQuanYi Micro Hei (or Droid Sans Fallback, which has no Hangul) for what
DejaVu lacks, Chinese, Japanese and Korean site names and comments, where that is installed too;
otherwise in the PDF core font Helvetica, which covers Latin-1 only, so characters outside it
are shown as "?" (the JSON and CSV formats always carry the exact text).
CPU-bound: callers run `render` in a thread.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from fpdf import FPDF
from fpdf.enums import XPos, YPos
from fpdf.fonts import FontFace

from coldchain.profiles import Severity
from coldchain.report import duration_text
from coldchain.schemas import LimitSummary, Report, ReportAlarm, Series

_FONT_DIRS: Final = (
    Path("/usr/share/fonts/truetype/dejavu"),
    Path("/usr/share/fonts/dejavu"),
    Path("/usr/local/share/fonts"),
)

Colour = tuple[int, int, int]
INK: Final[Colour] = (20, 24, 31)
MUTED: Final[Colour] = (90, 98, 110)
GRID: Final[Colour] = (220, 224, 230)
OK: Final[Colour] = (0, 110, 60)
SEVERITY_COLOUR: Final[dict[Severity, Colour]] = {
    Severity.INFO: (90, 98, 110),
    Severity.WARNING: (176, 128, 0),
    Severity.MAJOR: (210, 90, 0),
    Severity.CRITICAL: (179, 0, 27),
}
SHADE: Final[Colour] = (255, 222, 222)
TEMP_LINE: Final[Colour] = (0, 84, 166)
LN2_LINE: Final[Colour] = (0, 128, 128)

_TICKS: Final = tuple(timedelta(hours=h) for h in (0.25, 0.5, 1, 2, 3, 6, 12, 24, 48, 96, 168, 336))


#: Fonts for the characters DejaVu Sans has no glyph for, first found first: WenQuanYi Micro Hei
#: covers Han, kana and Hangul (Debian: fonts-wqy-microhei); Droid Sans Fallback all but Hangul
#: (fonts-droid-fallback). TrueType outlines, which fpdf2 embeds as subsets.
_FALLBACK_FONTS: Final = (
    Path("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"),
    Path("/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf"),
)


def _find_fallbacks() -> list[Path]:
    return [f for f in _FALLBACK_FONTS if f.is_file()]


def _find_font() -> tuple[Path, Path] | None:
    for folder in _FONT_DIRS:
        regular, bold = folder / "DejaVuSans.ttf", folder / "DejaVuSans-Bold.ttf"
        if regular.is_file() and bold.is_file():
            return regular, bold
    return None


def when(value: datetime | None) -> str:
    return "—" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


class _Document(FPDF):
    def __init__(self, report: Report) -> None:
        super().__init__(orientation="P", unit="mm", format="A4")
        self.report = report
        fonts = _find_font()
        if fonts is None:
            self.family = "Helvetica"
            self.unicode = False
        else:
            self.add_font("DejaVu", "", str(fonts[0]))
            self.add_font("DejaVu", "B", str(fonts[1]))
            self.family = "DejaVu"
            self.unicode = True
            fallbacks = []
            for i, path in enumerate(_find_fallbacks()):
                # One face for both weights: a bold CJK name is set in the regular face.
                self.add_font(f"Fallback{i}", "", str(path))
                self.add_font(f"Fallback{i}", "B", str(path))
                fallbacks.append(f"Fallback{i}")
            if fallbacks:
                self.set_fallback_fonts(fallbacks)
        self.set_auto_page_break(auto=True, margin=16)
        self.set_margins(14, 14, 14)
        self.set_title(f"Excursion report {report.shipment_id}")
        self.set_author("coldchain")
        self.set_creation_date(report.generated_at)

    def text_of(self, value: str) -> str:
        if self.unicode:
            return value
        return value.replace("—", "-").encode("latin-1", "replace").decode("latin-1")

    def font(self, size: float, bold: bool = False) -> None:
        self.set_font(self.family, "B" if bold else "", size)

    def footer(self) -> None:
        self.set_y(-11)
        self.font(7)
        self.set_text_color(*MUTED)
        r = self.report
        self.cell(
            0,
            4,
            self.text_of(
                f"coldchain excursion report · shipment {r.shipment_id} · generated "
                f"{when(r.generated_at)} for {r.generated_by} · page {self.page_no()}/{{nb}}"
            ),
            align="C",
        )

    def heading(self, text: str) -> None:
        if self.get_y() > self.h - 40:
            self.add_page()
        self.ln(3)
        self.font(11, bold=True)
        self.set_text_color(*INK)
        self.cell(0, 7, self.text_of(text), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        self.set_draw_color(*GRID)
        self.line(self.l_margin, self.get_y(), self.w - self.r_margin, self.get_y())
        self.ln(1.5)

    def para(self, text: str, size: float = 8.5, colour: Colour = INK) -> None:
        self.font(size)
        self.set_text_color(*colour)
        self.multi_cell(0, 4.4, self.text_of(text), align="L", new_x=XPos.LMARGIN, new_y=YPos.NEXT)

    def grid(
        self,
        header: Sequence[str],
        rows: Sequence[Sequence[str]],
        widths: Sequence[float],
        colours: Sequence[Colour | None] = (),
    ) -> None:
        """A table with a heading row; `colours[i]` sets row i's second column in bold colour."""
        self.font(7.5)
        self.set_text_color(*INK)
        self.set_draw_color(*GRID)
        self.set_fill_color(255, 255, 255)
        with self.table(
            col_widths=tuple(widths),
            line_height=3.8,
            text_align="LEFT",
            first_row_as_headings=True,
            headings_style=FontFace(emphasis="BOLD", color=INK, fill_color=(238, 241, 245)),
            padding=1,
            borders_layout="HORIZONTAL_LINES",
        ) as table:
            head = table.row()
            for title in header:
                head.cell(self.text_of(title))
            for i, values in enumerate(rows):
                row = table.row()
                colour = colours[i] if i < len(colours) else None
                for j, value in enumerate(values):
                    style = FontFace(emphasis="BOLD", color=colour) if colour and j == 1 else None
                    row.cell(self.text_of(value), style=style)


def _verdict_box(pdf: _Document, report: Report) -> None:
    colour = SEVERITY_COLOUR[Severity.CRITICAL] if report.excursion else OK
    if report.readings == 0:
        colour = SEVERITY_COLOUR[Severity.MAJOR]
    pdf.set_fill_color(*colour)
    pdf.set_text_color(255, 255, 255)
    pdf.font(10.5, bold=True)
    pdf.multi_cell(
        0,
        6,
        pdf.text_of(report.verdict),
        fill=True,
        padding=2,
        new_x=XPos.LMARGIN,
        new_y=YPos.NEXT,
    )
    pdf.set_text_color(*INK)


def _facts(pdf: _Document, r: Report) -> None:
    def site(ref_id: str, name: str | None) -> str:
        return f"{name} ({ref_id})" if name else ref_id

    on_time = {True: "yes", False: "NO, late", None: "—"}[r.on_time]
    left = [
        ("Shipment", r.shipment_id),
        ("Chain of identity", r.chain_of_identity or "—"),
        ("Dewar", r.dewar_id),
        ("Product profile", f"{r.profile}: {r.profile_description}"),
        ("From", site(r.origin.id, r.origin.name)),
        ("To", site(r.destination.id, r.destination.name)),
        ("Status", r.status.replace("_", " ")),
    ]
    right = [
        ("Packed", when(r.packed_at)),
        ("Picked up", when(r.picked_up_at)),
        ("Delivered", when(r.delivered_at)),
        ("Deliver by", when(r.deliver_by)),
        ("On time", on_time),
        ("Period", f"{when(r.period_start)} to {when(r.period_end)}"),
        (
            "Readings",
            f"{r.readings:,} over {duration_text(r.monitored_s)} monitored; "
            f"{duration_text(r.unmonitored_s)} without data",
        ),
    ]
    top = pdf.get_y()
    column = (pdf.w - pdf.l_margin - pdf.r_margin) / 2
    for offset, pairs in ((0.0, left), (column, right)):
        pdf.set_xy(pdf.l_margin + offset, top)
        for key, value in pairs:
            pdf.set_x(pdf.l_margin + offset)
            pdf.font(7.5, bold=True)
            pdf.set_text_color(*MUTED)
            pdf.cell(27, 4.4, pdf.text_of(key))
            pdf.font(8)
            pdf.set_text_color(*INK)
            pdf.multi_cell(
                column - 29, 4.4, pdf.text_of(value), align="L", new_x=XPos.LMARGIN, new_y=YPos.NEXT
            )
        if offset == 0.0:
            bottom = pdf.get_y()
    pdf.set_y(max(bottom, pdf.get_y()))


def _nice_step(span: float, target: int = 6) -> float:
    raw = span / target
    magnitude = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * magnitude:
            return m * magnitude
    return 10 * magnitude


def _chart(
    pdf: _Document,
    series: Series,
    start: datetime,
    end: datetime,
    *,
    unit: str,
    line: Colour,
    thresholds: Sequence[tuple[float, Severity]] = (),
    shade: Sequence[tuple[datetime, datetime, Severity]] = (),
    gap_s: float,
    height: float = 62,
) -> None:
    """A time-series plot: axes, grid, shaded windows, dashed limit lines, the series."""
    if pdf.get_y() + height + 17 > pdf.h - 16:
        pdf.add_page()
    x0, y0 = pdf.l_margin + 12, pdf.get_y() + 7
    w = pdf.w - pdf.r_margin - x0 - 22
    h = height
    t0, t1 = start.timestamp(), max(end.timestamp(), start.timestamp() + 60)
    values = list(series.values) + [v for v, _ in thresholds]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    pad = max((hi - lo) * 0.08, 1.0)
    lo, hi = lo - pad, hi + pad
    step = _nice_step(hi - lo)
    lo, hi = math.floor(lo / step) * step, math.ceil(hi / step) * step

    def px(t: float) -> float:
        return x0 + (t - t0) / (t1 - t0) * w

    def py(v: float) -> float:
        return y0 + h - (v - lo) / (hi - lo) * h

    # Shaded alarm windows, under everything else.
    for begin, finish, _ in shade:
        a, b = max(begin.timestamp(), t0), min(finish.timestamp(), t1)
        if b > a:
            pdf.set_fill_color(*SHADE)
            pdf.rect(px(a), y0, max(px(b) - px(a), 0.4), h, style="F")
    # Grid and y labels.
    pdf.set_line_width(0.15)
    pdf.font(6.5)
    pdf.set_text_color(*MUTED)
    tick = lo
    while tick <= hi + step / 2:
        pdf.set_draw_color(*GRID)
        pdf.line(x0, py(tick), x0 + w, py(tick))
        pdf.set_xy(x0 - 13, py(tick) - 1.6)
        pdf.cell(12, 3.2, f"{tick:g}", align="R")
        tick += step
    pdf.set_xy(x0 - 13, y0 - 4.5)
    pdf.cell(20, 3.2, pdf.text_of(unit))
    # x ticks: a step that gives 4 to 8 labels.
    span = timedelta(seconds=t1 - t0)
    every = next((s for s in _TICKS if span / s <= 8), _TICKS[-1])
    first = datetime.fromtimestamp(
        math.ceil(t0 / every.total_seconds()) * every.total_seconds(), UTC
    )
    mark = first
    label = "%H:%M" if every < timedelta(hours=24) else "%m-%d"
    while mark.timestamp() <= t1:
        x = px(mark.timestamp())
        pdf.set_draw_color(*GRID)
        pdf.line(x, y0, x, y0 + h)
        text = mark.strftime("%m-%d %H:%M" if mark.hour == 0 and mark.minute == 0 else label)
        pdf.set_xy(x - 10, y0 + h + 0.8)
        pdf.cell(20, 3.2, text, align="C")
        mark += every
    pdf.set_xy(x0 + w - 20, y0 + h + 4)
    pdf.cell(20, 3.2, "UTC", align="R")
    # Limit lines, dashed, coloured by severity, labelled at the right.
    pdf.set_line_width(0.35)
    for value, severity in thresholds:
        pdf.set_draw_color(*SEVERITY_COLOUR[severity])
        pdf.set_dash_pattern(dash=1.6, gap=1.0)
        pdf.line(x0, py(value), x0 + w, py(value))
        pdf.set_dash_pattern()
        pdf.set_text_color(*SEVERITY_COLOUR[severity])
        pdf.set_xy(x0 + w + 0.8, py(value) - 1.6)
        pdf.cell(22, 3.2, pdf.text_of(f"{value:g} {severity}"))
    # The series, broken where no reading came for longer than the signal-lost threshold.
    pdf.set_draw_color(*line)
    pdf.set_line_width(0.3)
    points: list[tuple[float, float]] = []
    previous: float | None = None
    for ts, v in zip(series.ts, series.values, strict=True):
        t = ts.timestamp()
        if previous is not None and t - previous > gap_s and len(points) > 1:
            pdf.polyline(points)
            points = []
        elif previous is not None and t - previous > gap_s:
            points = []
        points.append((px(t), py(v)))
        previous = t
    if len(points) > 1:
        pdf.polyline(points)
    elif len(points) == 1:
        pdf.set_fill_color(*line)
        pdf.circle(points[0][0], points[0][1], 0.6, style="F")
    # Frame.
    pdf.set_draw_color(*MUTED)
    pdf.set_line_width(0.2)
    pdf.rect(x0, y0, w, h)
    pdf.set_text_color(*INK)
    pdf.set_y(y0 + h + 9)


def _thresholds(limits: Sequence[LimitSummary], metric: str) -> list[tuple[float, Severity]]:
    """The distinct thresholds of one quantity's limits (both bounds of a range), each at its
    highest severity."""
    found: dict[float, Severity] = {}
    for lim in limits:
        if lim.metric == metric:
            for value in (lim.threshold, lim.low):
                if value is None:
                    continue
                known = found.get(value)
                if known is None or lim.severity.rank > known.rank:
                    found[value] = lim.severity
    return sorted(found.items())


def _alarm_rows(alarms: Sequence[ReportAlarm]) -> list[list[str]]:
    rows = []
    for entry in alarms:
        a = entry.alarm
        ack = "—"
        if a.acknowledged_at is not None:
            ack = f"{when(a.acknowledged_at)} by {a.acknowledged_by}: {a.ack_comment or ''}"
        closed = "—"
        if a.closed_at is not None:
            by = a.closed_by or "the service"
            closed = f"{when(a.closed_at)} by {by}: {a.close_comment or ''}"
        reminders = max((c.escalation_level for c in entry.changes), default=0)
        what = a.message + (f" (escalated to tier {reminders})" if reminders else "")
        rows.append(
            [
                f"{a.id}",
                a.severity,
                f"{a.rule}\n{what}",
                when(a.started_at),
                when(a.cleared_at),
                ack,
                closed,
                a.state,
            ]
        )
    return rows


def render(report: Report) -> bytes:
    """The report as PDF bytes."""
    pdf = _Document(report)
    pdf.add_page()
    pdf.font(15, bold=True)
    pdf.set_text_color(*INK)
    pdf.cell(
        0,
        8,
        pdf.text_of(f"Excursion report: shipment {report.shipment_id}"),
        new_x=XPos.LMARGIN,
        new_y=YPos.NEXT,
    )
    pdf.para(
        f"Generated {when(report.generated_at)} for {report.generated_by}. Times are UTC. "
        "Computer-generated from the readings as stored; readings are never edited.",
        7.5,
        MUTED,
    )
    pdf.ln(2)
    _verdict_box(pdf, report)
    pdf.ln(2)
    _facts(pdf, report)

    t = report.temperature
    pdf.heading("Temperature")
    parts = [
        f"min {t.min_c:.1f} °C, max {t.max_c:.1f} °C, mean {t.mean_c:.1f} °C"
        if t.min_c is not None and t.max_c is not None and t.mean_c is not None
        else "no readings",
        "in range "
        + (
            f"{t.in_range_pct:.1f} % of monitored time ({duration_text(t.in_range_s)})"
            if t.in_range_pct is not None
            else "—"
        ),
    ]
    if t.mkt_c is not None:
        parts.append(f"mean kinetic temperature {t.mkt_c:.2f} °C (ΔH/R = 10,000 K)")
    pdf.para("; ".join(parts) + ".")
    temp_alarm_rules = {lim.rule for lim in report.temperature_limits}
    shade = [
        (a.alarm.started_at, a.alarm.cleared_at or report.period_end, Severity(a.alarm.severity))
        for a in report.alarms
        if a.alarm.rule in temp_alarm_rules
    ]
    gap = report.signal_lost_after_s
    _chart(
        pdf,
        report.temperature_series,
        report.period_start,
        report.period_end,
        unit="°C",
        line=TEMP_LINE,
        thresholds=_thresholds(report.limits, "temp_c"),
        shade=shade,
        gap_s=gap,
    )
    pdf.para(
        "Shaded: temperature alarms from their start to their clearing. Dashed: the profile's "
        "temperature limits. Breaks in the line: no reading for longer than the signal-lost "
        "threshold.",
        7,
        MUTED,
    )

    pdf.heading("Limits")
    rows, colours = [], []
    for lim in report.limits:
        rows.append(
            [
                lim.rule,
                str(lim.severity),
                lim.condition,
                duration_text(lim.beyond_s) if lim.beyond_s else "never",
                duration_text(lim.longest_s) if lim.stretches else "—",
                str(lim.stretches),
                "—" if lim.worst is None else f"{lim.worst:g}",
                str(lim.alarms),
            ]
        )
        colours.append(SEVERITY_COLOUR[lim.severity] if lim.beyond_s > 0 else None)
    pdf.grid(
        ["Rule", "Severity", "Limit", "Time beyond", "Longest", "Stretches", "Worst", "Alarms"],
        rows,
        (40, 16, 36, 20, 18, 17, 21, 14),
        colours,
    )
    pdf.para(
        "Time beyond counts every stretch past the threshold, before any delay; an alarm is "
        "raised only once the limit's delay (or budget) has passed.",
        7,
        MUTED,
    )

    pdf.heading("LN2 and handling")
    hd = report.handling
    facts = []
    if report.ln2 is not None:
        facts.append(
            f"LN2 {report.ln2.start_pct:.0f} % at the start, {report.ln2.end_pct:.0f} % at the "
            f"end, lowest {report.ln2.min_pct:.0f} %"
        )
    facts.append("largest tilt " + ("—" if hd.max_tilt_deg is None else f"{hd.max_tilt_deg:.0f}°"))
    facts.append("largest shock " + ("—" if hd.max_shock_g is None else f"{hd.max_shock_g:.1f} g"))
    facts.append(
        f"lid open {hd.lid_openings} time(s), {duration_text(hd.lid_open_s)} in all"
        if hd.lid_openings
        else "lid never open"
    )
    pdf.para("; ".join(facts) + ".")
    if report.ln2_series.values:
        _chart(
            pdf,
            report.ln2_series,
            report.period_start,
            report.period_end,
            unit="LN2 %",
            line=LN2_LINE,
            thresholds=_thresholds(report.limits, "ln2_level_pct"),
            gap_s=gap,
            height=40,
        )

    pdf.heading(f"Alarms ({len(report.alarms)})")
    if report.alarms:
        pdf.grid(
            [
                "#",
                "Severity",
                "Rule and message",
                "Started",
                "Cleared",
                "Acknowledged",
                "Closed",
                "State",
            ],
            _alarm_rows(report.alarms),
            (9, 15, 42, 20, 20, 30, 30, 16),
            [SEVERITY_COLOUR[Severity(a.alarm.severity)] for a in report.alarms],
        )
    else:
        pdf.para("No alarm was raised.")

    pdf.heading(f"Custody ({len(report.custody)} events)")
    if report.custody:
        pdf.grid(
            ["At", "Event", "Location", "By", "Note"],
            [
                [
                    when(e.at),
                    str(e.type).replace("_", " "),
                    e.location or "—",
                    e.actor,
                    e.note or "",
                ]
                for e in report.custody
            ],
            (28, 22, 34, 34, 64),
        )
    else:
        pdf.para("No custody event was recorded.")
    return bytes(pdf.output())
