"""How a study's variants refer to each other: ``start`` (a second stage: ``model.pretrained`` is that variant's
``last.pth`` of the same seed, so every seed has its own first stage) and ``reference`` (the variant its paired
difference is taken against); and the run order that trains every start before the runs that need it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import RefconvError

if TYPE_CHECKING:
    from .plan import Run
    from .spec import Study, Variant


def _err(path: Path, where: str, text: str) -> RefconvError:
    return RefconvError(f"study file '{path}': {where}: {text}")


def check_links(path: Path, variants: list[Variant]) -> None:
    """``start`` and ``reference`` name other variants; a start is a one-stage variant without a selection family
    (its lr would only be known after the selection, and the start must exist before)."""
    by_name = {v.name: v for v in variants}
    for v in variants:
        where = f"variant '{v.name}'"
        for key in ("start", "reference"):
            other = getattr(v, key)
            if other is None:
                continue
            if not isinstance(other, str) or other not in by_name or other == v.name:
                known = ", ".join(n for n in by_name if n != v.name)
                raise _err(path, where, f"{key} {other!r} is not another variant (variants: {known})")
        if v.start is None:
            continue
        if v.family is not None:
            raise _err(path, where, f"has a start ('{v.start}') and a selection family ('{v.family}'): the "
                       f"selection runs from the study's own start, not from another variant's runs")
        start = by_name[v.start]
        if start.start is not None or start.family is not None:
            why = f"starts from '{start.start}'" if start.start else f"has selection family '{start.family}'"
            raise _err(path, where, f"start '{v.start}' {why}: a start must be a one-stage variant")
        if any(o.split("=", 1)[0].strip() == "model.pretrained" for o in v.overrides):
            raise _err(path, where, f"sets model.pretrained and has a start ('{v.start}'): the start sets it")


def start_override(study: Study, v: Variant, seed: int) -> tuple[str, ...]:
    """``model.pretrained=`` the start variant's last.pth of ``seed`` (nothing without a start)."""
    if v.start is None:
        return ()
    return (f"model.pretrained={study.output / 'report' / f'seed{seed}' / v.start / 'last.pth'}",)


def chain(study: Study, name: str) -> list[str]:
    """The variants whose training a variant's model went through, first stage first: ``[start, name]`` or
    ``[name]``."""
    v = next(x for x in study.variants if x.name == name)
    return [v.start, name] if v.start else [name]


def in_order(runs: list[Run], study: Study) -> list[Run]:
    """Every start before the runs that start from it (stable otherwise): the one-stage runs of every seed first."""
    second = {v.name for v in study.variants if v.start}
    return [r for r in runs if r.variant not in second] + [r for r in runs if r.variant in second]


def start_of(run: Run, runs: list[Run], study: Study) -> Run | None:
    """The run that ``run`` starts from (same seed), if any."""
    v = next(x for x in study.variants if x.name == run.variant)
    if v.start is None:
        return None
    return next((r for r in runs if r.variant == v.start and r.seed == run.seed), None)
