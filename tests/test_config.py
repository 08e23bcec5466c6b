"""Config loading: the shipped configs load; bad values are refused with one line naming the field."""

from __future__ import annotations

import shutil
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


# ------------------------------------------------------------------------------- shipped configs by name (issue 13)
def _dump(cfg: ExperimentConfig) -> dict:
    return cfg.model_dump(mode="json")


def test_configs_in_the_clone_are_the_packaged_ones():
    from digi2real.config import PACKAGED_CONFIGS

    assert CONFIGS.resolve() == PACKAGED_CONFIGS  # configs/ links to src/digi2real/configs (Makefile, documented paths)


@pytest.mark.parametrize("ref,file", [("demo", "demo.yaml"), ("digi2real-20k", "digi2real-20k.yaml"),
                                      ("ablations/t2-alpha-1", "ablations/t2-alpha-1.yaml"),
                                      ("demo.yaml", "demo.yaml"), ("configs/demo.yaml", "demo.yaml")])
def test_a_name_loads_the_shipped_config_from_any_folder(ref, file, tmp_path, monkeypatch):
    from digi2real.config import PlanConfig, load_section

    monkeypatch.chdir(tmp_path)
    assert _dump(load_experiment(ref)) == _dump(load_experiment(CONFIGS / file))
    # Every stage command's --config takes a name too (it loads through load_section).
    assert load_section(PlanConfig, Path(ref), "plan") == load_experiment(CONFIGS / file).plan


def test_an_existing_file_always_wins_over_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").write_text("name: mine\n")
    assert load_experiment("demo").name == "mine"
    (tmp_path / "demo").unlink()
    (tmp_path / "demo").mkdir()  # a folder called demo is not a config: the name still means the shipped one
    assert load_experiment("demo").name == "demo"


def test_an_unknown_name_is_one_line_listing_the_names(tmp_path, monkeypatch, capsys):
    from digi2real.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^demoo: config file not found, and no shipped config has that name; "
                                          r"shipped configs \(`digi2real config list` describes them\): "
                                          r"demo, digi2real-20k, .*ablations/t2-alpha-1"):
        load_experiment("demoo")
    assert main(["run", "demoo", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("digi2real: error: demoo: config file not found")
    assert main(["run", "../configs/../../etc/passwd"]) == 2  # names are looked up, never joined to a path
    assert list(tmp_path.iterdir()) == []


def test_extends_by_name_from_a_users_file(tmp_path):
    (tmp_path / "a1.yaml").write_text("extends: digi2real-20k\nname: a1\nplan: {alpha: 1.0}\n")
    expected = _dump(load_experiment(CONFIGS / "digi2real-20k.yaml", {"name": "a1", "plan.alpha": 1.0}))
    assert _dump(load_experiment(tmp_path / "a1.yaml")) == expected
    # An overlay of an overlay: a shipped ablation by name, itself extending the recipe by name.
    (tmp_path / "t2.yaml").write_text("extends: ablations/t2-alpha-1\nselect: {n: 500}\n")
    cfg = load_experiment(tmp_path / "t2.yaml")
    assert (cfg.name, cfg.plan.alpha, cfg.select.method, cfg.select.n) == ("t2-alpha-1", 1.0, "first", 500)


def test_extends_prefers_a_relative_file_and_keeps_relative_paths(tmp_path):
    (tmp_path / "digi2real-20k.yaml").write_text("name: local\nplan: {alpha: 3.0}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.yaml").write_text("extends: ../digi2real-20k.yaml\n")
    assert load_experiment(tmp_path / "sub" / "x.yaml").plan.alpha == 3.0  # the file beside, not the shipped one
    (tmp_path / "y.yaml").write_text("extends: digi2real-20k.yaml\n")
    assert load_experiment(tmp_path / "y.yaml").name == "local"
    # A file never extends itself: a local copy named like the recipe can still build on the shipped recipe.
    (tmp_path / "digi2real-20k.yaml").write_text("extends: digi2real-20k.yaml\nplan: {alpha: 3.0}\n")
    cfg = load_experiment(tmp_path / "digi2real-20k.yaml")
    assert (cfg.name, cfg.plan.alpha, cfg.select.n) == ("digi2real-20k", 3.0, 20000)


def test_extends_an_unknown_name_says_what_exists(tmp_path):
    (tmp_path / "x.yaml").write_text("extends: digi2real-30k\n")
    with pytest.raises(ConfigError, match=r"x\.yaml: extends 'digi2real-30k', but .*digi2real-30k does not exist "
                                          r"and no shipped config has that name; shipped configs .*: "
                                          r"demo, digi2real-20k"):
        load_experiment(tmp_path / "x.yaml")


def test_relative_data_paths_of_a_shipped_config_are_the_working_folders(tmp_path, monkeypatch):
    """A user's file finds its data beside it; a shipped config's relative paths are the user's, never the package's
    (a `data/digiface` next to the installed configs must not be picked up)."""
    import digi2real.config as config

    shipped = tmp_path / "package" / "configs"
    shutil.copytree(CONFIGS, shipped)
    (shipped / "data" / "digiface").mkdir(parents=True)
    monkeypatch.setattr(config, "PACKAGED_CONFIGS", shipped.resolve())
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cfg = load_experiment("digi2real-20k")
    assert (cfg.source.path, cfg.output_dir) == (Path("data/digiface"), Path("runs/digi2real-20k"))
    user = tmp_path / "user"
    (user / "data" / "digiface").mkdir(parents=True)
    shutil.copy(CONFIGS / "digi2real-20k.yaml", user / "mine.yaml")
    assert load_experiment(user / "mine.yaml").source.path == user / "data" / "digiface"


def test_config_list_names_and_describes_every_shipped_config(capsys):
    from digi2real.cli import main
    from digi2real.config import packaged_configs

    assert main(["config", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    assert names == list(packaged_configs()) and {"demo", "digi2real-20k", "ablations/t2-alpha-1"} <= set(names)
    for line in lines:  # each description is the config's whole first comment line, a sentence
        assert line.rstrip().endswith((".", ")")) and len(line.split()) > 4, line


def test_config_show_prints_and_writes_copies_that_load_anywhere(tmp_path, monkeypatch, capsys):
    from digi2real.cli import main
    from digi2real.config import packaged_configs

    monkeypatch.chdir(tmp_path)
    for name, path in packaged_configs().items():
        assert main(["config", "show", name]) == 0
        assert capsys.readouterr().out == path.read_text()
        out = tmp_path / (name.replace("/", "-") + ".yaml")
        assert main(["config", "show", name, "-o", str(out)]) == 0
        assert capsys.readouterr().out.startswith(f"wrote {name} to {out}")
        assert out.read_bytes() == path.read_bytes()
        assert _dump(load_experiment(out)) == _dump(load_experiment(name)), name  # `extends:` still resolves


def test_config_show_keeps_an_existing_file_unless_forced(tmp_path, capsys):
    from digi2real.cli import main

    mine = tmp_path / "mine.yaml"
    mine.write_text("name: my-edits\n")
    assert main(["config", "show", "demo", "-o", str(mine)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and "--force" in err
    assert mine.read_text() == "name: my-edits\n"
    assert main(["config", "show", "nope", "-o", str(tmp_path / "new.yaml")]) == 2
    assert not (tmp_path / "new.yaml").exists() and "digi2real config list" in capsys.readouterr().err
    assert main(["config", "show", "demo", "-o", str(mine), "--force"]) == 0
    assert mine.read_bytes() == (CONFIGS / "demo.yaml").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.yaml"]  # no temporary left behind
