"""Every decoding method and the PPD engine on each device (the ``device`` fixture: the CPU here, CUDA on a GPU),
token for token against ``generate(do_sample=False)`` on the same device in fp32 (TF32 off). A mismatch fails
unless the reference's top-two logit gap at the first differing position is a near-tie (below 1e-4)."""

import pytest
import torch

from ppd_decode import load_model
from ppd_decode.models.heads import EarlyExitHead
from ppd_decode.runtime.exactness import is_near_tie
from ppd_decode.strategies import REGISTRY, get_strategy
from ppd_decode.strategies.ppd import PPDConfig, PPDEngine

PROMPTS = [[5, 6, 7, 8], list(range(40, 70)), [9, 8, 7, 6] * 5]


@pytest.fixture
def on(device):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model, _ = load_model("tiny-random:layers=4,seed=3", dtype="float32", device=device)
    g = torch.Generator().manual_seed(0)
    heads = {}
    for d in (1, 2, 3):
        h = EarlyExitHead.from_model(model, d)
        with torch.no_grad():
            h.lm_head.weight.add_(torch.randn(h.lm_head.weight.shape, generator=g).to(device) * 0.05)
        heads[d] = h
    return model, heads


def reference(model, prompt, n):
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=model.generation_config.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def assert_greedy(model, prompt, got, ref):
    if got == ref:
        return
    pos = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
    assert pos < len(ref), f"stopped after {pos} tokens where greedy goes on"
    tie, gap = is_near_tie(model, prompt, ref, pos)
    assert tie, f"differs from greedy at position {pos} where the top-two gap is {gap:.2e}: a bug"


# On the CPU, test_strategies.py covers every method (float64, hypothesis); here two keep the device path alive.
CPU_SMOKE = ("greedy", "self_speculative")


@pytest.mark.parametrize("name", sorted(n for n, c in REGISTRY.items() if not c.spawns_workers))
def test_every_in_process_strategy_is_greedy_on_the_device(on, device, name):
    if device.type == "cpu" and name not in CPU_SMOKE:
        pytest.skip("on the CPU test_strategies.py covers it; on a GPU it runs here (scripts/gpu_check.sh)")
    model, heads = on
    cls = get_strategy(name)
    config = cls.Config()
    if hasattr(config, "layer"):
        config.layer = 2
    s = cls(model, config=config, heads=heads if cls.needs_heads else None)
    for prompt in PROMPTS:
        assert_greedy(model, prompt, s.generate(prompt, 24).tokens, reference(model, prompt, 24))


def test_the_ppd_engine_is_greedy_on_the_device(on, device):
    """One device: both stages on it (on a GPU, two processes sharing it); two GPUs: one stage on each, NCCL."""
    model, heads = on
    placements = [(str(device), str(device))]
    if device.type == "cuda" and torch.cuda.device_count() > 1:
        placements.append(("cuda:0", "cuda:1"))
    for a, b in placements:
        with PPDEngine(model, heads[2], PPDConfig(k=3, device_a=a, device_b=b)) as eng:
            for prompt in PROMPTS:
                r = eng.generate(prompt, 24)
                assert r.stats.fallback is None, r.stats.fallback
                assert_greedy(model, prompt, r.tokens, reference(model, prompt, 24))
