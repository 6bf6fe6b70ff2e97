"""Human-readable tables of FadingControl replies (``recserve fade status`` / ``audit``)."""

from __future__ import annotations

import math
import time

from serving.fading.schedule import format_duration


def _f(x: float, spec: str = ".4f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at)) + "Z" if at else "-"


def format_status(features) -> str:
    """``features``: FeatureFadeStatus messages."""
    if not features:
        return "no faded features"
    lines = []
    for s in features:
        steps = " -> ".join(f"{x.coverage:g}" for x in s.steps)
        where = f"step {s.step}/{len(s.steps) - 1} [{steps}]" if s.steps else "no schedule"
        soak = f", soak left {format_duration(round(s.soak_left_seconds))}" if s.status == "running" else ""
        lines.append(
            f"{s.model}/{s.feature}: coverage {s.coverage:g} {s.status.upper()} {where}{soak}"
            f"; safe {s.safe_coverage:g}; control {s.control_fraction:g}"
            + ("; RECLAIMABLE" if s.reclaimable else "")
        )
        if s.reason:
            lines.append(f"    last change {_when(s.updated_at)}: {s.reason}")
        t = s.thresholds
        lines.append(
            f"    guardrails: |ratio-1| <= {t.max_mean_shift:g}, psi <= {t.max_psi:g}, "
            f"latency ratio <= {t.max_latency_ratio:g}, after {t.min_examples} examples per cohort"
        )
        for g in s.guardrails:
            lines.append(
                f"    {g.replica} @{_when(g.at)}: n control/kept/faded {g.control_examples}/{g.kept_examples}/"
                f"{g.faded_examples}  mean {_f(g.mean_control)}/{_f(g.mean_kept)}/{_f(g.mean_faded)}  "
                f"ratio {_f(g.ratio)}  psi {_f(g.psi)}  latency ratio {_f(g.latency_ratio, '.3f')}  "
                f"lookups skipped {g.lookups_skipped:,}"
                + (f" ({g.lookups_skipped / g.seconds:,.0f}/s)" if g.seconds > 0 else "")
            )
    return "\n".join(lines)


def format_audit(entries) -> str:
    """``entries``: AuditEntry messages."""
    if not entries:
        return "audit log is empty"
    lines = [f"{'id':>5} {'when (UTC)':<20} {'who':<24} {'what':<13} {'feature':<28} from -> to   reason"]
    for e in entries:
        frm = "-" if not e.from_status else f"{e.from_coverage:g} {e.from_status}"
        lines.append(
            f"{e.id:>5} {_when(e.at):<20} {e.actor[:24]:<24} {e.action:<13} {(e.model + '/' + e.feature)[:28]:<28} "
            f"{frm} -> {e.to_coverage:g} {e.to_status}   {e.reason}"
        )
    return "\n".join(lines)

