"""refconv-study: does RefConv help on your data? A study file names a stage-2 config, variants, seeds, controls
and an optional selection phase; every variant x seed is a refconv-train run; results.md / .json / curves.png hold
the table (docs/usage.md, docs/design.md section 5)."""

from .pipeline import run_study
from .spec import Study, Variant, load_study
from .stats import paired_difference, t_quantile

__all__ = ["Study", "Variant", "load_study", "paired_difference", "run_study", "t_quantile"]
