"""refconv-analyze landscape (the paper's Fig. 8): filter-normalized directions, the loss surface, the radius rises and
the Hessian's top eigenvalue against exact references, and the command end to end on a one-step RefConv run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cli_helpers import assert_one_line_error, call
from conftest import one_thread
from PIL import Image
from torch import nn

from refconv_train import data as data_lib
from refconv_train.analysis import landscape as ls
from refconv_train.analysis.landscape_run import LandscapeSettings, load_batches, measure
from refconv_train.checkpoint import atomic_save, fused_checkpoint
from refconv_train.cli import analyze as analyze_cli
from refconv_train.cli import eval as eval_cli
from refconv_train.engine import StepSettings, evaluate
from refconv_train.models import build_model
from refconv_train.run.restore import restore_any

CLASSES = 3
ARCH = "mobilenetv3_small_050"  # has hardsigmoid (no double backward in PyTorch): the Hessian's special case


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@dataclass(frozen=True)
class Tiny:
    data: Path
    refocus: Path  # a RefConv training checkpoint (one step, W_r kaiming: W_t differs from W_b)
    fused: Path  # the run's fused.pth (verified like refconv-fuse's): the original architecture


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    from refconv_train.cli import train
    from refconv_train.demo_data import make_demo_data

    root = tmp_path_factory.mktemp("landscape")
    data = make_demo_data(root / "data", num_classes=CLASSES, train_per_class=4, val_per_class=1, size=32)
    args = [f"model.name={ARCH}", f"model.num_classes={CLASSES}", "model.pretrained=false", f"data.root={data}",
            "data.img_size=32", "data.batch_size=8", "data.workers=0", "optim.epochs=1", "optim.warmup_epochs=0",
            "train.device=cpu", "train.max_steps_per_epoch=1", "train.resume=false", "refconv.init=kaiming",
            "refconv.base_init=random",
            f"train.output={root / 'run'}"]
    assert train.main(args) == 0
    return Tiny(data, root / "run" / "last.pth", root / "run" / "fused.pth")  # the run fuses at its end


CLI_ARGS = ["--images", 8, "--grid", 5, "--span", 0.5, "--directions", 3, "--radii", 0.1, 0.3,
            "--hessian-images", 6, "--hessian-iters", 4, "--batch-size", 5]  # batches of 5 + 3; Hessian on 5 + 1


@pytest.fixture(scope="module")
def cli_run(tiny: Tiny, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path]:
    out = tmp_path_factory.mktemp("landscape_out")
    rc, stdout, err = call(analyze_cli.main, ["landscape", tiny.refocus, tiny.fused, "--data", tiny.data,
                                              "--out", out, *CLI_ARGS])
    assert rc == 0, err
    return json.loads((out / "landscape.json").read_text()), stdout, out


# ----------------------------------------------------------------------------------------------- small nets
def conv_bn_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3, bias=False),
                        nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))
    for bn in (net[1], net[4]):  # non-trivial eval-mode statistics
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def random_batches(count: int = 2, size: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 3, 8, 8, generator=g), torch.randint(0, 4, (size,), generator=g))
            for _ in range(count)]


def small_settings(**kw) -> LandscapeSettings:
    return LandscapeSettings(**{"grid": 3, "span": 0.5, "directions": 3, "radii": (0.2, 0.5), "hessian_iters": 3,
                                "hessian_images": 100, **kw})


# ----------------------------------------------------------------------------------------------- directions
def test_directions_are_seeded_and_filter_normalized():
    net = conv_bn_net()
    params = ls.model_params(net)
    dirs = ls.random_directions(params, 2, seed=3)
    assert len(dirs) == 2
    for d in dirs:
        for name, p in params.items():
            if p.dim() > 1:  # every output filter has the norm of the model's filter
                torch.testing.assert_close(d[name].flatten(1).norm(dim=1), p.flatten(1).norm(dim=1))
            else:  # BN weight/bias, Linear bias
                assert torch.equal(d[name], torch.zeros_like(p)), name
    assert all(torch.equal(a, b) for a, b in zip(dirs[0].values(), ls.random_directions(params, 1, 3)[0].values()))
    other = ls.random_directions(params, 1, seed=4)[0]
    assert not torch.equal(dirs[0]["0.weight"], other["0.weight"])
    assert not torch.equal(dirs[0]["0.weight"], dirs[1]["0.weight"])


def test_filter_normalization_makes_the_numbers_invariant_to_rescaling_filters_ahead_of_batchnorm():
    net, batches = conv_bn_net(), random_batches()
    scaled = conv_bn_net()
    c = torch.tensor([0.1, 0.5, 2.0, 3.0, 7.0, 0.3])  # one factor per output filter of the first conv
    bn = scaled[1]
    with torch.no_grad():
        scaled[0].weight.mul_(c.view(-1, 1, 1, 1))
        bn.running_mean.mul_(c)
        bn.running_var.copy_(c**2 * bn.running_var + (c**2 - 1) * bn.eps)  # var + eps scales by c^2 exactly
    x = batches[0][0]
    torch.testing.assert_close(scaled(x), net(x), rtol=1e-5, atol=1e-5)  # the same function

    def numbers(model: nn.Module, normalize: bool) -> torch.Tensor:
        params = ls.model_params(model)
        g = torch.Generator().manual_seed(0)
        dirs = [ls.random_direction(params, g) for _ in range(3)]
        if normalize:
            dirs = [ls.filter_normalize(d, params) for d in dirs]
        terms = ls.dataset_terms(model, batches)
        loss0 = ls.loss_at(terms, params)
        return torch.cat([ls.radius_rises(terms, params, dirs, (0.2, 0.5), loss0).flatten(),
                          ls.loss_surface(terms, params, dirs[0], dirs[1], [-0.5, 0.0, 0.5]).flatten()])

    torch.testing.assert_close(numbers(scaled, True), numbers(net, True), rtol=1e-4, atol=1e-6)
    raw, raw_scaled = numbers(net, False), numbers(scaled, False)  # without it the scaled net looks different
    assert (raw - raw_scaled).abs().max() > 0.1 * raw.abs().max()


# ----------------------------------------------------------------------------------------------- known sharpness
def bowl(curvatures: torch.Tensor, seed: int = 0) -> tuple[ls.Params, torch.Tensor, list[ls.LossTerm]]:
    """``L(w) = 0.5 (w - w0)^T A (w - w0)``, ``A = Q diag(curvatures) Q^T``, ``w`` a 4 x 5 "weight" (20 values)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    a = q @ torch.diag(curvatures.double()) @ q.T
    w0 = torch.randn(4, 5, generator=g, dtype=torch.float64)

    def loss(params: ls.Params) -> torch.Tensor:
        x = (params["w"] - w0).flatten()
        return 0.5 * x @ a @ x

    return {"w": w0.clone()}, a, [(1.0, loss)]


