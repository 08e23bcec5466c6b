"""Config loading: the shipped configs load; bad values are refused with one line naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from digi2real.config import ExperimentConfig, load_experiment, parse_override
from digi2real.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_shipped_configs_load():
    paper = load_experiment(CONFIGS / "digi2real-20k.yaml")
    assert (paper.select.n, paper.plan.images_per_identity, paper.plan.images_per_latent, paper.plan.alpha) == (
        20000, 20, 5, 2.0)
    assert paper.embed.images_per_identity == 5
    assert paper.encoder.model == "FoivosPar/Arc2Face:arcface.onnx"
    smoke = load_experiment(CONFIGS / "smoke-cpu.yaml")
    assert smoke.source.kind == "procedural"


@pytest.mark.parametrize(
    "override,message",
    [
        ({"plan.alpha": 0}, r"plan\.alpha: .*greater than 0"),
        ({"plan.images_per_identity": -3}, r"plan\.images_per_identity: .*greater than 0.*-3"),
        ({"select.n": -1}, r"select\.n: "),
        ({"select.nn": 5}, r"select\.nn: unknown key; allowed keys here: method, n, threshold"),
        ({"bogus": 1}, r"bogus: unknown key; allowed keys here: name, miniature, output_dir, source"),
        ({"select.method": "random"}, r"select\.method: 'random' is not allowed; choose one of 'least_similar', 'greedy' or 'first'"),
        ({"select.method": "greedy"}, r"select\.threshold is required"),
        ({"source.kind": "digiface", "source.path": None}, r"source\.path is required"),
        ({"encoder.provider": "tpu"}, r"encoder\.provider: 'tpu' is not allowed"),
        ({"select.threshold": 1.5}, r"select\.threshold: .*less than or equal to 1"),
    ],
)
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_experiment(CONFIGS / "smoke-cpu.yaml", override)
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(str(CONFIGS / "smoke-cpu.yaml"))


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_experiment(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("plan: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_experiment(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_experiment(listy)


def test_overrides_parse_yaml_values_and_win():
    assert parse_override("plan.alpha=1.5") == (["plan", "alpha"], 1.5)
    assert parse_override("select.n=null") == (["select", "n"], None)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("plan.alpha")
    cfg = load_experiment(CONFIGS / "digi2real-20k.yaml", {"plan.alpha": 1.0, "select.n": 10000})
    assert cfg.plan.alpha == 1.0 and cfg.select.n == 10000
    assert ExperimentConfig().plan.alpha == 2.0


def test_section_overrides_accept_keys_with_or_without_the_section():
    from digi2real.config import section_overrides

    out = section_overrides({"batch_size": 8, "device": None}, ["eval.folds=5", "flip=false"], "eval")
    assert out == {"batch_size": 8, "folds": 5, "flip": False}
