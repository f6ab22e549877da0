"""The package installs into a user's own PyTorch: its metadata declares version ranges, never pins."""

from __future__ import annotations

import configparser
import importlib.metadata
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The oldest releases the whole test suite was run against (README: known to work).
LOWER_BOUNDS = {"torch": "2.9", "torchvision": "0.24"}


def requirements(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines:
        if "extra ==" in line or not line.strip():
            continue
        name = re.split(r"[<>=!~ ;\[]", line.strip(), maxsplit=1)[0].lower()
        out[name] = line.strip()
    return out


def test_installed_metadata_and_setup_cfg_declare_ranges_for_torch_and_torchvision():
    installed = requirements(importlib.metadata.requires("refconv-train") or [])
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    declared = requirements(cfg["options"]["install_requires"].splitlines())
    for reqs in (installed, declared):
        for name, lower in LOWER_BOUNDS.items():
            spec = reqs[name].replace(" ", "")
            assert "==" not in spec and f">={lower}" in spec, spec
        assert not any("==" in spec for spec in reqs.values()), reqs


def test_a_reader_that_leaves_early_ends_the_command_quietly():
    """`refconv-study ... --dry-run | head`: a closed stdout is exit status 141 (as SIGPIPE in a shell), no trace."""
    import subprocess
    import sys

    code = ("import sys; from refconv_train.cli.common import run_cli\n"
            "sys.exit(run_cli(lambda: [print('x' * 99) for _ in range(100_000)] and None))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(100)
    proc.stdout.close()  # the reader leaves; 10 MB do not fit in the pipe
    assert proc.wait(timeout=60) == 141 and proc.stderr.read() == b""