def test_sharper_bowl_gets_larger_numbers_and_power_iteration_finds_its_top_eigenvalue():
    curv = torch.cat([torch.linspace(0.05, 0.5, 19), torch.tensor([2.0])])
    results = {}
    for name, k in (("flat", curv), ("sharp", curv * torch.tensor([1.0] * 19 + [3.0]))):  # one direction 3x sharper
        params, a, terms = bowl(k)
        dirs = ls.random_directions(params, 4, seed=0)
        rises = ls.radius_rises(terms, params, dirs, (0.1, 0.5), 0.0)
        for i, d in enumerate(dirs):  # exactly 0.5 r^2 d^T A d
            quad = float(d["w"].flatten() @ a @ d["w"].flatten())
            torch.testing.assert_close(rises[i], torch.tensor([0.005, 0.125], dtype=torch.float64) * quad)
        surface = ls.loss_surface(terms, params, dirs[0], dirs[1], [-1.0, 0.0, 1.0])
        v = (-1.0 * dirs[0]["w"] + 1.0 * dirs[1]["w"]).flatten()  # column 0: alpha = -1; row 2: beta = +1
        assert surface[1, 1] == 0.0 and surface[2, 0].item() == pytest.approx(float(0.5 * v @ a @ v))
        power = ls.top_hessian_eigenvalue(terms, params, iters=100, tol=1e-10)
        top = float(torch.linalg.eigvalsh(a)[-1])
        assert power.eigenvalue == pytest.approx(top, rel=1e-6) and power.converged
        assert power.history[-1] == power.eigenvalue and len(power.history) < 100
        results[name] = (rises.mean(0), power.eigenvalue)
    assert results["sharp"][1] == pytest.approx(3 * results["flat"][1], rel=1e-6)
    assert (results["sharp"][0] > results["flat"][0]).all()


