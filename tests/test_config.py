"""Config (docs/design.md section 3): YAML + dotted overrides, one-line errors that name the key, round trips."""

import pytest
import yaml

from refconv_train.config import (
    Config,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)
from refconv_train.errors import RefconvError


def _error(path=None, overrides=()) -> str:
    with pytest.raises(RefconvError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def _write(tmp_path, text: str, name: str = "exp.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_no_file_uses_defaults_and_model_name_for_output():
    cfg = load_config(None)
    assert cfg.optim.lr == 0.1 and cfg.train.output == "runs/mobilenetv2_100"
    cfg = load_config(None, ["model.name=torchvision:resnet50"])
    assert cfg.train.output == "runs/torchvision_resnet50"
    assert load_config(None, ["model.name=timm/resnet50.a1_in1k"]).train.output == "runs/timm_resnet50.a1_in1k"


def test_yaml_file_sets_only_some_keys(tmp_path):
    path = _write(tmp_path, "optim:\n  lr: 1e-3\n  epochs: 2\nrefconv:\n  init: zeros\ndata:\n", "mobilenetv2.yaml")
    cfg = load_config(path)
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.epochs == 2 and cfg.options["refconv"].init == "zeros"
    assert cfg.optim.momentum == 0.9 and cfg.model.name == "mobilenetv2_100" and cfg.data.batch_size == 256
    assert cfg.train.output == "runs/mobilenetv2"  # <name> = file stem
    assert load_config(str(_write(tmp_path, "", "empty.yaml"))).train.output == "runs/empty"


def test_overrides_of_each_type(tmp_path):
    path = _write(tmp_path, "model:\n  pretrained: true\n")
    cfg = load_config(path, [
        "optim.lr=0.05", "optim.weight_decay=0", "optim.epochs=2", "method=none",
        "refconv.exclude=[conv_stem, 'blocks\\.0\\..*']", "data.root=/data/in1k", "model.pretrained=runs/x/best.pth",
        "data.mean=[0, 0.5, 1]", "model.kwargs={drop_rate: 0.2}", "model.kwargs.drop_path_rate=0.1",
        "train.output=/scratch/<name>-2", "model.name=123", "train.resume=false",
    ])
    assert cfg.optim.lr == 0.05
    assert cfg.optim.weight_decay == 0.0 and isinstance(cfg.optim.weight_decay, float)  # int -> float
    assert cfg.optim.epochs == 2 and cfg.method == "none"
    assert cfg.options["refconv"].exclude == ["conv_stem", "blocks\\.0\\..*"]
    assert cfg.data.root == "/data/in1k" and cfg.model.pretrained == "runs/x/best.pth"
    assert cfg.data.mean == [0.0, 0.5, 1.0] and all(isinstance(v, float) for v in cfg.data.mean)
    assert cfg.model.kwargs == {"drop_rate": 0.2, "drop_path_rate": 0.1}
    assert cfg.train.output == "/scratch/exp-2"
    assert cfg.model.name == "123"  # string keys keep the text as typed
    assert cfg.train.resume is False
    assert load_config(path, ["model.pretrained=false", "method=none"]).model.pretrained is False
    assert load_config(None, ["optim.lr=1e-3"]).optim.lr == pytest.approx(1e-3)  # YAML 1.2 style exponent


@pytest.mark.parametrize(("override", "expected"), [
    ("optim.lrr=0.1", "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
    ("optm.lr=0.1", "unknown config key 'optm.lr' (did you mean 'optim.lr'?)"),
    ("lr=0.1", "unknown config key 'lr' (did you mean 'optim.lr'?)"),
    ("refconv.mapk=5", "unknown config key 'refconv.mapk' (did you mean 'refconv.map_k'?)"),
    ("optim.lr=abc", "config key 'optim.lr' expects a float, got 'abc' (str)"),
    ("data.batch_size=64.5", "config key 'data.batch_size' expects an int, got 64.5 (float)"),
    ("data.batch_size='64'", "config key 'data.batch_size' expects an int, got '64' (str)"),
    ("data.workers=true", "config key 'data.workers' expects an int, got True (bool)"),
    ("optim.lr=null", "config key 'optim.lr' expects a float, got None (NoneType)"),
    ("refconv.exclude=conv_stem", "config key 'refconv.exclude' expects a list of strings"),
    ("model.pretrained=3", "config key 'model.pretrained' expects true, false or a string, got 3 (int)"),
    ("refconv.init=he", "config key 'refconv.init' must be one of xavier, zeros, kaiming; got 'he'"),
    ("train.amp=fp32", "config key 'train.amp' must be one of none, bf16, fp16; got 'fp32'"),
    ("train.device=tpu", "must be one of auto, cpu, cuda"),
    ("data.on_bad_image=ignore", "must be one of error, skip"),
    ("refconv.base=free", "must be one of frozen, trainable"),
    ("refconv.base_init=zero", "must be one of pretrained, random"),
    ("refconv.map_k=4", "config key 'refconv.map_k' must be an odd positive integer, got 4"),
    ("refconv.map_k=-1", "config key 'refconv.map_k' must be an odd positive integer"),
    ("data.batch_size=0", "config key 'data.batch_size' must be > 0, got 0"),
    ("optim.lr=0", "config key 'optim.lr' must be > 0"),
    ("optim.epochs=-1", "config key 'optim.epochs' must be >= 0"),
    ("optim.warmup_epochs=-1", "config key 'optim.warmup_epochs' must be >= 0"),
    ("data.workers=-1", "config key 'data.workers' must be >= 0"),
    ("data.img_size=0", "config key 'data.img_size' must be > 0"),
    ("optim.lr", "malformed override 'optim.lr': expected the form section.key=value"),
    ("=3", "expected the form section.key=value"),
    ("optim.lr=[0.1", "override 'optim.lr=[0.1': value is not valid YAML"),
])
def test_override_errors(override, expected):
    assert expected in _error(None, [override])


def test_file_errors(tmp_path):
    assert _error("missing.yaml") == "config file 'missing.yaml' not found"
    bad = _write(tmp_path, "optim:\n  lr: 0.1\n  epochs: [1\nmodel:\n  name: x\n")
    message = _error(bad)
    assert message.startswith(f"config file '{bad}' line ") and "invalid YAML" in message
    assert "must be a mapping of sections" in _error(_write(tmp_path, "- a\n- b\n"))
    assert _error(_write(tmp_path, "optm:\n  lr: 0.1\n")) == "unknown config section 'optm' (did you mean 'optim'?)"
    assert _error(_write(tmp_path, "optim:\n  lrr: 0.1\n")) == (
        "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"
    )
    assert "config section 'model'" in _error(_write(tmp_path, "model: resnet50\n"))
    assert "(did you mean 'optim.lr'?)" in _error(_write(tmp_path, "lr: 0.1\n"))
    assert "must be an odd positive integer" in _error(_write(tmp_path, "refconv:\n  map_k: 2\n"))


def test_overrides_apply_after_file(tmp_path):
    path = _write(tmp_path, "optim:\n  lr: 0.2\n  epochs: 7\n")
    cfg = load_config(path, ["optim.lr=0.3"])
    assert (cfg.optim.lr, cfg.optim.epochs) == (0.3, 7)


def test_save_load_round_trip(tmp_path):
    cfg = load_config(None, [
        "model.pretrained=runs/x/best.pth", "refconv.exclude=[conv_stem]", "optim.weight_decay=1e-5",
        "model.name=1e5", "data.root=2024-01-01", "model.kwargs={drop_rate: 0.1}", "train.amp=bf16",
    ])
    path = tmp_path / "out" / "config.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    again = tmp_path / "again.yaml"
    save_config(load_config(path), again)
    assert again.read_text() == path.read_text()


def test_dict_round_trip_is_plain_data():
    cfg = load_config(None, ["refconv.exclude=[a, b]", "model.kwargs={x: [1, 2]}"])
    d = config_to_dict(cfg)

    def plain(v):
        if isinstance(v, dict):
            return all(isinstance(k, str) and plain(x) for k, x in v.items())
        if isinstance(v, list):
            return all(plain(x) for x in v)
        return v is None or isinstance(v, (str, int, float, bool))

    assert plain(d) and config_from_dict(d) == cfg
    d["refconv"]["exclude"].append("c")  # a copy: mutating it leaves cfg alone
    assert cfg.options["refconv"].exclude == ["a", "b"]
    assert yaml.safe_load(yaml.safe_dump(d)) == d


def test_config_from_dict_missing_keys_use_defaults():
    cfg = config_from_dict({"model": {"name": "resnet18"}, "optim": {"lr": 1}})
    assert cfg.model.name == "resnet18" and cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.method_options == Config().method_options and cfg.data.img_size == 224
    assert cfg.train.output == "runs/resnet18"
    assert config_from_dict({}) == load_config(None)
    with pytest.raises(RefconvError, match="unknown config key 'model.nam'"):
        config_from_dict({"model": {"nam": "x"}})
    with pytest.raises(RefconvError, match="must be a mapping"):
        config_from_dict([1, 2])
