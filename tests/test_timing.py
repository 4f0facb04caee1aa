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
