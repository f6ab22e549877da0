"""Configs written before the top-level ``method`` key (issue 27): two keys chose the method, ``refocus.enabled``
(RefConv) and ``reparam.method`` (the paper's comparison methods). A user's config with them is a one-line error that
names the new key; a config stored in an old checkpoint is translated here, in this one place, so old checkpoints
fuse, evaluate and resume."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import RefconvError

LEGACY_SECTIONS = ("refocus", "reparam")
# reparam.* option -> (methods that read it, its key in their section)
_REPARAM_OPTIONS = {"exclude": (("acb", "repvgg", "dbb", "orepa", "wn", "cwn", "own"), "exclude"),
                    "branch_scale": (("acb", "repvgg", "dbb", "orepa"), "branch_scale"),
                    "own_group": (("own",), "group")}


def legacy_error(key: str) -> RefconvError:
    """The one line for an old key: what replaced it."""
    section = key.split(".", 1)[0]
    if key == "refocus.enabled":
        return RefconvError("config key 'refocus.enabled' is gone: choose the method with the top-level key "
                            "'method' (method: refconv, the default, or method: none for plain training)")
    if key == "reparam.method":
        return RefconvError("config key 'reparam.method' is gone: use the top-level key 'method' (e.g. method: dbb; "
                            "on the command line method=dbb)")
    if section == "refocus":
        new = f"refconv.{key.split('.', 1)[1]}" if "." in key else "refconv"
        return RefconvError(f"config key '{key}' is gone: RefConv's options are the section 'refconv' ({new}), and "
                            f"the method is the top-level key 'method'")
    return RefconvError(f"config key '{key}' is gone: choose the method with the top-level key 'method' and set its "
                        f"options in the section of its name (e.g. method: dbb, dbb: {{branch_scale: 1}}; on the "
                        f"command line method=dbb dbb.branch_scale=1)")


def translate_legacy(data: Mapping[str, Any]) -> dict[str, Any]:
    """A stored config dict with ``refocus`` / ``reparam`` sections as the same config with ``method`` and the
    method's own section; any other dict is returned as it is."""
    out = dict(data)
    if not any(s in out for s in LEGACY_SECTIONS):
        return out
    refocus = dict(out.pop("refocus", None) or {})
    reparam = dict(out.pop("reparam", None) or {})
    if refocus.pop("enabled", True):
        out.setdefault("method", "refconv")
        out.setdefault("refconv", refocus)
        return out
    method = str(reparam.pop("method", "none"))
    out.setdefault("method", method)
    section = {new: reparam[old] for old, (readers, new) in _REPARAM_OPTIONS.items()
               if old in reparam and method in readers}
    if section:
        out.setdefault(method, section)
    return out
