import dataclasses
import math
import re
from typing import Any, Literal

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
        match=rf"config key 'optimizer.lrate' \(in {path}, line 2\) is "
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
        match=r"config key 'steps' \(from --set steps=ten\) must be int; got 'ten'\.$",
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
    with pytest.raises(
        tx.ConfigError, match=r"'resume' \(in .*, line 1\) must be bool; got 'maybe'. Write true or"
    ):
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


def test_a_bool_setting_alone_is_a_flag():
    assert from_argv(Config, ["--resume"]).resume is True
    assert from_argv(Config, ["--resume", "--steps", "3"]).resume is True
    assert from_argv(Config, ["--resume", "false"]).resume is False
    assert from_argv(Config, ["--resume=no"]).resume is False
    with pytest.raises(tx.ConfigError, match="needs a value"):  # not a bool: still a value
        from_argv(Config, ["--out"])


@pytest.mark.parametrize("example", ["mnist_dp", "gpt_small_tp", "gpt_pipeline", "llama"])
def test_example_configs_load(example):
    import importlib

    module = importlib.import_module(f"examples.{example}.train")
    cfg = load(module.Config, module.CONFIG)
    assert cfg == module.Config()  # the YAML holds the defaults


# ---------------------------------------------------------------- YAML 1.1 surprises (issue 15)
@dataclasses.dataclass
class Typed:
    steps: int = 10
    lr: float = 0.1
    name: str = "run"
    resume: bool = False
    out: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    optimizer: Optimizer = dataclasses.field(default_factory=Optimizer)


