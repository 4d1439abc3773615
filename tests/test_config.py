"""The training config: every key's type, range and choice is checked where the config is loaded,
and a bad value is one ValueError naming the key (Hypothesis tries random values for every key)."""

import math
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from kepler.cli import main
from kepler.models import VQGANLoss, VQModel
from kepler.io.config import key_types, load_config, to_dict

# (override, the message it must give): issue 15's list of values that used to crash later or
# train nothing, plus their neighbours.
BAD_OVERRIDES = [
    ("data.batch_size=0", "config key 'data.batch_size' must be >= 1, got 0"),
    ("train.ckpt_every=0", "config key 'train.ckpt_every' must be >= 1, got 0"),
    ("train.log_every=0", "config key 'train.log_every' must be >= 1, got 0"),
    ("train.eval_every=-1", "config key 'train.eval_every' must be >= 1, got -1"),
    ("optim.grad_accum=0", "config key 'optim.grad_accum' must be >= 1, got 0"),
    ("model.ch_mult=abc", "config key 'model.ch_mult' must be a list of integers, got 'abc'"),
    ("model.ch_mult=[1,x]", "config key 'model.ch_mult' must be a list of integers, got [1, 'x']"),
    ("data.resize=abc", "config key 'data.resize' must be an integer or null, got 'abc'"),
    ("train.time_limit_minutes=abc", "config key 'train.time_limit_minutes' must be a finite number or null, got 'abc'"),
    ("model.quantizer.ema_decay=abc", "config key 'model.quantizer.ema_decay' must be a finite number or null, got 'abc'"),
    ("device=tpu", "config key 'device' must be auto, cpu, cuda or cuda:<index>, got 'tpu'"),
    ("train.max_steps=-5", "config key 'train.max_steps' must be >= 1, got -5"),
    ("train.time_limit_minutes=-1", "config key 'train.time_limit_minutes' must be > 0, got -1"),
    ("optim.base_lr=fast", "config key 'optim.base_lr' must be a finite number, got 'fast'"),
    ("optim.min_lr_ratio=2", "config key 'optim.min_lr_ratio' must be >= 0 and <= 1, got 2"),
    ("optim.name=sgd", "config key 'optim.name' must be one of adam, adamw, got 'sgd'"),
    ("train.precision=fp8", "config key 'train.precision' must be one of auto, fp32, bf16, fp16, got 'fp8'"),
    ("seed=1.5", "config key 'seed' must be an integer, got 1.5"),
    ("train.progress=3", "config key 'train.progress' must be true or false, got 3"),
]


@pytest.mark.parametrize("override, message", BAD_OVERRIDES, ids=[o for o, _ in BAD_OVERRIDES])
def test_bad_values_are_one_line_errors_naming_the_key(override, message, tmp_path, capsys):
    with pytest.raises(ValueError) as info:
        load_config(None, [override])
    assert str(info.value) == message
    config = tmp_path / "c.yaml"
    config.write_text("name: c\n")
    assert main(["train", str(config), override]) == 2
    assert capsys.readouterr().err == f"kepler train: error: {message}\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the cuda backend runs on this machine")
def test_a_backend_this_machine_cannot_run_is_refused_at_load():
    with pytest.raises(ValueError, match="config key 'model.quantizer.backend' is 'cuda', which cannot run here"):
        load_config(None, ["model.quantizer.backend=cuda"])


@pytest.mark.parametrize("text, message", [
    ("model: [unclosed\n", r"is not valid YAML \(line 2\)"),
    ("- a\n- list\n", "must hold a mapping of config keys, got a ListConfig"),
])
def test_files_that_are_not_a_yaml_mapping(tmp_path, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ValueError, match=f"config file {bad} {message}"):
        load_config(bad)


# Values of every kind a YAML file can hold, extremes included.
ANY_YAML_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**31), 2**31), st.integers(-3, 3),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
    st.lists(st.integers(-2, 5), max_size=4), st.lists(st.text(max_size=2), max_size=2),
)
KEYS = sorted(key_types())


def _nested(key: str, value) -> dict:
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


