"""The study file of ``refconv-study`` (docs/design.md section 5, docs/usage.md): schema, loading, and one-line
errors for everything that can be checked before a run starts."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from ..errors import RefconvError
from .cost import cost_keys
from .links import check_links

BUDGET = "{budget}"  # placeholder in overrides: the stage-2 epoch budget; {budget*N+M}: N times it plus M
BUDGET_EXPR = re.compile(r"\{budget(?:\*([1-9][0-9]*))?(?:\+([0-9]+))?\}")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")  # variant and family names are folder names
TOP_KEYS = ("name", "config", "overrides", "baseline", "output", "seeds", "splits", "budget", "select", "variants",
            "controls", "goal", "evaluate", "cost")
# --quick: every run one epoch of a few small steps; its numbers only show that the pipeline works.
QUICK_OVERRIDES = ("data.batch_size=16", "data.img_size=32", "train.max_steps_per_epoch=4", "train.stop_after_epoch=1")
# ... and with ``evaluate: deployed`` one whole epoch (no warmup): a run writes its deployed fused.pth when it ends.
QUICK_DEPLOYED = ("optim.warmup_epochs=0", "optim.epochs=1")


@dataclass(frozen=True)
class Variant:
    """One arm of the comparison: ``overrides`` on top of the stage-2 config; with ``family`` it trains at the lr
    that the selection chose for that family."""

    name: str
    what: str
    overrides: tuple[str, ...]
    family: str | None = None
    start: str | None = None  # model.pretrained = that variant's last.pth of the same seed (chain.py)
    reference: str | None = None  # the variant its paired difference is taken against (cost_report.py)


@dataclass(frozen=True)
class Family:
    """A selection family: one candidate per lr of the grid (named ``<family>_lr<lr>``), the winner by final
    top-1 on the selection split."""

    name: str
    what: str
    lrs: tuple[float, ...]
    overrides: tuple[str, ...]

    def candidates(self) -> list[Variant]:
        return [Variant(f"{self.name}_lr{lr}", f"{self.what}, lr {lr}", (*self.overrides, f"optim.lr={lr}"))
                for lr in self.lrs]


@dataclass(frozen=True)
class Baseline:
    """Stage 1: trained once (seed 0) on the selection split; its last.pth starts every stage-2 run."""

    config: str
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Study:
    path: Path
    name: str
    config: str
    output: Path
    overrides: tuple[str, ...] = ()
    baseline: Baseline | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    select_split: str = "holdout"
    report_split: str = "val"
    budget: int | None = None
    families: tuple[Family, ...] = ()
    variants: tuple[Variant, ...] = ()
    controls: tuple[str, ...] = ()
    goal: float | None = None  # top-1 points over the stronger control, with the 95% interval above zero
    evaluate: str = "training"  # training: the last epoch's top-1; deployed: refconv-eval of the deployed file
    cost_ratios: str | None = None  # scripts/benchmark.py --methods --json output (cost.py)
    cost_unit: str | None = None  # the variant whose epoch is the unit of training cost
    select_seed: int = 0
    quick: bool = False
    notes: dict[str, Any] = field(default_factory=dict)

    def family(self, name: str) -> Family:
        return next(f for f in self.families if f.name == name)

    def with_options(self, *, seeds: list[int] | None = None, quick: bool = False, out: str | None = None,
                     overrides: list[str] | None = None) -> Study:
        """The study as run: ``--seeds``, ``--quick`` (budget 1, tiny steps, into ``<output>_quick``), ``--out``,
        and command-line overrides of every run (after the file's own, e.g. ``data.root=/data/mine``)."""
        s = self
        if overrides:
            s = replace(s, overrides=(*s.overrides, *_strings(s.path, "command-line overrides", list(overrides))))
        if seeds:
            if any(x < 0 for x in seeds):
                raise RefconvError(f"--seeds must be non-negative integers, got {seeds}")
            s = replace(s, seeds=tuple(dict.fromkeys(seeds)))
        if quick:
            s = replace(s, quick=True, budget=1, output=Path(f"{s.output}_quick"))
        if out:
            s = replace(s, output=Path(out))
        return s

    def expand(self, overrides: tuple[str, ...] | list[str]) -> list[str]:
        """``overrides`` with ``{budget}`` replaced."""
        return [BUDGET_EXPR.sub(lambda m: str(int(m.group(1) or 1) * self.budget + int(m.group(2) or 0)), o)
                for o in overrides]


def _err(path: Path, where: str, text: str) -> RefconvError:
    return RefconvError(f"study file '{path}': {where}{': ' if where else ''}{text}")


def _keys(path: Path, where: str, data: Any, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict:
    if not isinstance(data, dict):
        raise _err(path, where, f"expected a mapping with keys {', '.join(allowed)}, got {type(data).__name__}")
    unknown = [k for k in data if k not in allowed]
    if unknown:
        raise _err(path, where, f"unknown key '{unknown[0]}' (valid: {', '.join(allowed)})")
    missing = [k for k in required if data.get(k) in (None, "")]
    if missing:
        raise _err(path, where, f"'{missing[0]}' is required")
    return data


def _strings(path: Path, where: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _err(path, where, f"expected a list of 'section.key=value' strings, got {value!r}")
    for v in value:
        unknown = {p for p in re.findall(r"\{[^}]*\}", v) if not BUDGET_EXPR.fullmatch(p)}
        if unknown:
            raise _err(path, where, f"unknown placeholder {sorted(unknown)[0]} in {v!r} (the only one is "
                       f"{BUDGET}, also as {{budget*N}}, {{budget+M}}, {{budget*N+M}})")
    return tuple(value)


def _name(path: Path, where: str, value: Any) -> str:
    if not isinstance(value, str) or not NAME.match(value):
        raise _err(path, where, f"name {value!r} must be letters, digits, '_', '.', '+', '-' (it names a folder)")
    return value


def _config_path(path: Path, where: str, value: Any) -> str:
    """A config path as written when it exists from the current folder, else relative to the study file."""
    if not isinstance(value, str) or not value:
        raise _err(path, where, f"expected a config file path, got {value!r}")
    if Path(value).is_file():
        return value
    beside = path.parent / value
    if not Path(value).is_absolute() and beside.is_file():
        return os.path.relpath(beside)
    raise _err(path, where, f"config file '{value}' not found (looked in the current folder and beside the study file)")


def _lr_override(overrides: tuple[str, ...]) -> bool:
    return any(o.split("=", 1)[0].strip() == "optim.lr" for o in overrides)


def load_study(path: str | os.PathLike) -> Study:
    """Read and check a study file; every error is one line naming the file and the key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RefconvError(f"study file '{path}' not found") from None
    except OSError as e:
        raise RefconvError(f"study file '{path}' cannot be read: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise RefconvError(f"study file '{path}'{line}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    d = _keys(path, "", data, TOP_KEYS, ("config", "output", "variants"))

    baseline = None
    if d.get("baseline") is not None:
        b = _keys(path, "baseline", d["baseline"], ("config", "overrides"), ("config",))
        baseline = Baseline(_config_path(path, "baseline.config", b["config"]),
                            _strings(path, "baseline.overrides", b.get("overrides")))

    seeds = d.get("seeds", [0, 1, 2])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise _err(path, "seeds", f"expected a list of non-negative integers, got {seeds!r}")
    splits = _keys(path, "splits", d.get("splits") or {}, ("select", "report"))
    for k, v in splits.items():
        if not isinstance(v, str) or not v:
            raise _err(path, f"splits.{k}", f"expected a split folder name (data.val_split), got {v!r}")
    if families_wanted := d.get("select"):
        if splits.get("select", "holdout") == splits.get("report", "val"):
            raise _err(path, "splits", f"select and report are both '{splits.get('report', 'val')}': settings "
                       f"chosen on the reported split are tuned on it ({len(families_wanted)} selection families)")
    budget = d.get("budget")
    if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 1):
        raise _err(path, "budget", f"expected a positive number of epochs, got {budget!r}")

    if not isinstance(d.get("select") or {}, dict):
        raise _err(path, "select", "expected a mapping of family name -> {what, lr, overrides}")
    families = []
    for fname, f in (d.get("select") or {}).items():
        where = f"select.{fname}"
        _name(path, where, fname)
        f = _keys(path, where, f, ("what", "lr", "overrides"), ("lr",))
        lrs = f["lr"] if isinstance(f["lr"], list) else [f["lr"]]
        if not lrs or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in lrs):
            raise _err(path, f"{where}.lr", f"expected a list of positive learning rates, got {f['lr']!r}")
        overrides = _strings(path, f"{where}.overrides", f.get("overrides"))
        if _lr_override(overrides):
            raise _err(path, f"{where}.overrides", "sets optim.lr: the family's lr comes from its 'lr' grid")
        families.append(Family(fname, str(f.get("what") or fname), tuple(float(x) for x in lrs), overrides))

    raw = d["variants"]
    if not isinstance(raw, list) or not raw:
        raise _err(path, "variants", "expected a non-empty list of {name, what, overrides, family}")
    variants: list[Variant] = []
    for i, v in enumerate(raw):
        v = _keys(path, f"variants[{i}]", v, ("name", "what", "overrides", "family", "start", "reference"), ("name",))
        name = _name(path, f"variants[{i}].name", v["name"])
        where = f"variant '{name}'"
        if any(x.name == name for x in variants):
            raise _err(path, where, "duplicate variant name")
        overrides = _strings(path, f"{where} overrides", v.get("overrides"))
        family = v.get("family")
        if family is not None:
            if family not in {f.name for f in families}:
                known = ", ".join(f.name for f in families) or "none: the study file has no 'select'"
                raise _err(path, where, f"family '{family}' is not a selection family (families: {known})")
            if _lr_override(overrides):
                raise _err(path, where, f"sets optim.lr and names family '{family}': the family's choice sets the lr")
        variants.append(Variant(name, str(v.get("what") or name), overrides, family, v.get("start"),
                                v.get("reference")))
    check_links(path, variants)

    controls = d.get("controls") or []
    if not isinstance(controls, list) or not all(isinstance(c, str) for c in controls):
        raise _err(path, "controls", f"expected a list of variant names, got {controls!r}")
    for c in controls:
        if c not in {v.name for v in variants}:
            raise _err(path, "controls", f"'{c}' is not a variant (variants: {', '.join(v.name for v in variants)})")
    if len(set(controls)) != len(controls):
        raise _err(path, "controls", "a control is named twice")
    goal = d.get("goal")
    numeric = isinstance(goal, (int, float)) and not isinstance(goal, bool)
    if goal is not None and not (numeric and 0 <= goal < math.inf):  # YAML's .nan and .inf are floats too
        raise _err(path, "goal", f"expected the top-1 points to gain over the stronger control (>= 0), got {goal!r}")
    if goal is not None and not controls:
        raise _err(path, "goal", "is measured against the stronger control, but the study file names no 'controls'")

    study = Study(path=path, name=str(d.get("name") or path.name.removesuffix(".yaml").removesuffix(".study")),
                  config=_config_path(path, "config", d["config"]), output=Path(str(d["output"])),
                  overrides=_strings(path, "overrides", d.get("overrides")), baseline=baseline,
                  seeds=tuple(dict.fromkeys(seeds)), select_split=splits.get("select", "holdout"),
                  report_split=splits.get("report", "val"), budget=budget, families=tuple(families),
                  variants=tuple(variants), controls=tuple(controls),
                  goal=None if goal is None else float(goal), **cost_keys(path, d, variants))
    if budget is None:
        every = [("overrides", study.overrides)] + [(f"variant '{v.name}'", v.overrides) for v in variants] + \
                [(f"select.{f.name}", f.overrides) for f in families]
        for where, overrides in every:
            if any(BUDGET_EXPR.search(o) for o in overrides):
                raise _err(path, where, f"uses {BUDGET} but the study file sets no 'budget'")
    return study
