"""One re-parameterization per model: every method refuses a model that holds another one (or itself), with one line
naming what is there and how to go on; after fusing, the next method applies. Plus the hints of what cannot be
changed and why."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from refconv_train import RefconvError, refocus_model
from refconv_train.methods.reparam import METHODS, apply_reparam, fuse_reparam
from refconv_train.methods.reparam.structural import NO_BIAS_SINK

pytestmark = pytest.mark.usefixtures("one_thread_module")
ALL = ("refconv", *METHODS)
X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8))


def apply(model: nn.Module, method: str) -> None:
    if method == "refconv":
        refocus_model(model, check_base=False)  # fresh init: the check would warn
    else:
        apply_reparam(model, method, example=X)


@pytest.mark.parametrize("second", ALL)
@pytest.mark.parametrize("first", ALL)
def test_a_second_method_is_refused_with_what_is_there_and_how_to_go_on(first, second):
    model = net()
    apply(model, first)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RefconvError) as info:
        apply(model, second)
    message = str(info.value)
    assert "\n" not in message
    assert f"already re-parameterized with {'RefConv' if first == 'refconv' else first} (conv '0')" in message
    assert "fuse it first (refconv-fuse, or fuse_reparam(model)) or start from the plain model" in message
    assert "map_k" not in message and "exclude" not in message  # not the hints of a model with nothing to change
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("first", ALL)
def test_after_fusing_the_next_method_applies(first):
    model = net()
    apply(model, first)
    assert fuse_reparam(model) == ["0", "3"]
    apply(model, "dbb" if first != "dbb" else "refconv")


def test_refconv_after_dbb_leaves_the_branch_convs_alone():
    model = net()
    apply(model, "dbb")
    with pytest.raises(RefconvError, match="already re-parameterized with dbb"):
        refocus_model(model, check_base=False)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


def test_refconv_names_why_nothing_could_be_refocused():
    with pytest.raises(RefconvError, match=r"\(map_k=5 is larger than all 2 spatial kernels\): use a smaller odd "
                                           r"map_k$"):
        refocus_model(net(), map_k=5, check_base=False)
    with pytest.raises(RefconvError, match=r"\(1 smaller than map_k=5, 1 excluded\): use a smaller odd map_k or "
                                           r"fewer excludes$"):
        refocus_model(net(), map_k=5, exclude=["^3$"], check_base=False)
    model = net()
    for conv in (model[0], model[3]):  # someone else's parametrization (spectral norm, ...): not ours to refocus
        parametrize.register_parametrization(conv, "weight", nn.Identity())
    with pytest.raises(RefconvError, match=r"\(2 parametrized\): remove the other weight parametrizations$"):
        refocus_model(model, check_base=False)
    with pytest.raises(RefconvError, match="no spatial conv"):
        refocus_model(nn.Sequential(nn.Conv2d(3, 4, 1)), check_base=False)


def test_a_conv_whose_batchnorm_follows_an_activation_is_skipped_for_what_is_missing():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.BatchNorm2d(8),
                          nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
    report = apply_reparam(model, "acb", example=X)
    assert dict(report.skipped) == {"0": NO_BIAS_SINK} and [layer.name for layer in report.layers] == ["3"]
    assert "reading its output directly" in NO_BIAS_SINK and "after it" not in NO_BIAS_SINK
