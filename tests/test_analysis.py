"""refconv-analyze: the math of the paper's diagnostics against direct computations, and the command end to end."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cli_helpers import assert_one_line_error
from cli_helpers import call as call_cli
from PIL import Image

from refconv_train.analysis import kernels as analysis
from refconv_train.checkpoint import atomic_save
from refconv_train.cli import analyze as analyze_cli
from refconv_train.methods.refconv import fuse_state_dict

CLASSES = 4


def call(argv: list) -> tuple[int, str, str]:
    return call_cli(analyze_cli.main, argv)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-step RefConv training run (W_r kaiming-initialised, so every matrix is non-trivial)."""
    from refconv_train.cli import train
    from refconv_train.demo_data import make_demo_data

    root = tmp_path_factory.mktemp("analysis")
    data = make_demo_data(root / "data", num_classes=CLASSES, train_per_class=4, val_per_class=2, size=32)
    args = ["model.name=mobilenetv2_050", f"model.num_classes={CLASSES}", "model.pretrained=false",
            f"data.root={data}", "data.img_size=32", "data.batch_size=8", "data.workers=0", "optim.epochs=1",
            "optim.warmup_epochs=0", "train.device=cpu", "train.max_steps_per_epoch=1", "train.resume=false",
            "refconv.init=kaiming", "refconv.base_init=random", f"train.output={root / 'run'}"]
    assert train.main(args) == 0
    return root / "run" / "last.pth"


def state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


