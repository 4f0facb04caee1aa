"""Every key in configs/ exists in the code it configures, and the code's defaults are the YAML's."""

import dataclasses
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from ppd_train.config import SCHEMA, typed
from ppd_train.data import DataConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _defaults(cls) -> dict:
    return {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
            for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("group", sorted(SCHEMA))
def test_train_yaml_equals_the_schema_defaults(group):
    assert _yaml(CONFIGS / "train.yaml")[group] == _defaults(SCHEMA[group])


@pytest.mark.parametrize("path", sorted((CONFIGS / "experiment").glob("*.yaml")), ids=lambda p: p.stem)
def test_experiment_keys_exist_in_the_schema(path):
    exp = _yaml(path)
    for group, schema in SCHEMA.items():
        unknown = set(exp.get(group) or {}) - {f.name for f in dataclasses.fields(schema)}
        assert not unknown, f"{path.name}: {group}.{sorted(unknown)} configure nothing"
    unknown = set(exp.get("data") or {}) - {f.name for f in dataclasses.fields(DataConfig)}
    assert not unknown, f"{path.name}: data.{sorted(unknown)} configure nothing"


def test_unknown_training_keys_are_refused():
    cfg = OmegaConf.create({"head": {"layers": [3], "projecton": "own"}, "trainer": {}, "wandb": {}})
    with pytest.raises(Exception, match="projecton"):
        typed(cfg)


def test_data_yaml_matches_data_config():
    base = _yaml(CONFIGS / "data" / "dolly.yaml")
    assert dataclasses.asdict(DataConfig.from_cfg(base)) == dataclasses.asdict(DataConfig())
    for path in sorted((CONFIGS / "data").glob("*.yaml")):
        merged = {**base, **{k: v for k, v in _yaml(path).items() if k != "defaults"}}
        merged["self_distill"] = {**base["self_distill"], **(_yaml(path).get("self_distill") or {})}
        DataConfig.from_cfg(merged)  # an unknown key raises TypeError


def test_every_decoding_row_names_a_method_and_its_fields():
    from ppd_decode.strategies.configs import load_rows, make_row

    table = load_rows()
    for name, spec in table.items():
        make_row(name, spec)  # an unknown method or field raises
    assert set(_yaml(CONFIGS / "demo.yaml")["methods"]) <= set(table)


def test_decoding_overrides_change_a_row_or_add_one():
    from ppd_decode.errors import PPDError
    from ppd_decode.strategies.configs import rows

    ppd, new = rows(["ppd", "d15"], ["decode.ppd.k=2", "decode.d15.method=ppd", "decode.d15.layer=15"], layer=13)
    assert (ppd.config.k, ppd.config.layer, new.config.layer, new.cls.name) == (2, 13, 15, "ppd")
    tree = rows(["tree_static"], ["decode.tree_static.branching=[3,1]"])[0]
    assert tree.config.branching == (3, 1) and tree.label == "branching=(3, 1)"
    with pytest.raises(PPDError, match=r"config has no field 'kk' \(it has: layer, k"):
        rows(["ppd"], ["decode.ppd.kk=2"])


def test_the_demo_reads_the_decoding_rows_with_hydra_overrides():
    from hydra import compose, initialize_config_dir

    from ppd_decode.strategies.configs import rows

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="demo", overrides=["++decode.ppd.k=2", "+decode.ppd15.method=ppd"])
    table = OmegaConf.to_container(cfg.decode, resolve=True)
    ppd, ppd15 = rows(["ppd", "ppd15"], base=table, layer=15)
    assert (ppd.config.k, ppd15.cls.name, ppd15.config.layer) == (2, "ppd", 15)
    assert list(cfg.methods)[0] == "greedy"
    assert rows(["ppd"], ["++decode.ppd.k=2"])[0].config.k == 2  # the CLI and the benchmark take the same form


@pytest.mark.parametrize("module, key", [("ppd_decode.evaluation", "lens_layers"), ("ppd_decode.apps.demo", "methods"),
                                         ("ppd_train", "head")])
def test_the_hydra_apps_find_their_configs(module, key):
    """Each app's documented entry point composes its config (Hydra resolves config_path from the __main__ file)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", module, "--cfg", "job"], capture_output=True, text=True, timeout=300,
                         cwd=CONFIGS.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"\n{key}:" in "\n" + out.stdout
