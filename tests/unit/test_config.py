import dataclasses
from typing import Literal

import pytest

import titanax as tx
from titanax.launch.config import from_argv, load, to_dict


@dataclasses.dataclass
class Optimizer:
    lr: float = 1e-3
    name: Literal["adam", "sgd"] = "adam"
    betas: tuple[float, ...] = (0.9, 0.999)


@dataclasses.dataclass
class Config:
    steps: int = 10
    mesh: str = "data=-1"
    resume: bool = False
    out: str | None = None
    optimizer: Optimizer = dataclasses.field(default_factory=Optimizer)


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 20\noptimizer:\n  lr: 1.0e-2\n  betas: [0.8, 0.9]\n")
    cfg = load(Config, path, ["optimizer.name=sgd", "resume=true", "out=run1", "optimizer.lr=3e-4"])
    assert cfg == Config(
        steps=20,
        resume=True,
        out="run1",
        optimizer=Optimizer(lr=3e-4, name="sgd", betas=(0.8, 0.9)),
    )
    assert to_dict(cfg)["optimizer"]["lr"] == 3e-4
    assert load(Config) == Config()


def test_unknown_keys_name_the_path_and_suggest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  lrate: 0.1\n")
    with pytest.raises(
        tx.ConfigError,
        match=rf"config key 'optimizer.lrate' \(in {path}\) is "
        r"unknown; the keys of 'optimizer' are lr, name, betas. Did you mean "
        r"'optimizer.lr'\?",
    ):
        load(Config, path)
    with pytest.raises(
        tx.ConfigError,
        match=r"'stepz' \(from --set stepz=3\) is unknown; the "
        r"top-level keys are steps, mesh, resume, out, optimizer",
    ):
        load(Config, overrides=["stepz=3"])
    with pytest.raises(tx.ConfigError, match="'steps' .* is not a section; it has no 'x'"):
        load(Config, overrides=["steps.x=3"])


def test_wrong_types_name_the_expected_type(tmp_path):
    with pytest.raises(
        tx.ConfigError,
        match=r"config key 'steps' \(from --set steps=ten\) must "
        r"be int; got 'ten' \(str\)",
    ):
        load(Config, overrides=["steps=ten"])
    with pytest.raises(
        tx.ConfigError, match="'optimizer.name' .* must be one of 'adam', 'sgd'; got 'rmsprop'"
    ):
        load(Config, overrides=["optimizer.name=rmsprop"])
    with pytest.raises(tx.ConfigError, match=r"'optimizer.betas\[1\]' .* must be float"):
        load(Config, overrides=["optimizer.betas=[0.9, fast]"])
    path = tmp_path / "c.yaml"
    path.write_text("resume: maybe\n")
    with pytest.raises(tx.ConfigError, match=r"'resume' \(in .*\) must be bool; got 'maybe'"):
        load(Config, path)


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(tx.ConfigError, match="cannot read"):
        load(Config, tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(tx.ConfigError, match="must hold a mapping"):
        load(Config, tmp_path / "list.yaml")
    with pytest.raises(tx.ConfigError, match="must look like key.path=value"):
        load(Config, overrides=["steps"])


def test_from_argv_shorthand():
    cfg = from_argv(Config, ["--steps", "3", "--set", "optimizer.lr=0.5", "--out=x"])
    assert (cfg.steps, cfg.optimizer.lr, cfg.out) == (3, 0.5, "x")
    with pytest.raises(tx.ConfigError, match="needs a value"):
        from_argv(Config, ["--steps"])


@pytest.mark.parametrize("example", ["mnist_dp", "gpt_small_tp", "gpt_pipeline"])
def test_example_configs_load(example):
    import importlib

    module = importlib.import_module(f"examples.{example}.train")
    cfg = load(module.Config, module.CONFIG)
    assert cfg == module.Config()  # the YAML holds the defaults
