"""Test-only fault injection, read from the environment, so that recovery paths are exercised for real.

``REFCONV_FAULT=<kind>@<global step>[:rank]`` with kind ``crash`` (raise), ``kill`` (SIGKILL itself, after that
step's checkpoint), ``sigterm`` (send itself SIGTERM) or ``nan`` (the model's first output of that step becomes NaN,
through a forward hook: the training loop knows nothing of it). Under torchrun it fires only in the first attempt
(``TORCHELASTIC_RESTART_COUNT`` 0), so an elastic restart can succeed.
"""

from __future__ import annotations

import math
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .errors import RefconvError

KINDS = ("crash", "kill", "sigterm", "nan")


@dataclass(frozen=True)
class Fault:
    kind: str = ""
    step: int = -1
    rank: int = 0

    @classmethod
    def from_env(cls, rank: int) -> Fault:
        spec = os.environ.get("REFCONV_FAULT", "")
        if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
            return cls()
        kind, _, where = spec.partition("@")
        step, _, fault_rank = where.partition(":")
        if kind not in KINDS or not step.isdigit():
            raise RefconvError(f"REFCONV_FAULT={spec!r} is malformed: use <{'|'.join(KINDS)}>@<step>[:rank]")
        fault = cls(kind, int(step), int(fault_rank or 0))
        return fault if fault.rank == rank else cls()

    def install(self, model: nn.Module, steps_done: Callable[[], int]) -> None:
        """A ``nan`` fault: poison the first forward of optimizer step ``self.step`` (1-based), once."""
        if self.kind != "nan":
            return
        fired = []

        def hook(module, args, output):
            if not fired and module.training and steps_done() + 1 == self.step:
                fired.append(True)  # once: a skipped step is retried with the next batch
                return output * math.nan
            return output

        model.register_forward_hook(hook)

    def fire(self, global_step: int) -> None:
        """Called after each optimizer step (and its checkpoint, if one was due)."""
        if global_step != self.step:
            return
        if self.kind == "crash":
            raise RuntimeError(f"injected crash at global step {global_step} (REFCONV_FAULT)")
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
