"""``python -m ppd_train`` / ``torchrun --nproc_per_node=N -m ppd_train head.layers=[15]``: the Hydra app."""

import hydra
from omegaconf import DictConfig

from .trainer import train  # also registers the config resolvers


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    train(cfg, run_dir=HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
