import dataclasses

import pytest
import yaml

from pipeline.chat import RenderConfig, TokenizerConfig
from pipeline.common import from_dict, load_params
from pipeline.evaluate import EvaluateConfig
from pipeline.model import ModelConfig
from pipeline.pack import PackConfig
from pipeline.publish import PublishConfig
from pipeline.synth import SynthConfig
from pipeline.train import BaseConfig, TrainConfig

SECTIONS = {"synth": SynthConfig, "tokenizer": TokenizerConfig, "model": ModelConfig, "base": BaseConfig,
            "render": RenderConfig, "pack": PackConfig, "train": TrainConfig, "evaluate": EvaluateConfig,
            "publish": PublishConfig}


@pytest.mark.parametrize("section", SECTIONS)
def test_every_params_section_loads(section):
    cfg = load_params(section, SECTIONS[section])
    assert dataclasses.is_dataclass(cfg)


def test_every_dvc_yaml_params_section_exists():
    params = yaml.safe_load(open("params.yaml"))
    stages = yaml.safe_load(open("dvc.yaml"))["stages"]
    for name, stage in stages.items():
        for entry in stage.get("params", []):
            section, *key = entry.split(".")
            assert section in params, f"stage {name}: params section {section} missing"
            if key:
                assert key[0] in params[section], f"stage {name}: {entry} missing"
    assert set(SECTIONS) | {"data"} == set(params)


def test_dvc_style_overrides_are_coerced():
    # `dvc exp run -S train.lr=3e-5` writes 3e-05, which YAML reads as a string
    assert yaml.safe_load("lr: 3e-05")["lr"] == "3e-05"
    cfg = from_dict(TrainConfig, {"lr": "3e-05", "max_steps": "7", "epochs": 2}, "train")
    assert cfg.lr == 3e-5 and cfg.max_steps == 7 and cfg.epochs == 2.0
    nested = from_dict(BaseConfig, {"pretrain": {"lr": "1e-3"}}, "base")
    assert nested.pretrain.lr == 1e-3


def test_pack_weights_set_per_source_with_dvc_set_param(tmp_path):
    from dvc.utils.hydra import apply_overrides

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"pack": {"block_size": 64, "weights": {}}}))
    with pytest.raises(Exception, match="set-param"):  # a source absent from params.yaml needs `+` (a new key)
        apply_overrides(str(params), ["pack.weights.a=2.0"])
    apply_overrides(str(params), ["+pack.weights.a=2.0", "+pack.weights.b=3e-5"])  # b is written as '3e-05'
    apply_overrides(str(params), ["pack.weights.a=0.5"])  # an existing key: no `+`
    cfg = from_dict(PackConfig, yaml.safe_load(params.read_text())["pack"], "pack")
    assert cfg.weights == {"a": 0.5, "b": 3e-5}
    for bad in ("fast", float("nan"), -1, True):
        with pytest.raises(ValueError, match="pack.weights.a must be a number"):
            PackConfig(weights={"a": bad})


@pytest.mark.parametrize("bad,match", [({"lrr": 1.0}, "unknown keys"), ({"lr": "fast"}, "expected float"),
                                       ({"batch_size": 1.5}, "expected int"), ({"lr": -1.0}, "lr > 0")])
def test_bad_params_fail_clearly(bad, match):
    with pytest.raises(ValueError, match=match):
        from_dict(TrainConfig, bad, "train")
