"""What a study's arms cost to train, in epochs of a plain one-stage run (the ``cost.unit`` variant): from the
step-time ratios of ``scripts/benchmark.py --methods --json`` (one process, alternating timed blocks: other work on
the machine hits every method alike) and, beside them, from the runs' own recorded training seconds (summary.csv's
``epoch_s``; noisy on a shared machine). A second stage costs its start's training too."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any

from .. import methods
from ..errors import RefconvError

EVALUATE = ("training", "deployed")


def cost_keys(path: Path, d: dict, variants: list) -> dict[str, Any]:
    """The study file's ``evaluate`` and ``cost`` (``ratios``: a benchmark JSON, ``unit``: a variant) keys."""
    evaluate = d.get("evaluate") or "training"
    if evaluate not in EVALUATE:
        raise RefconvError(f"study file '{path}': evaluate: expected one of {', '.join(EVALUATE)}, got {evaluate!r}")
    cost = d.get("cost") or {}
    if not isinstance(cost, dict) or set(cost) - {"ratios", "unit"}:
        raise RefconvError(f"study file '{path}': cost: expected a mapping with keys ratios, unit, got {cost!r}")
    unit, ratios = cost.get("unit"), cost.get("ratios")
    if unit is not None and unit not in {v.name for v in variants}:
        raise RefconvError(f"study file '{path}': cost.unit: '{unit}' is not a variant")
    if unit is not None and any(v.name == unit and (v.start or v.family) for v in variants):
        raise RefconvError(f"study file '{path}': cost.unit: '{unit}' must be a one-stage variant without a family")
    if ratios is not None and (not isinstance(ratios, str) or not ratios):
        raise RefconvError(f"study file '{path}': cost.ratios: expected a JSON file path, got {ratios!r}")
    if ratios is not None and not Path(ratios).is_file() and not Path(ratios).is_absolute():
        ratios = os.path.relpath(path.parent / ratios)  # beside the study file; may be written after the runs
    if (unit or ratios) and evaluate != "deployed":
        raise RefconvError(f"study file '{path}': cost: the cost report needs 'evaluate: deployed'")
    if evaluate == "deployed" and (d.get("controls") or d.get("goal") is not None):
        raise RefconvError(f"study file '{path}': {'controls' if d.get('controls') else 'goal'}: an 'evaluate: "
                           f"deployed' study pairs each variant with its own 'reference' instead")
    if evaluate != "deployed" and (v := next((v for v in variants if v.reference), None)):
        raise RefconvError(f"study file '{path}': variant '{v.name}': reference: needs 'evaluate: deployed' (the "
                           f"other studies pair every variant with the 'controls')")
    if evaluate == "deployed" and unit is None:
        raise RefconvError(f"study file '{path}': evaluate: deployed: needs cost.unit (the plain one-stage variant)")
    return {"evaluate": evaluate, "cost_ratios": ratios, "cost_unit": unit}


def method_of(resolved: dict[str, Any]) -> str:
    """The benchmark's name for what a run trains (``Method.bench``: ``baseline``, ``refocus_per_step`` for RefConv
    with W_t once per step as refconv-train runs it, else the method's name)."""
    method = methods.get(str(resolved.get("method", "refconv")))
    return method.bench or method.name


def load_ratios(path: str) -> dict[str, dict[str, float | None]]:
    """``{method: {"time": step time / baseline, "memory": peak memory / baseline}}`` of a benchmark JSON."""
    try:
        data = json.loads(Path(path).read_text())
        rows = data["methods"]
        return {m: {"time": float(r["train_ratio"]), "memory": r.get("memory_ratio")} for m, r in rows.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise RefconvError(f"cost ratios '{path}' are not the JSON of scripts/benchmark.py --methods --json "
                           f"({type(e).__name__}: {e})") from None


def train_seconds(folder: Path) -> float | None:
    """Training seconds of a run: the sum of summary.csv's ``epoch_s`` (evaluation not included)."""
    from .metrics import read_curve

    _, seconds = read_curve(folder)
    return sum(seconds) if seconds else None


def done_record(folder: Path) -> dict:
    try:
        return json.loads((folder / "DONE").read_text())
    except (OSError, ValueError):
        return {}


def variant_cost(stages: list[tuple[str, int]], ratios: dict | None) -> float | None:
    """Benchmark cost in unit epochs: sum over the stages of epochs x the method's step-time ratio."""
    if ratios is None or any(m not in ratios for m, _ in stages):
        return None
    return sum(epochs * ratios[m]["time"] for m, epochs in stages)


def _mean(xs: list[float]) -> float | None:
    return statistics.mean(xs) if xs else None


def measured_cost(chains: dict[int, list[Path]], unit_folders: list[Path]) -> dict[str, float | None]:
    """From the runs themselves, mean over seeds: training seconds of the whole chain, wall seconds (DONE), peak
    memory (max over the chain's processes), and the chain's seconds in unit epochs (the unit variant's mean
    ``epoch_s``)."""
    from .metrics import read_curve

    unit_epochs = [s for f in unit_folders for s in read_curve(f)[1]]
    unit = statistics.mean(unit_epochs) if unit_epochs else None
    train, wall, peak = [], [], []
    for folders in chains.values():
        secs = [train_seconds(f) for f in folders]
        if all(s is not None for s in secs):
            train.append(sum(secs))
        walls = [done_record(f).get("seconds") for f in folders]
        if all(isinstance(w, (int, float)) for w in walls):
            wall.append(sum(walls))
        peaks = [done_record(f).get("peak_rss_mb") for f in folders]
        if peaks and all(isinstance(p, (int, float)) for p in peaks):
            peak.append(max(peaks))
    train_s = _mean(train)
    return {"train_s": train_s, "wall_s": _mean(wall), "peak_mb": _mean(peak), "unit_epoch_s": unit,
            "epochs": None if train_s is None or not unit else train_s / unit}
