"""Which refconv-train runs a study makes: every run's config file, overrides and folder
(OUT/baseline, OUT/select/seed<S>/<candidate>, OUT/report/seed<S>/<variant>), and their resolved configs."""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import config_to_dict, load_config
from ..errors import RefconvError
from .links import in_order, start_override
from .spec import QUICK_DEPLOYED, QUICK_OVERRIDES, Study, Variant


@dataclass(frozen=True)
class Run:
    phase: str  # baseline | select | report
    variant: str
    what: str
    seed: int
    config: str
    overrides: tuple[str, ...]  # all but train.output
    folder: Path

    @property
    def args(self) -> list[str]:
        return ["--config", self.config, *self.overrides, f"train.output={self.folder}"]

    def command(self) -> list[str]:
        return [*train_executable(), *self.args]

    def resolved(self) -> dict[str, Any]:
        """The config refconv-train will run, as a flat ``{section.key: value}`` dict without ``train.output``."""
        return settings(config_to_dict(load_config(self.config, [*self.overrides, f"train.output={self.folder}"])))


def train_executable() -> list[str]:
    """``refconv-train`` beside this Python (a venv's bin/), else ``python -m refconv_train.cli.train``."""
    exe = Path(sys.executable).parent / "refconv-train"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "refconv_train.cli.train"]


def settings(config: dict[str, Any]) -> dict[str, Any]:
    """Flatten a config dict to ``section.key`` -> value (a top-level key such as ``method`` as it is), leaving out
    where the run writes (``train.output``)."""
    flat = {key: value for key, value in config.items() if not isinstance(value, dict)}
    flat.update({f"{section}.{key}": value for section, keys in config.items() if isinstance(keys, dict)
                 for key, value in keys.items()})
    flat.pop("train.output", None)
    return flat


def baseline_run(study: Study) -> Run | None:
    if study.baseline is None:
        return None
    quick = QUICK_OVERRIDES if study.quick else ()
    overrides = (*study.expand(study.overrides), *study.expand(study.baseline.overrides), *quick,
                 f"data.val_split={study.select_split}", "train.seed=0")
    return Run("baseline", "baseline", "stage 1: the start of every run", 0, study.baseline.config, overrides,
               study.output / "baseline")


def _stage2(study: Study, phase: str, v: Variant, seed: int, split: str, lr: str | None = None) -> Run:
    start = start_override(study, v, seed) or \
        ((f"model.pretrained={study.output / 'baseline' / 'last.pth'}",) if study.baseline else ())
    quick = (*QUICK_OVERRIDES, *(QUICK_DEPLOYED if study.evaluate == "deployed" else ())) if study.quick else ()
    family_lr = (f"optim.lr={lr}",) if lr is not None else ()
    overrides = (*study.expand(study.overrides), *start, *study.expand(v.overrides), *family_lr, *quick,
                 f"data.val_split={split}", f"train.seed={seed}")
    return Run(phase, v.name, v.what, seed, study.config, overrides, study.output / phase / f"seed{seed}" / v.name)


def select_runs(study: Study) -> list[Run]:
    return [_stage2(study, "select", c, study.select_seed, study.select_split)
            for f in study.families for c in f.candidates()]


def report_runs(study: Study, chosen: dict[str, float | str]) -> list[Run]:
    """Every variant x seed; a variant with a family trains at ``chosen[family]`` (a placeholder when unknown). With
    ``evaluate: deployed`` the runs validate on the selection split (the report split is refconv-eval's, deploy.py)
    and every start comes before the runs that need it."""
    split = study.select_split if study.evaluate == "deployed" else study.report_split
    runs = []
    for seed in study.seeds:
        for v in study.variants:
            lr = None if v.family is None else str(chosen.get(v.family, f"<lr chosen for {v.family}>"))
            runs.append(_stage2(study, "report", v, seed, split, lr))
    return in_order(runs, study)


def aliases(study: Study, runs: list[Run]) -> dict[str, str]:
    """Report variants whose runs would be identical to an earlier variant's (e.g. the best RefConv of the selection
    is the fixed RefConv recipe at the control's lr): ``{variant: earlier variant}``; they are run once."""
    first = {}
    out = {}
    seed = study.seeds[0]
    for r in runs:
        if r.seed != seed:
            continue
        key = repr(sorted(r.resolved().items()))
        if key in first:
            out[r.variant] = first[key]
        else:
            first[key] = r.variant
    return out


def check_configs(study: Study) -> None:
    """Resolve every run's config before anything trains (families at their first lr): a bad override is a
    one-line error naming the variant."""
    stand_in = {f.name: f.lrs[0] for f in study.families}
    runs = ([baseline_run(study)] if study.baseline else []) + select_runs(study) + \
        [r for r in report_runs(study, stand_in) if r.seed == study.seeds[0]]
    for r in runs:
        try:
            load_config(r.config, [*r.overrides, f"train.output={r.folder}"])
        except RefconvError as e:
            where = "the baseline" if r.phase == "baseline" else \
                f"selection candidate '{r.variant}'" if r.phase == "select" else f"variant '{r.variant}'"
            raise RefconvError(f"study file '{study.path}': {where}: {e}") from None


def format_command(run: Run) -> str:
    return shlex.join(run.command())
