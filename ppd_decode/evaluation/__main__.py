"""``python -m ppd_decode.evaluation``: the match-rate report (a Hydra app over ``configs/eval.yaml``).

The ``hydra.main`` entry sits here, in the module run as ``__main__``, so that Hydra finds ``configs/`` by this
file's path (from an imported module it would look for a Python package named ``configs``)."""

import hydra
from omegaconf import DictConfig

from ppd_decode.evaluation import report


@hydra.main(config_path="../../configs", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    report.main(cfg)


if __name__ == "__main__":
    main()
