"""The one clock: synchronised with the device on CUDA (before and after the timed block), plain on a CPU."""

import time

import torch

from ppd_decode.runtime import timing


def test_stopwatch_synchronises_cuda_around_the_block_and_not_a_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("sync", str(device))))
    with timing.stopwatch("cpu") as t:
        time.sleep(0.01)
    assert calls == [] and t.seconds >= 0.01
    with timing.stopwatch(torch.device("cuda", 1)) as t:
        calls.append(("work", None))
    assert calls == [("sync", "cuda:1"), ("work", None), ("sync", "cuda:1")] and t.seconds >= 0


def test_every_strategy_result_is_timed_by_the_device_clock(tiny, monkeypatch):
    from ppd_decode.strategies import get_strategy

    model, _ = tiny
    seen = []
    real = timing.stopwatch

    def spy(device=None):
        seen.append(device)
        return real(device)

    monkeypatch.setattr("ppd_decode.strategies.base.stopwatch", spy)
    r = get_strategy("greedy")(model).generate([5, 6, 7], 4)
    assert seen == [model.device] and r.seconds > 0


def test_the_near_tie_threshold_scales_with_the_dtype_resolution():
    from ppd_decode.runtime.exactness import FP32_NEAR_TIE, near_tie_threshold

    assert near_tie_threshold(torch.float32, 25.0) == FP32_NEAR_TIE == near_tie_threshold(torch.float64, 1e3)
    assert near_tie_threshold(torch.bfloat16, 20.0) == 2 * 2 ** -7 * 20  # two units in the last place
    assert near_tie_threshold(torch.float16, -20.0) == 2 * 2 ** -10 * 20
    assert near_tie_threshold(torch.bfloat16, 0.0) == FP32_NEAR_TIE
