"""Test-only fault injection, read from the environment, so that recovery paths are exercised for real.

``REFCONV_FAULT=<kind>@<global step>[:rank]`` with kind ``crash`` (raise), ``kill`` (SIGKILL itself, after that
step's checkpoint), ``sigterm`` (send itself SIGTERM) or ``nan`` (the loss of that step becomes NaN). Under torchrun
it fires only in the first attempt (``TORCHELASTIC_RESTART_COUNT`` 0), so an elastic restart can succeed.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

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

    @property
    def nan_step(self) -> int:
        return self.step if self.kind == "nan" else -1

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