# ----------------------------------------------------------------------------------------------- math
def test_connection_degree_equals_loops_depthwise_and_grouped():
    torch.manual_seed(0)
    w_r = torch.randn(6, 6, 3, 3)  # depthwise, C = 6: every kernel channel sees every other one
    got = analysis.connection_degree(w_r)
    for i in range(6):
        for j in range(6):
            assert got[i, j] == pytest.approx(float(sum(abs(w_r[i, j, a, b]) for a in range(3) for b in range(3))))
    assert torch.equal(analysis.connection_degree(w_r, channels=4), got[:4, :4])

    w_r = torch.randn(8, 2, 3, 3)  # group conv, g = 2: block diagonal, kernel i mixes 2*(i//2) and 2*(i//2)+1
    got = analysis.connection_degree(w_r)
    for i in range(8):
        for j in range(8):
            expect = float(w_r[i, j - 2 * (i // 2)].abs().sum()) if j // 2 == i // 2 else 0.0
            assert got[i, j] == pytest.approx(expect)
    assert torch.equal(analysis.connection_degree(w_r, channels=3), got[:3, :3])


def test_kernel_kl_matrix_equals_torch_kl_div():
    torch.manual_seed(0)
    weight = torch.randn(5, 2, 3, 3)  # 10 kernel channels (docs/design.md section 1 numbering: j = o * 2 + i)
    got = analysis.kernel_kl_matrix(weight, channels=7)
    assert got.shape == (7, 7)
    kernels = weight.reshape(10, 9).double()
    for i in range(7):
        for j in range(7):
            p_i = torch.softmax(kernels[i], 0)
            expect = F.kl_div(torch.log_softmax(kernels[j], 0), p_i, reduction="sum")  # KL(p_i || p_j)
            assert got[i, j].item() == pytest.approx(expect.item(), abs=1e-12)
    off = [got[i, j].item() for i in range(7) for j in range(7) if i != j]
    assert analysis.mean_off_diagonal(got) == pytest.approx(sum(off) / len(off))
    assert analysis.kernel_kl_matrix(weight, channels=None).shape == (10, 10)


def test_kind_matches_conv_kind():
    from refconv_train.methods.refconv import conv_kind, refocus_shape

    for conv in (torch.nn.Conv2d(8, 8, 3, groups=8), torch.nn.Conv2d(8, 16, 3, groups=4), torch.nn.Conv2d(4, 8, 3)):
        w_r = torch.zeros(refocus_shape(conv.weight.shape, conv.groups, 3))
        assert analysis.refocus_kind(conv.weight, w_r) == conv_kind(conv)


def test_default_layers_spread_over_depthwise():
    w = {f"dw{i}": analysis.RefocusedWeights(f"dw{i}", torch.zeros(4, 1, 3, 3), torch.zeros(4, 4, 3, 3))
         for i in range(7)}
    dense = {"stem": analysis.RefocusedWeights("stem", torch.zeros(4, 3, 3, 3), torch.zeros(12, 1, 3, 3))}
    assert analysis.default_layers({**dense, **w}) == ["dw0", "dw3", "dw6"]
    assert analysis.default_layers(dense) == ["stem"]


# ----------------------------------------------------------------------------------------------- the checkpoint
def test_analysis_values_match_direct_computation(ckpt: Path):
    sd = state(ckpt)
    weights = analysis.load_refocused_weights(ckpt)
    layers = analysis.default_layers(weights)
    assert len(layers) == 3 and all(weights[n].kind == "depthwise" for n in layers)
    result = analysis.analyze(weights, layers, channels=8)
    fused = fuse_state_dict(sd)

    name = layers[1]
    w_b = sd[name + ".parametrizations.weight.original"]
    w_r = sd[name + ".parametrizations.weight.0.refocus_weight"]
    figs = result.layers[name]
    for i in range(8):
        for j in range(8):
            assert figs.connection[i, j].item() == pytest.approx(w_r[i, j].abs().sum().item(), rel=1e-6)
    w_t = fused[name + ".weight"]
    for matrix, w in ((figs.kl_base, w_b), (figs.kl_refocused, w_t)):
        k = w.reshape(-1, 9).double()
        for i in range(8):
            for j in range(8):
                expect = F.kl_div(torch.log_softmax(k[j], 0), torch.softmax(k[i], 0), reduction="sum").item()
                assert matrix[i, j].item() == pytest.approx(expect, rel=1e-4, abs=1e-7)

    assert [s.layer for s in result.stats] == list(weights)
    for s in result.stats:
        b = sd[s.layer + ".parametrizations.weight.original"].double()
        ratio = (fused[s.layer + ".weight"].double() - b).norm() / b.norm()
        assert s.rel_change == pytest.approx(ratio.item(), rel=1e-5)
        assert s.refocus_params == sd[s.layer + ".parametrizations.weight.0.refocus_weight"].numel()
        assert s.rel_change > 0


def test_cli_writes_valid_pngs_csv_and_tensorboard(ckpt: Path, tmp_path: Path):
    out = tmp_path / "figs"
    rc, stdout, err = call([ckpt, "--out", out, "--channels", "16", "--tensorboard"])
    assert rc == 0, err
    weights = analysis.load_refocused_weights(ckpt)
    layers = analysis.default_layers(weights)
    pngs = [out / f"{kind}_{name}.png" for name in layers for kind in ("connection", "redundancy")]
    for path in [*pngs, out / "summary.png"]:
        assert path.is_file(), stdout
        with Image.open(path) as img:
            img.verify()
            assert img.format == "PNG"
        assert path.stat().st_size < 200_000
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["layer"] for r in rows] == list(weights)
    assert set(rows[0]) == set(analysis.STATS_FIELDS)
    assert {r["kind"] for r in rows} <= {"depthwise", "group", "dense"}
    assert all(int(r["kl_channels"]) <= 16 for r in rows)
    assert list((out / "tb").glob("events.out.tfevents.*"))


def test_cli_layer_choice_and_errors(ckpt: Path, tmp_path: Path):
    name = next(iter(analysis.load_refocused_weights(ckpt)))  # the stem: a dense layer, block-diagonal matrix
    rc, _, err = call([ckpt, "--out", tmp_path, "--layers", name, "--channels", "8"])
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(
        [f"connection_{name}.png", f"redundancy_{name}.png", "summary.png"])

    line = assert_one_line_error(*call([ckpt, "--out", tmp_path, "--layers", name + "x"])[::2])
    assert f"did you mean '{name}'" in line
    baseline = tmp_path / "baseline.pth"  # the same checkpoint with W_t folded in: a baseline training checkpoint
    obj = torch.load(ckpt, map_location="cpu", weights_only=True)
    atomic_save({**obj, "model": fuse_state_dict(obj["model"])}, baseline)
    line = assert_one_line_error(*call([baseline, "--out", tmp_path / "b"])[::2])
    assert "is not a RefConv training checkpoint" in line
    assert_one_line_error(*call([tmp_path / "missing.pth", "--out", tmp_path / "m"])[::2])


def test_missing_matplotlib_is_a_one_line_error(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    line = assert_one_line_error(*call([ckpt, "--out", tmp_path])[::2])
    assert line == "error: matplotlib is needed: pip install .[analysis]"
