"""The words of a run summary that both the terminal table
(:func:`fl_privsim.app.cli.format_table`) and the HTML report (:mod:`fl_privsim.app.report`)
print: why an attack scored nothing, and the DP guarantees of the run. One place, so the two
always say the same."""

from __future__ import annotations

from typing import Any


def outcome_notes(row: dict[str, Any]) -> list[str]:
    """``refused: <reason>`` / ``failed: <reason>`` / ``skipped: <reason>`` (the targeted client
    failed) for an attack's summary row (the first distinct reason, and how many others); the
    kind alone when the summary has counts but no ``<kind>_reasons``."""
    notes = []
    for kind in ("refused", "failed", "skipped"):
        if not int(row.get(kind, 0)):
            continue
        reasons = list(dict.fromkeys(str(r) for r in row.get(f"{kind}_reasons") or []))
        if not reasons:
            notes.append(f"{kind} ({int(row[kind])}x, no reason recorded)")
            continue
        more = f" (+{len(reasons) - 1} more in summary.json)" if len(reasons) > 1 else ""
        notes.append(f"{kind}: {reasons[0]}{more}")
    return notes


def _delta(value: Any) -> str:
    return "?" if value is None else f"{float(value):g}"


def dp_lines(summary: dict[str, Any]) -> list[str]:
    """One line per DP guarantee of the run: client DP (``epsilon``, the largest over clients)
    and central DP (``central_dp``), each with its δ and whether the ε is a proven bound."""
    lines = []
    if summary.get("epsilon") is not None:
        why = summary.get("epsilon_not_formal_because") or []
        if summary.get("epsilon_formal"):
            status = "formal: Poisson-sampled batches, clipping bound fixed in advance"
        else:
            status = "not formal" + (": " + "; ".join(why) if why else "")
        lines.append(
            f"client DP: ε = {summary['epsilon']:.3f} at δ = {_delta(summary.get('epsilon_delta'))} "
            f"(largest over clients; {status})"
        )
    report = summary.get("central_dp")
    if report:
        why = report.get("not_formal_because") or []
        eps = report.get("epsilon", summary.get("central_epsilon"))
        head = f"central DP ({report.get('mode', '?')}):"
        if eps is None:  # a release without noise: no guarantee at all
            lines.append(
                f"{head} ε = ∞, no DP guarantee for the released models "
                f"({'; '.join(why[:1]) or 'a round was released without noise'})"
            )
            return lines
        if report.get("formal"):
            status = (
                f"formal: {report.get('releases', 0)} Gaussian releases of sensitivity C/m composed by RDP, "
                + (
                    "no amplification by sampling"
                    if not report.get("amplification", True)
                    else "every client in every round"
                )
            )
        else:
            status = "not formal" + (": " + "; ".join(why) if why else "")
        lines.append(
            f"{head} ε = {eps:.3f} at δ = {_delta(report.get('delta'))} for the released models ({status})"
        )
    return lines
