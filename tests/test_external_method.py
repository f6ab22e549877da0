"""A method defined here, outside the package, registered on import, runs through every CLI: refconv-train (config
key ``plugins:`` imports this module), refconv-fuse (verified, strict reload), refconv-eval, refconv-study --quick
(child processes) and refconv-analyze landscape. Also: the registry's one-line errors and its entry points."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import timm
import torch
import yaml
from cli_helpers import assert_one_line_error, call
from conftest import TINY_MODEL, one_thread, tiny_train_args
from torch import nn
from torch.nn.utils import parametrize

import refconv_train
from refconv_train import methods
from refconv_train.cli import analyze as analyze_cli
from refconv_train.cli import eval as eval_cli
from refconv_train.cli import fuse as fuse_cli
from refconv_train.cli import study as study_cli
from refconv_train.cli import train as train_cli
from refconv_train.config import load_config
from refconv_train.errors import RefconvError
from refconv_train.methods.modules import bake_weight, compile_patterns
from refconv_train.methods.protocol import ReparamReport, layer_info

PLUGIN = Path(__file__).stem  # this module: what a config's `plugins:` names


# ----------------------------------------------------------------------------------------------- the user's method
class FilterScale(nn.Module):
    """W = s * V, one learnable scale per output filter, starting at ``init`` (1: the exact start)."""

    def __init__(self, out_channels: int, init: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((out_channels, 1, 1, 1), float(init)))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.scale


@dataclass
class FilterScaleOptions:
    exclude: list[str] = field(default_factory=list)
    init: float = 1.0


def _scaled_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {n: m for n, m in model.named_modules() if parametrize.is_parametrized(m, "weight")
            and any(isinstance(p, FilterScale) for p in m.parametrizations.weight)}


def _apply(model: nn.Module, options: FilterScaleOptions, example=None, fresh: bool = True) -> ReparamReport:
    patterns = compile_patterns(options.exclude, "filterscale")
    report = ReparamReport("filterscale")
    for name, conv in list(model.named_modules()):
        if not isinstance(conv, nn.Conv2d) or parametrize.is_parametrized(conv, "weight"):
            continue
        if any(p.search(name) for p in patterns):
            report.skipped.append((name, "excluded"))
            continue
        parametrize.register_parametrization(conv, "weight", FilterScale(conv.out_channels, options.init))
        report.layers.append(layer_info(name, conv, conv.out_channels))
    if not report.layers:
        raise RefconvError("filterscale found no convolution to change")
    report.start_max_abs_diff = 0.0 if options.init == 1.0 else None
    return report


def _fuse(model: nn.Module) -> list[str]:
    names = list(_scaled_convs(model))
    for conv in _scaled_convs(model).values():
        bake_weight(conv)
    return names


METHOD = methods.register(methods.Method("filterscale", apply=_apply, fuse=_fuse, convs=_scaled_convs,
                                         options=FilterScaleOptions, title="FilterScale"))


# ----------------------------------------------------------------------------------------------- the Python API
def test_the_user_s_method_applies_and_fuses_through_the_package_s_one_entry():
    torch.manual_seed(0)
    model = timm.create_model(TINY_MODEL, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    report = refconv_train.apply_method(model, "filterscale", init=1.0)
    assert isinstance(report, ReparamReport) and report.layers and refconv_train.held_methods(model) == ["filterscale"]
    with torch.no_grad():
        next(iter(_scaled_convs(model).values())).parametrizations.weight[0].scale.mul_(1.5)
        trained = model(x)
    assert refconv_train.fuse_model(model) and not refconv_train.held_methods(model)
    fresh = timm.create_model(TINY_MODEL, num_classes=3).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert torch.allclose(fresh(x), trained, atol=1e-5) and not torch.allclose(trained, before, atol=1e-3)


def test_registry_errors_are_one_line_and_name_the_way_out():
    with pytest.raises(RefconvError, match=r"unknown method 'nope': use one of none, refconv, .*filterscale"):
        methods.get("nope")
    with pytest.raises(RefconvError, match=r"method 'filterscale' has no option 'scale'; its options: exclude, init"):
        refconv_train.apply_method(nn.Conv2d(1, 1, 3), "filterscale", scale=2)
    with pytest.raises(RefconvError, match="already registered"):
        methods.register(dataclasses.replace(METHOD, apply=lambda *a, **k: None, fuse=lambda m: []))


def test_a_refconv_train_methods_entry_point_registers_its_method(monkeypatch):
    from refconv_train.methods import registry

    class EntryPoint:
        name, value = "viaep", "user_pkg:method"

        def load(self):
            return dataclasses.replace(METHOD, name="viaep")

    groups = []
    monkeypatch.setattr(registry, "entry_points", lambda group: groups.append(group) or [EntryPoint()])
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    try:
        assert methods.get("viaep").apply is METHOD.apply and groups == ["refconv_train.methods"]
    finally:
        registry._REGISTRY.pop("viaep", None)


def test_plugins_on_the_command_line_come_before_the_file_s_sections(tmp_path):
    (tmp_path / "c.yaml").write_text("method: filterscale\nfilterscale:\n  init: 2.0\n")
    cfg = load_config(tmp_path / "c.yaml", [f"plugins=[{PLUGIN}]", "model.pretrained=false"])
    assert (cfg.method, cfg.method_options.init, cfg.plugins) == ("filterscale", 2.0, [PLUGIN])


def test_a_config_naming_a_module_that_cannot_be_imported_is_one_line(tiny_runs, tmp_path):
    args = tiny_train_args(tiny_runs.data, tmp_path / "out", "plugins=[no_such_module_xyz]", "method=filterscale")
    assert_one_line_error(*call(train_cli.main, args)[::2], r"plugins: cannot import 'no_such_module_xyz'")


# ----------------------------------------------------------------------------------------------- every CLI
@pytest.fixture(scope="module")
def user_run(tiny_runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("filterscale")
    args = tiny_train_args(tiny_runs.data, out, f"model.pretrained={tiny_runs.baseline / 'best.pth'}",
                           f"plugins=[{PLUGIN}]", "method=filterscale", "filterscale.init=1.0", "optim.epochs=1")
    with one_thread():
        rc, _, err = call(train_cli.main, args)
    assert rc == 0, err[-3000:]
    return out


def test_the_user_s_method_trains_fuses_exactly_and_evaluates(tiny_runs, user_run, tmp_path):
    report = json.loads((user_run / "reparam_report.json").read_text())
    assert report["method"] == "filterscale" and report["changed"] > 0 and report["start_max_abs_diff"] == 0.0
    assert torch.load(user_run / "last.pth", weights_only=True)["method"] == "filterscale"
    assert yaml.safe_load((user_run / "config.yaml").read_text())["plugins"] == [PLUGIN]
    with one_thread():
        rc, out, err = call(fuse_cli.main, [user_run / "last.pth", "-o", tmp_path / "fused.pth"])
    assert rc == 0, err[-3000:]
    fused = torch.load(tmp_path / "fused.pth", weights_only=True)
    assert fused["max_abs_diff"] <= 1e-4 * fused["output_scale"]
    timm.create_model(TINY_MODEL, num_classes=tiny_runs.classes).load_state_dict(fused["state_dict"], strict=True)
    for ckpt in (user_run / "last.pth", tmp_path / "fused.pth"):
        with one_thread():
            rc, out, err = call(eval_cli.main, ["--data", tiny_runs.data, "--checkpoint", ckpt, "--device", "cpu",
                                                 "--workers", 0])
        assert rc == 0 and out.strip().splitlines()[-1].startswith("top1="), err[-3000:]


def test_the_user_s_method_runs_in_the_loss_landscape(tiny_runs, user_run, tmp_path):
    argv = ["landscape", user_run / "last.pth", "--data", tiny_runs.data, "--out", tmp_path, "--images", 6,
            "--grid", 3, "--span", 0.5, "--directions", 2, "--radii", 0.1, "--hessian-iters", 0, "--batch-size", 6]
    with one_thread():
        rc, _, err = call(analyze_cli.main, argv)
    assert rc == 0, err[-3000:]
    assert json.loads((tmp_path / "landscape.json").read_text())["checkpoints"][0]["kind"] == "filterscale"


def test_the_user_s_method_runs_in_a_quick_study(tiny_runs, tmp_path, monkeypatch):
    # The study's runs are child processes: they import this module by name, from its folder.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent),
                                                      *filter(None, [os.environ.get("PYTHONPATH")])]))
    stage2 = {"plugins": [PLUGIN], "method": "filterscale",
              "model": {"name": TINY_MODEL, "num_classes": tiny_runs.classes,
                        "pretrained": str(tiny_runs.baseline / "best.pth")},
              "data": {"root": str(tiny_runs.data), "img_size": 32, "batch_size": 8, "workers": 0},
              "optim": {"lr": 0.01, "warmup_epochs": 0, "epochs": 1}, "train": {"device": "cpu"}}
    (tmp_path / "stage2.yaml").write_text(yaml.safe_dump(stage2))
    study = {"config": str(tmp_path / "stage2.yaml"), "output": str(tmp_path / "out"), "seeds": [0],
             "variants": [{"name": "filterscale", "what": "the user's method", "overrides": ["filterscale.init=1.0"]},
                          {"name": "finetune", "what": "fine-tuning", "overrides": ["method=none"]}],
             "controls": ["finetune"]}
    (tmp_path / "s.study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    rc, _, err = call(study_cli.main, [tmp_path / "s.study.yaml", "--quick"])
    assert rc == 0, err[-3000:]
    results = json.loads((tmp_path / "out_quick" / "report" / "results.json").read_text())
    assert results["variants"]["filterscale"]["n"] == 1
    assert (tmp_path / "out_quick" / "report" / "seed0" / "filterscale" / "fused.pth").is_file()
