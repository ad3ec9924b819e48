"""Plain-text tables for the demo: the traffic sent and the findings asyncsentinel reported."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence

from asyncsentinel.demo.traffic import Outcome
from asyncsentinel.findings import DB_CONFIGURATION_ADVICE, KINDS, Finding
from asyncsentinel.frames import Location

OUTSIDE_REQUEST = "(outside a request)"
"""The route column of findings that belong to no request (start-up, shutdown, timers)."""

FINDINGS_HEADERS = ("KIND", "ROUTE", "COUNT", "CULPRIT")


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], right: Iterable[int] = ()) -> str:
    """Columns separated by two spaces; the columns numbered in *right* are right-aligned."""
    body = [list(r) for r in rows]
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *body, strict=False)]
    align_right = set(right)

    def line(cells: Sequence[str]) -> str:
        out = [
            c.rjust(w) if i in align_right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  " + "  ".join(out).rstrip()

    return "\n".join([line(headers), *(line(r) for r in body)])


def culprit_text(location: Location | None) -> str:
    """``file:line in function``, the file relative to the working directory when inside it."""
    if location is None:
        return "-"
    filename = location.filename
    try:
        relative = os.path.relpath(filename)
    except ValueError:  # another drive (Windows)
        relative = filename
    if not relative.startswith(os.pardir + os.sep):
        filename = relative
    return f"{filename}:{location.lineno} in {location.function}"


def route_text(finding: Finding) -> str:
    """``METHOD /route/template`` of the finding's request, or :data:`OUTSIDE_REQUEST`."""
    if not finding.http_route:
        return OUTSIDE_REQUEST
    return f"{finding.http_method} {finding.http_route}".strip()


def findings_rows(findings: Iterable[Finding]) -> list[tuple[str, str, str, str]]:
    """One row per (kind, route, culprit) with its count, kinds in the order of
    :data:`~asyncsentinel.findings.KINDS`."""
    counts = Counter((f.kind, route_text(f), culprit_text(f.culprit)) for f in findings)
    rank = {kind: i for i, kind in enumerate(KINDS)}
    ordered = sorted(counts, key=lambda k: (rank.get(k[0], len(rank)), k[0], k[1], k[2]))
    return [
        (kind, route, str(counts[kind, route, culprit]), culprit)
        for kind, route, culprit in ordered
    ]


def render_findings(findings: Sequence[Finding], title: str) -> str:
    """The findings report: a title line, the table, and the kinds not seen."""
    kinds = {f.kind for f in findings}
    lines = [f"{title}: {len(findings)} findings of {len(kinds)} kinds", ""]
    if findings:
        lines.append(table(FINDINGS_HEADERS, findings_rows(findings), right=(2,)))
    else:
        lines.append("  (none)")
    return "\n".join(lines)


def render_traffic(outcomes: Sequence[Outcome]) -> str:
    """What was sent to each route and what it answered."""
    rows = []
    for outcome in outcomes:
        answered = ", ".join(
            f"{status} x{count}" for status, count in sorted(outcome.statuses.items())
        )
        kind = "healthy" if outcome.step.healthy else "misbehaving"
        rows.append((outcome.step.label, kind, str(outcome.step.count), answered))
    return table(("ROUTE", "ROLE", "REQUESTS", "ANSWERS"), rows, right=(2,))


def unseen_kinds(findings: Iterable[Finding]) -> list[str]:
    """Kinds the shop is built to trigger that no finding of this run has (advice excluded)."""
    seen = {f.kind for f in findings}
    return [k for k in KINDS if k != DB_CONFIGURATION_ADVICE and k not in seen]