@settings(max_examples=150)  # fixed seed, no database, no deadline: the "kepler" profile (conftest.py)
@given(key=st.sampled_from(KEYS), value=ANY_YAML_VALUE)
def test_any_value_of_any_key_loads_or_is_one_line_naming_the_key(tmp_path_factory, key, value):
    """Either the config loads and its model and loss can be built (on the meta device: no memory),
    or loading is a one-line ValueError naming the key. Fixed seed (derandomize): a failure
    reproduces on every run."""
    config = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    config.write_text(yaml.safe_dump(_nested(key, value)))
    try:
        cfg = load_config(config)
    except ValueError as exc:
        message = str(exc)
        assert "\n" not in message and (repr(key) in message or key.rsplit(".", 1)[-1] in message), message
        return
    loaded = cfg if key == "model.quantizer.type" else None
    assert loaded is None or loaded.model.quantizer.type == value
    if isinstance(value, float) and not math.isfinite(value):
        pytest.fail(f"{key}={value} was accepted")
    if not key.startswith(("model.", "loss.")):
        return
    try:
        with torch.device("meta"):
            VQModel.from_config(to_dict(cfg.model))
            VQGANLoss(**to_dict(cfg.loss))
    except ValueError as exc:  # the model's and the loss's own checks: one line naming the argument
        message = str(exc)
        assert "\n" not in message and key.rsplit(".", 1)[-1] in message, (key, value, message)


def test_builtin_names_resolve_and_an_existing_file_wins(tmp_path, monkeypatch):
    from kepler.io.config_files import CONFIGS_DIR, resolve_config

    assert resolve_config("sample") == CONFIGS_DIR / "sample.yaml"
    assert load_config("sample").name == "sample"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sample").write_text("name: mine\n")  # a file called like a built-in config
    assert resolve_config("sample") == Path("sample")
    assert load_config("sample").name == "mine"


def test_an_unknown_config_name_lists_the_builtin_names(tmp_path, capsys):
    from kepler.io.config_files import builtin_configs

    names = ", ".join(builtin_configs())
    assert names.startswith("ade20k_f16, celebahq_f16, celebahq_prior, imagenet_kepler16, imagenet_vq16, prior_faces_cond, prior_sample, sample")
    with pytest.raises(FileNotFoundError) as error:
        load_config("smaple")
    assert str(error.value) == f"config file smaple does not exist and is not a built-in config name (built-in: {names})"
    assert main(["study", "no_such_study"]) == 2
    assert capsys.readouterr().err == ("kepler study: error: config file no_such_study does not exist and is not a "
                                       f"built-in config name (built-in: {names})\n")


def test_list_configs_shows_each_builtin_with_its_kind_and_description(capsys):
    from kepler.io.config_files import builtin_configs

    assert main(["train", "--list-configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    configs = builtin_configs()
    assert [line.split()[0] for line in lines] == list(configs)
    for line, config in zip(lines, configs.values()):
        assert line.split()[1:3] == ["kepler", config.kind] and line.endswith(config.description)
    assert configs["sample"].kind == "train"
    assert all(configs[name].kind == "study" for name in ("study_sample", "study_equal_bits", "study_prior"))
    assert all(configs[name].kind == "prior" for name in ("prior_sample", "celebahq_prior", "prior_faces_cond"))
    assert configs["sample"].description.startswith("The demo: a small Kepler tokenizer")
    assert main(["train"]) == 2
    assert capsys.readouterr().err == ("kepler train: error: give a config file or a built-in config name "
                                       "(kepler train --list-configs shows them)\n")


def test_a_layer_that_changes_the_quantizer_type_starts_its_section_afresh():
    sample = "sample"  # the built-in demo config
    cfg = load_config(sample, ["model.quantizer.type=lattice", "model.quantizer.lattice=D4", "model.quantizer.q=3"])
    assert cfg.model.quantizer.type == "lattice" and cfg.model.quantizer.q == 3
    assert "num_codes" not in cfg.model.quantizer and cfg.model.ch == 16 and cfg.data.resize == 48
    # Naming the type already in effect keeps the file's quantizer keys.
    kept = load_config(sample, ["model.quantizer.type=kepler"])
    assert kept.model.quantizer.num_codes == 256 and kept.model.quantizer.init == "kmeans"
    # Keys for the new type in the layer that changes it are checked against that type.
    with pytest.raises(ValueError, match="unknown config key 'model.quantizer.num_codes' in overrides"):
        load_config(sample, ["model.quantizer.type=fsq", "model.quantizer.num_codes=4"])
