"""Routing: which pipelines a complete series goes to, decided by the configured rules.

Every rule whose conditions all hold contributes its pipelines (in rule order, without repeats). A series that
matches no rule is ignored with a reason, or forwarded when ``unmatched: forward`` is configured. A series of a
SOP class the standard does not know (a modality's private objects, or classes newer than pydicom; the receiver
stores them when ``node.accept_unknown_sop_classes``) matches only rules that name its SOP class: image
pipelines never see objects they cannot read.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from pydicom.uid import UID

from dicomnode.config import Config, RuleMatch
from dicomnode.state.jobs import Route
from dicomnode.state.store import SeriesRow

UNMATCHED_FORWARD = "forward-unmatched"  # the implicit pipeline used by ``unmatched: forward``


def _any_equal(wanted: tuple[str, ...], value: str) -> bool:
    return not wanted or value.strip().upper() in {w.strip().upper() for w in wanted}


def known_sop_class(uid: str) -> bool:
    """Whether ``uid`` is a SOP class of the standard (as far as pydicom's registry knows)."""
    return UID(uid).type == "SOP Class"


def mismatch(match: RuleMatch, series: SeriesRow) -> str | None:
    """The first condition of ``match`` that ``series`` fails, as text; None when every condition holds."""
    checks: list[tuple[bool, str]] = [
        (bool(match.sop_class_uid) or known_sop_class(series.sop_class_uid),
         f"SOP class {series.sop_class_uid} is not one of the standard's (only a rule naming it matches)"),
        (_any_equal(match.modality, series.modality), f"Modality {series.modality!r}"),
        (_any_equal(match.body_part, series.body_part), f"BodyPartExamined {series.body_part!r}"),
        (_any_equal(match.sop_class_uid, series.sop_class_uid), f"SOP class {series.sop_class_uid}"),
        (_any_equal(match.calling_aet, series.calling_aet), f"calling AE {series.calling_aet!r}"),
        (match.series_description is None
         or re.search(match.series_description, series.description, re.IGNORECASE) is not None,
         f"SeriesDescription {series.description!r}"),
        (all(t.strip().upper() in {v.strip().upper() for v in series.image_type.split("\\")}
             for t in match.image_type), f"ImageType {series.image_type!r}"),
        (match.min_instances is None or series.n_instances >= match.min_instances,
         f"{series.n_instances} instances < {match.min_instances}"),
        (match.max_instances is None or series.n_instances <= match.max_instances,
         f"{series.n_instances} instances > {match.max_instances}"),
    ]
    for ok, what in checks:
        if not ok:
            return what
    return None


def make_router(cfg: Config) -> Callable[[SeriesRow], Route]:
    """A router function over the configuration's rules."""

    def route(series: SeriesRow) -> Route:
        pipelines: list[str] = []
        matched: list[str] = []
        for rule in cfg.rules:
            if mismatch(rule.match, series) is None:
                matched.append(rule.name)
                pipelines.extend(p for p in rule.pipelines if p not in pipelines)
        if pipelines:
            return Route(tuple(pipelines), f"rule(s) {', '.join(matched)} -> {', '.join(pipelines)}")
        why = "; ".join(f"{r.name}: {mismatch(r.match, series)}" for r in cfg.rules) or "no rules configured"
        if cfg.unmatched == "forward" and cfg.destinations:
            return Route((UNMATCHED_FORWARD,), f"matched no rule ({why}); forwarded (unmatched: forward)")
        return Route((), f"matched no rule ({why})")

    return route