def load_text(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path, load(Typed, path)


@pytest.mark.parametrize(
    "text, line, first, key",
    [
        ("steps: 1\nlr: 0.5\nsteps: 2\n", 3, 1, "steps"),
        ("optimizer:\n  lr: 0.1\n  name: sgd\n  lr: 0.2\n", 4, 2, "optimizer.lr"),
        ("extra:\n  a: 1\n  a: 2\n", 3, 2, "extra.a"),
    ],
)
def test_a_key_given_twice_is_an_error_at_any_depth(tmp_path, text, line, first, key):
    # Before: YAML kept the last value, silently.
    with pytest.raises(
        tx.ConfigError,
        match=rf"config key '{key}' \(in .*c.yaml, line {line}\) is given twice \(first on line "
        rf"{first}\); YAML keeps only the last. Delete one of them.$",
    ):
        load_text(tmp_path, text)


@pytest.mark.parametrize(
    "text, error",
    [
        # base 60: YAML 1.1 loaded `steps: 1:30` as 90
        (
            "steps: 1:30",
            r"'steps' .* must be int; got '1:30'. YAML 1.1 reads it in base 60, as 90: "
            r"write 90.$",
        ),
        ("lr: 1:30.5", r"'lr' .* must be float; got '1:30.5'. .* base 60, as 90.5: write 90.5.$"),
        # a leading 0: YAML 1.1 loaded `steps: 010` as 8
        (
            "steps: 010",
            r"'steps' \(in .*, line 1\) must be int; got '010'. YAML 1.1 reads it as "
            r"octal 8, YAML 1.2 and Python as 10: write 10, or 0o10 for 8.$",
        ),
        ("lr: 010", r"'lr' .* must be float; got '010'. YAML 1.1 reads it as octal 8"),
        ("steps: 09", r"'steps' .* got '09'. A leading 0 means octal in YAML 1.1: write 9.$"),
        # no declared type (Any): an error where YAML 1.1 and 1.2 disagree, with the fix
        (
            "extra: {a: no}",
            r"'extra.a' .* is 'no', which YAML 1.1 reads as False and YAML 1.2 as "
            r"'no'. Quote it \('no'\) for the text, or write false.$",
        ),
        ("extra: {a: 010}", r"'extra.a' .* Quote it \('010'\) for the text, or write 10.$"),
        ("extra: {a: 1e3}", r"'extra.a' .* Quote it \('1e3'\) for the text, or write 1000.0.$"),
        ("extra: {a: 2024-01-01}", r"'extra.a' .* YAML 1.1 reads as datetime.date\(2024, 1, 1\)"),
        # a str field is not null, and a bool is one of the words for a bool
        ("name: ~", r"'name' .* must be str; got null. Quote it \('~'\) for the text.$"),
        ("resume: y", r"'resume' .* must be bool; got 'y'. Write true or false"),
        # no tags but YAML's own: no code runs, and no value is built by a tag
        ("name: !!python/object/apply:os.getcwd []", r"'name' .* has the tag .*drop the tag.$"),
        ("extra: {a: !!binary aGk=}", r"'extra.a' .* has the tag 'tag:yaml.org,2002:binary'"),
    ],
)
def test_yaml_1_1_surprises_are_errors_naming_key_file_line_and_fix(tmp_path, text, error):
    with pytest.raises(tx.ConfigError, match=error):
        load_text(tmp_path, text + "\n")


@pytest.mark.parametrize(
    "text, field, value",
    [
        # the field's type decides: a str field holds the text (the Norway problem)
        ("name: no", "name", "no"),
        ("name: NO", "name", "NO"),
        ("name: on", "name", "on"),
        ("name: 1.0", "name", "1.0"),
        ("name: 010", "name", "010"),
        ("name: 1:30", "name", "1:30"),
        ("name: 2024-01-01", "name", "2024-01-01"),
        ("out: no", "out", "no"),
        ("out: ~", "out", None),
        ("out: null", "out", None),
        ("out: 'null'", "out", "null"),
        ("optimizer: {name: 'sgd'}", "optimizer", Optimizer(name="sgd")),
        # bool fields take the words YAML 1.1 reads as bools
        ("resume: yes", "resume", True),
        ("resume: On", "resume", True),
        ("resume: NO", "resume", False),
        ("resume: off", "resume", False),
        # numbers as Python writes them
        ("steps: 0x10", "steps", 16),
        ("steps: 0o10", "steps", 8),
        ("steps: 0b11", "steps", 3),
        ("steps: 1_000", "steps", 1000),
        ("steps: -3", "steps", -3),
        ("steps: 0", "steps", 0),
        ("lr: 1e-3", "lr", 1e-3),
        ("lr: 1.0e-3", "lr", 1e-3),
        ("lr: 3", "lr", 3.0),
        ("lr: .inf", "lr", math.inf),
        ("lr: -.Inf", "lr", -math.inf),
        ("lr: 010.5", "lr", 10.5),
        # no declared type: what YAML 1.1 and 1.2 agree on, or quoted text
        ("extra: {a: '=', b: =}", "extra", {"a": "=", "b": "="}),
        (
            "extra: {a: 'no', b: 1.5, c: null, d: true, e: [1, x]}",
            "extra",
            {"a": "no", "b": 1.5, "c": None, "d": True, "e": [1, "x"]},
        ),
        # anchors and merge keys; a key given explicitly wins over a merged one
        ("<<: {steps: 3, lr: 0.5}\nsteps: 4", "steps", 4),
    ],
)
def test_values_are_read_as_the_declared_type(tmp_path, text, field, value):
    assert getattr(load_text(tmp_path, text + "\n")[1], field) == value


def test_overrides_read_the_same_way():
    assert load(Typed, overrides=["name=no", "resume=on", "steps=1_000"]) == Typed(
        steps=1000, name="no", resume=True
    )
    with pytest.raises(tx.ConfigError, match=r"'steps' \(from --set steps=1:30\) must be int"):
        load(Typed, overrides=["steps=1:30"])
    with pytest.raises(
        tx.ConfigError, match=r"'steps' \(from --steps 010\) must be int; got '010'"
    ):
        from_argv(Typed, ["--steps", "010"])
    with pytest.raises(tx.ConfigError, match=r"\(from --steps=1:30\) must be int"):
        from_argv(Typed, ["--steps=1:30"])
    with pytest.raises(tx.ConfigError, match=r"\(from --set extra={a: 1, a: 2}\) is given twice"):
        from_argv(Typed, ["--set", "extra={a: 1, a: 2}"])
    assert from_argv(Typed, ["--out="]).out == ""  # an empty value is the empty string


def test_yaml_syntax_errors_are_one_line_with_the_place(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 3\n  lr: 0.1\n")
    with pytest.raises(tx.ConfigError) as e:
        load(Typed, path)
    assert "\n" not in str(e.value)
    assert re.match(rf"config: {path} is not valid YAML: .*\(line 2, column 5\)", str(e.value))


# ---------------------------------------------------------------- --help and one-line errors
@dataclasses.dataclass
class Documented:
    """A config whose fields say what they are."""

    steps: int = 10
    """Training steps."""
    batch_size: int = dataclasses.field(default=32, metadata={"help": "Global batch."})
    out: str | None = None
    optimizer: Optimizer = dataclasses.field(default_factory=Optimizer)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_setting_with_type_default_and_help(flag, capsys, tmp_path):
    defaults = tmp_path / "defaults.yaml"
    defaults.write_text("steps: 7\n")
    with pytest.raises(SystemExit) as e:
        from_argv(Documented, ["--steps", "3", flag], default=defaults, prog="train.py")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: train.py [-h] [--config FILE] [--set KEY=VALUE]")
    flat = " ".join(out.split())
    assert f"--config FILE a YAML file of settings (default: {defaults})" in flat
    for entry in [
        "--steps INT Training steps. (default: 7)",  # the help from the docstring, the default from the file
        "--batch-size INT Global batch. (default: 32)",  # from the field's metadata
        "--out TEXT|null (default: null)",
        "--optimizer.lr FLOAT (default: 0.001)",
        "--optimizer.name {adam,sgd} (default: adam)",
        "--optimizer.betas [FLOAT,...] (default: [0.9, 0.999])",
    ]:
        assert entry in flat, f"{entry!r} not in\n{out}"


def test_exit_on_error_prints_one_line_and_exits_2(capsys):
    for argv, message in [
        (["--stepz", "3"], "config key 'stepz' (from --stepz 3) is unknown"),
        (["--steps"], "config: --steps needs a value, e.g. --steps VALUE or --steps=VALUE."),
        (["steps=3"], "config: unexpected argument 'steps=3'; use --key value"),
        (["--config", "/nonexistent.yaml"], "config: cannot read /nonexistent.yaml"),
    ]:
        with pytest.raises(SystemExit) as e:
            from_argv(Documented, argv, prog="train.py", exit_on_error=True)
        assert e.value.code == 2
        out, err = capsys.readouterr()
        assert out == "" and err.startswith(f"train.py: ConfigError: {message}")
        assert err.count("\n") == 1, err  # one line, no traceback
    with pytest.raises(tx.ConfigError, match="needs a value"):  # the default: raise
        from_argv(Documented, ["--steps"])


EXAMPLES = ["mnist_dp", "gpt_small_tp", "gpt_pipeline"]


@pytest.mark.parametrize("example", EXAMPLES)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_example_prints_its_settings_and_exits_0(example, flag, capsys):
    import importlib

    module = importlib.import_module(f"examples.{example}.train")
    with pytest.raises(SystemExit) as e:
        module.main([flag])  # parses only: nothing starts
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert module.__doc__.strip().splitlines()[0] in out
    settings = out.split("\nsettings (", 1)[1]
    entries = {e.split()[0]: " ".join(e.split()[1:]) for e in re.split(r"\n(?=  --)", settings)[1:]}
    assert list(entries) == [
        "--" + f.name.replace("_", "-") for f in dataclasses.fields(module.Config)
    ]
    for f in dataclasses.fields(module.Config):
        text = entries["--" + f.name.replace("_", "-")]
        shown = "null" if f.default is None else str(f.default)
        assert text.endswith(f"(default: {shown})"), text
        assert len(text.split()) > 3, f"{f.name} has no help text: {text!r}"


@pytest.mark.parametrize("example", EXAMPLES)
def test_every_example_reports_a_config_error_in_one_line(example, capsys):
    import importlib

    module = importlib.import_module(f"examples.{example}.train")
    with pytest.raises(SystemExit) as e:
        module.main(["--stepz", "3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "ConfigError: config key 'stepz' (from --stepz 3) is unknown;" in err
    assert err.rstrip().endswith("Did you mean 'steps'?")


def test_examples_command_reports_titanax_errors_in_one_line(monkeypatch, capsys):
    from examples.common import command

    def main(argv):
        raise tx.MeshError("tx.mesh(data=3): the axis sizes multiply to 3.\nTry data=-1.")

    monkeypatch.setattr("sys.argv", ["examples/x/train.py"])
    with pytest.raises(SystemExit) as e:
        command(main)
    assert e.value.code == 1
    assert capsys.readouterr().err == (
        "train.py: MeshError: tx.mesh(data=3): the axis sizes multiply to 3. Try data=-1.\n"
    )