class Gate(nn.Module):
    """hardsigmoid written with ops that have a second derivative: the reference net's stand-in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(x + 3) / 6


def test_hessian_vector_products_and_top_eigenvalue_match_the_full_hessian_of_a_network():
    def net(gate: nn.Module) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 3, 3, bias=False), nn.BatchNorm2d(3), gate, nn.Conv2d(3, 2, 1),
                             nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 4)).eval()

    model, reference = net(nn.Hardsigmoid()), net(Gate())  # the same function and weights
    batches = [(x * 2, y) for x, y in random_batches(2, 5)]
    params = ls.model_params(model)
    names, shapes = list(params), [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]
    x_all, y_all = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])

    def flat_loss(flat: torch.Tensor) -> torch.Tensor:
        p = {n: t.view(s) for n, t, s in zip(names, flat.split(sizes), shapes)}
        return F.cross_entropy(torch.func.functional_call(reference, p, (x_all,)), y_all)

    flat0 = torch.cat([p.flatten() for p in params.values()])
    hessian = torch.autograd.functional.hessian(flat_loss, flat0)
    terms = ls.dataset_terms(model, batches)
    v = torch.randn(flat0.numel(), generator=torch.Generator().manual_seed(5))
    hv = ls.hessian_vector_product(terms, params, {n: t.view(s) for n, t, s in zip(names, v.split(sizes), shapes)})
    torch.testing.assert_close(torch.cat([t.flatten() for t in hv.values()]), hessian @ v, rtol=1e-4, atol=1e-6)

    eig = torch.linalg.eigvalsh(hessian.double())
    top = eig[eig.abs().argmax()].item()
    power = ls.top_hessian_eigenvalue(terms, params, iters=300, tol=1e-8)
    assert power.eigenvalue == pytest.approx(top, rel=1e-3)


# ----------------------------------------------------------------------------------------------- measuring
def test_measuring_leaves_the_model_unchanged_and_is_deterministic_for_a_seed():
    net, batches = conv_bn_net(), random_batches()
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    first = measure(net, batches, small_settings())
    assert net.training
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics, bit for bit
    second = measure(net, batches, small_settings())
    for result in (first, second):
        result.pop("seconds")
    assert first == second
    other = measure(net, batches, small_settings(seed=1))
    assert other["loss0"] == first["loss0"] and other["surface"] != first["surface"]
    assert first["surface"][1][1] == first["loss0"] == first["curve_d1"][1] == first["curve_d2"][1]


def test_loss_at_zero_offset_equals_refconv_eval_on_the_same_images(tiny: Tiny, cli_run, tmp_path: Path):
    report, _, _ = cli_run
    restored = restore_any(tiny.fused)
    dataset = data_lib.build_dataset(tiny.data, "train", data_lib.build_transform(32, False))
    subset = torch.utils.data.Subset(dataset, report["subset_indices"])
    assert len(subset) == 8 < len(dataset)
    loader = torch.utils.data.DataLoader(subset, batch_size=3)  # refconv-eval's evaluate(), other batches
    expect = evaluate(restored.model, loader, StepSettings(torch.device("cpu")), show_progress=False).loss
    for entry in report["checkpoints"]:  # the RefConv checkpoint (fused first) and its fused one
        assert entry["loss0"] == pytest.approx(expect, rel=1e-5)

    rc, _, err = call(eval_cli.main, ["--data", tiny.data, "--checkpoint", tiny.fused, "--split", "train",
                                      "--workers", 0, "--device", "cpu", "--json", tmp_path / "eval.json"])
    assert rc == 0, err
    settings = LandscapeSettings(images=1000, batch_size=5, img_size=None)  # more than the split: all 12 images
    _, batches = load_batches(str(tiny.data), settings, CLASSES, (32, 0.875, data_lib.IMAGENET_MEAN,
                                                                   data_lib.IMAGENET_STD), torch.device("cpu"))
    with ls.evaluating(restored.model):
        loss = ls.loss_at(ls.dataset_terms(restored.model, batches), ls.model_params(restored.model))
    assert loss == pytest.approx(json.loads((tmp_path / "eval.json").read_text())["loss"], rel=1e-5)


# ----------------------------------------------------------------------------------------------- the command
def test_cli_measures_a_refconv_checkpoint_as_its_fused_model_and_writes_json_and_figures(cli_run):
    report, stdout, out = cli_run
    s = report["settings"]
    assert (s["images"], s["grid"], s["directions"], s["radii"], s["seed"]) == (8, 5, 3, [0.1, 0.3], 0)
    assert s["coords"] == [-0.5, -0.25, 0.0, 0.25, 0.5] and s["hessian_images"] == 6
    refocus, fused = report["checkpoints"]
    assert (refocus["kind"], fused["kind"], refocus["arch"]) == ("refocus", "fused", ARCH)
    for e in (refocus, fused):
        z = torch.tensor(e["surface"], dtype=torch.float64)
        assert z.shape == (5, 5) and torch.isfinite(z).all() and z[2, 2] == e["loss0"]
        assert e["curve_d1"] == z[2].tolist() and e["curve_d2"] == z[:, 2].tolist()
        rise = torch.tensor(e["radius"]["rise"], dtype=torch.float64)
        assert rise.shape == (3, 2)
        torch.testing.assert_close(torch.tensor(e["radius"]["rise_mean"], dtype=torch.float64), rise.mean(0))
        torch.testing.assert_close(torch.tensor(e["radius"]["rise_std"], dtype=torch.float64), rise.std(0))
        h = e["hessian"]
        assert 1 <= h["iterations"] == len(h["history"]) <= 4 and h["top_eigenvalue"] == h["history"][-1]
    # The same weights in the same weight space, the same directions: the same landscape.
    torch.testing.assert_close(torch.tensor(refocus["surface"]), torch.tensor(fused["surface"]), rtol=1e-4, atol=1e-5)
    assert refocus["hessian"]["top_eigenvalue"] == pytest.approx(fused["hessian"]["top_eigenvalue"], rel=1e-3)
    for name in ("landscape_surface.png", "landscape_curves.png", "landscape_hessian.png"):
        with Image.open(out / name) as img:
            img.verify()
            assert img.format == "PNG"
        assert f"wrote {out / name}" in stdout
    assert f"wrote {out / 'landscape.json'}" in stdout
    assert "rise@0.1" in stdout and "lambda_max" in stdout and f"{refocus['loss0']:.4f}" in stdout


def test_cli_bad_input_is_one_line_error(tiny: Tiny, tmp_path: Path):
    def run(*argv) -> str:
        rc, _, err = call(analyze_cli.main, ["landscape", *argv])
        return assert_one_line_error(rc, err)

    out = ["--out", tmp_path / "o"]
    assert "not found" in run(tmp_path / "missing.pth", "--data", tiny.data, *out)
    assert "does not exist" in run(tiny.fused, "--data", tmp_path / "nodata", *out)
    assert "odd number" in run(tiny.fused, "--data", tiny.data, "--grid", 4, *out)
    other = tmp_path / "resnet.pth"
    atomic_save(fused_checkpoint(build_model("resnet10t", num_classes=CLASSES, pretrained=False), "resnet10t",
                                 CLASSES, {}, 0.0), other)
    line = run(tiny.fused, other, "--data", tiny.data, *out)
    assert "different architectures" in line and ARCH in line and "resnet10t" in line
    assert not (tmp_path / "o").exists()
