"""params.yaml -> dataclasses, strictly: every section loads, every key is required, problems are reported together,
DVC's `-S` overrides (written back as strings such as '3e-05') are read as numbers, and the SFT learning rate is
the top-level `lr`."""
import dataclasses

import pytest
import yaml

from pipeline.common import UserError
from pipeline.config import (
    SECTIONS,
    BaseConfig,
    DuringTrainConfig,
    EvaluateConfig,
    PackConfig,
    SftConfig,
    from_dict,
    load_params,
    read_params,
)
from tests.conftest import ROOT, project_params, write_params


@pytest.mark.parametrize("section", SECTIONS)
def test_every_params_section_loads(section):
    cfg = load_params(section, SECTIONS[section], str(ROOT / "params.yaml"))
    assert dataclasses.is_dataclass(cfg)
    assert not any(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
                   for f in dataclasses.fields(cfg)), "a default could silently differ from params.yaml"


def test_every_dvc_yaml_params_entry_exists_and_every_section_is_used():
    params = read_params(str(ROOT / "params.yaml"))
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    used = set()
    for name, stage in stages.items():
        for entry in stage.get("params", []):
            node = params
            for key in entry.split("."):
                assert isinstance(node, dict) and key in node, f"stage {name}: {entry} is not in params.yaml"
                node = node[key]
            used.add(entry.split(".")[0])
    assert set(params) == set(SECTIONS) | {"data", "lr"} == used


def test_lr_is_the_top_level_knob_of_the_train_section(tmp_path):
    write_params(tmp_path, lr="3e-05")  # as `dvc exp run -S lr=3e-5` writes it back
    cfg = load_params("train", SftConfig, str(tmp_path / "params.yaml"))
    assert cfg.lr == 3e-5 and isinstance(cfg.lr, float)
    assert load_params("base", BaseConfig, str(tmp_path / "params.yaml")).pretrain.lr == 3e-3  # its own lr
    write_params(tmp_path, train={"lr": 1e-4})
    with pytest.raises(UserError, match=r"train.lr: the train section takes it from the top-level `lr`"):
        load_params("train", SftConfig, str(tmp_path / "params.yaml"))
    params = project_params()
    del params["lr"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(UserError, match="lr: missing at the top of params.yaml"):
        load_params("train", SftConfig, str(tmp_path / "params.yaml"))


def test_missing_unknown_and_bad_keys_are_reported_together(tmp_path):
    params = project_params()
    del params["train"]["epochs"]
    params["train"] |= {"batch_size": 0, "grad_accum": "two", "lrr": 1.0}
    params["evaluate"]["during_train"] |= {"samples": 99}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(UserError) as e:
        load_params("train", SftConfig, str(tmp_path / "params.yaml"))
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'params.yaml'}: ")
    for part in ("train.lrr: unknown key", "train.epochs: missing", "train.grad_accum='two' must be a number (int)"):
        assert part in message
    # type problems first; once the types are right, every failed check at once
    del params["train"]["lrr"]
    params["train"] |= {"grad_accum": 1, "epochs": 1.0, "min_lr_frac": 2.0}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(UserError, match=r"train.batch_size=0 must be >= 1; train.min_lr_frac=2.0 must be in \[0, 1\]"):
        load_params("train", SftConfig, str(tmp_path / "params.yaml"))
    with pytest.raises(UserError, match=r"evaluate.during_train.samples=99 must be in \[0, prompts\]"):
        load_params("evaluate.during_train", DuringTrainConfig, str(tmp_path / "params.yaml"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {}}))
    with pytest.raises(UserError, match="section pack is missing"):
        load_params("pack", PackConfig, str(tmp_path / "params.yaml"))
    with pytest.raises(UserError, match="no such file"):
        load_params("pack", PackConfig, str(tmp_path / "absent.yaml"))


def test_dvc_style_overrides_are_coerced():
    # `dvc exp run -S train.max_steps=7` and `-S base.pretrain.lr=1e-3` are written back as strings or ints
    assert yaml.safe_load("lr: 3e-05")["lr"] == "3e-05"
    base = project_params()["base"]
    nested = from_dict(BaseConfig, base | {"pretrain": base["pretrain"] | {"lr": "1e-3", "max_steps": "7",
                                                                            "epochs": 2}}, "base")
    assert nested.pretrain.lr == 1e-3 and nested.pretrain.max_steps == 7 and nested.pretrain.epochs == 2.0
    for bad, match in (({"lr": float("nan")}, "must be finite"), ({"max_steps": 1.5}, "must be int"),
                       ({"compile": "yes"}, "must be bool")):
        with pytest.raises(UserError, match=match):
            from_dict(BaseConfig, base | {"pretrain": base["pretrain"] | bad}, "base")


def test_a_budget_is_a_number_or_auto():
    evaluate = project_params()["evaluate"]
    for value, read in ((64, 64), ("64", 64), ("auto", "auto")):  # `-S evaluate.max_new_tokens=64` may come as '64'
        assert from_dict(EvaluateConfig, evaluate | {"max_new_tokens": value}, "evaluate").max_new_tokens == read
    for bad, match in ((True, "must be int or str"), ("lots", "must be a number >= 1 or auto"),
                       (0, "must be a number >= 1 or auto"), (2.5, "must be int or str")):
        with pytest.raises(UserError, match=f"evaluate.max_new_tokens.*{match}"):
            from_dict(EvaluateConfig, evaluate | {"max_new_tokens": bad}, "evaluate")
    with pytest.raises(UserError, match=r"cap=8 must be >= floor"):
        from_dict(EvaluateConfig, evaluate | {"budget": {"factor": 2.0, "floor": 16, "cap": 8}}, "evaluate")


def test_pack_weights_set_per_source_with_dvc_set_param(tmp_path):
    from dvc.utils.hydra import apply_overrides

    params = tmp_path / "params.yaml"
    write_params(tmp_path)
    with pytest.raises(Exception, match="set-param"):  # a source absent from params.yaml needs `+` (a new key)
        apply_overrides(str(params), ["pack.weights.a=2.0"])
    apply_overrides(str(params), ["+pack.weights.a=2.0", "+pack.weights.b=3e-5"])  # b is written as '3e-05'
    apply_overrides(str(params), ["pack.weights.a=0.5"])  # an existing key: no `+`
    cfg = load_params("pack", PackConfig, str(params))
    assert cfg.weights == {"a": 0.5, "b": 3e-5}
    pack = project_params()["pack"]
    for bad in ("fast", float("nan"), -1, True):
        with pytest.raises(UserError, match=r"pack.weights=.* must map each source to a number >= 0"):
            from_dict(PackConfig, pack | {"weights": {"a": bad}}, "pack")


def test_dvc_lr_override_is_what_the_user_types(tmp_path):
    """`dvc exp run -S lr=3e-5` goes through DVC's own override code onto the top-level key."""
    from dvc.utils.hydra import apply_overrides

    write_params(tmp_path)
    apply_overrides(str(tmp_path / "params.yaml"), ["lr=3e-5"])
    assert "lr: 3e-05" in (tmp_path / "params.yaml").read_text()
    assert load_params("train", SftConfig, str(tmp_path / "params.yaml")).lr == 3e-5
