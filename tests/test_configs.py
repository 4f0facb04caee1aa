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
