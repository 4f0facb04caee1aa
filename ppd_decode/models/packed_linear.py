"""Decoder-layer matmuls on a CPU with weights packed once for oneDNN, inside ppd's own stack only.

On a CPU, ``nn.Linear`` hands MKL a row-major weight on every call. For one row MKL runs a matrix-vector product that
streams the weight; for 2-16 rows it re-packs the weight into its kernel's layout on every call, so a verification
block costs well over a one-row step. Packing each weight once into oneDNN's blocked layout (what inductor's weight
freezing and IPEX's ``optimize`` do) removes that re-packing (measured by ``scripts/bench_matmul.py``; the numbers
are in the README's results). Speculative methods gain twice: every step is cheaper, and checking several drafted tokens costs
about what one token does.

Scoped: ``packed_linears(model)`` turns the packed path on for the calling thread while ppd's stack runs layers
(``stack.run_layers``, ``stack.prefill``) and while self-distillation generates training answers; outside it every
linear is the model's own (``model.generate`` as loaded, the benchmark's baselines). The packed copies cost as much
memory as the decoder's weights; they are made on first use per layer (a PPD stage packs only its own layers) and
remade if a weight changes. Results are fp32, accumulated in another order than MKL's (differences of a few units in
the last place, as between any two block sizes), so decoding stays exact in the sense every method here is tested
for: token-identical to ``generate``, near-ties counted.

Used only for fp32 weights on a CPU with oneDNN at full fp32 precision (not where torch lets oneDNN round fp32
matmuls to bf16 or tf32), without autograd; ``PPD_PACKED_LINEAR=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch
from torch import nn

_local = threading.local()
_PACK_ROWS = 4  # oneDNN's batch hint when packing: measured equally fast for 1-16 rows (a pack for 1 row is not)


def _full_fp32() -> bool:
    # torch lets oneDNN compute fp32 matmuls in bf16 or tf32 when asked (torch.backends.mkldnn.matmul.fp32_precision):
    # not exact enough for greedy decoding, so then the model's own linears run
    precision = getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", "none")
    return precision in ("none", "ieee")


def switched_on() -> bool:
    """``PPD_PACKED_LINEAR`` is not 0 (the switch for every packed copy ppd makes, the LM-head screen's included)."""
    return os.environ.get("PPD_PACKED_LINEAR", "1") != "0"


def available(model) -> bool:
    """Whether ``model``'s decoder runs packed here: fp32 on a CPU with oneDNN at full fp32 precision, not turned
    off."""
    if not switched_on() or not _full_fp32():
        return False
    p = next(model.parameters())
    return (p.device.type == "cpu" and p.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def weight_key(weight: torch.Tensor) -> tuple:
    """What changes when a weight is replaced or edited in place: its storage and its version counter."""
    try:
        version = weight._version
    except RuntimeError:  # made under torch.inference_mode(): no version counter (nor edited in place)
        version = 0
    return weight.data_ptr(), version


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters, same state dict) that, inside ``packed_linears``, multiplies with a oneDNN
    packed copy of its weight. Modules become this class by ``__class__`` assignment: nothing is copied or re-created."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not getattr(_local, "on", False) or (torch.is_grad_enabled() and self.weight.requires_grad):
            return super().forward(x)
        key = weight_key(self.weight)
        packed = self.__dict__.get("_ppd_packed")
        if packed is None or packed[0] != key:
            packed = (key, torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), _PACK_ROWS))
            self.__dict__["_ppd_packed"] = packed  # not a buffer: the state dict stays the model's own
        return torch.ops.mkldnn._linear_pointwise(x, packed[1], self.bias, "none", [], "")

    def __getstate__(self):
        # oneDNN's packed tensors cannot be pickled (PPD sends the model to its worker processes) nor deep-copied:
        # leave them behind, to be packed again on first use
        state = dict(self.__dict__)
        state.pop("_ppd_packed", None)
        return state


def _install(model) -> None:
    for layer in model.model.layers:
        for mod in layer.modules():
            if type(mod) is nn.Linear:
                mod.__class__ = PackedLinear


@contextlib.contextmanager
def packed_linears(model):
    """Run ``model``'s decoder-layer linears packed (see above) in this thread, where ``available``."""
    if getattr(_local, "on", False) or getattr(_local, "off", False) or not available(model):
        yield
        return
    if not getattr(model, "_ppd_packed_installed", False):
        _install(model)
        model._ppd_packed_installed = True
    _local.on = True
    try:
        yield
    finally:
        _local.on = False


@contextlib.contextmanager
def unpacked():
    """The model's own linears in this thread, ppd's stack included: for timing what ``generate`` runs (the latency
    model's greedy step) with the stack's own code."""
    old = getattr(_local, "off", False), getattr(_local, "on", False)
    _local.off, _local.on = True, False
    try:
        yield
    finally:
        _local.off, _local.on = old
