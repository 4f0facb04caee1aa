import os

# Tests never touch the network: a hub id must fail fast and clearly, not hang on a connection.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from ppd_decode.data.tasks import data_root  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests that load the real SmolLM2-135M")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("PPD_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: loads the real SmolLM2-135M; run with --runslow or PPD_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny():
    from ppd_decode.models.loading import load_model

    return load_model("tiny-random")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = data_root()
    if not (root / "README.md").is_file():
        pytest.skip(f"evaluation data not found at {root}: set PPD_DATA to the shared/data folder to run this test")
    return root


@pytest.fixture(scope="session")
def smollm2():
    from ppd_decode.models.loading import load_model

    return load_model("smollm2-135m")


def _devices() -> list[str]:
    # PPD_DEVICE narrows the device tests to one device (scripts/gpu_check.sh sets it to cuda)
    only = os.environ.get("PPD_DEVICE")
    return [only] if only else ["cpu", "cuda"]


@pytest.fixture(params=_devices())
def device(request):
    """Each device the device tests run on: the CPU here, and CUDA where a GPU is present."""
    import torch

    if request.param.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine: the same tests run on a GPU through scripts/gpu_check.sh")
    return torch.device(request.param)
