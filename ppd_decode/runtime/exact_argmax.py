"""The final layer's greedy token without reading the whole fp32 LM head: an exact argmax.

On a CPU, one decoding step's LM head (vocabulary x hidden, fp32) is a matrix-vector product bound by memory, and
on a small model with a large vocabulary a sizeable share of a step. Greedy decoding needs only its argmax, so:

1. **Screen** with a half-size copy of the matrix, giving approximate logits ``a`` at a fraction of the cost: bf16
   packed once for oneDNN where it runs bf16 (fp32 accumulation), else unpacked fp16 for one or two rows and bf16
   for more (whichever AVX-512 CPUs run faster at that shape).
2. Every approximate logit is within ``beta`` of the exact one (a rigorous bound from the rounding of the matrix,
   the hidden state, the fp32 accumulation and the output). Only tokens whose ``a`` is within ``2 beta`` (plus the
   fp32 rounding ``2 gamma``) of the best can be the argmax of the fp32 head: usually one or two.
3. **Rescore** those candidates in fp32. If the best beats every other candidate by more than their fp32 rounding
   bounds, it is the token the full fp32 head picks (whatever order its sums run in); otherwise (a near-tie, or
   anything not finite) the row falls back to the model's own ``lm_head`` on that one row, as ``generate`` does.

So the result is token-identical to ``lm_head(h).argmax(-1)``; the tests check the bound against float64 and the
tokens against the plain head. The screen is used only where it pays (fp32 weights on a CPU); elsewhere
``ExactArgmax`` is the plain argmax. The low-precision kernels must accumulate in fp32, which PyTorch guarantees on
the CPU unless ``torch._C._set_cpu_allow_fp16_reduced_precision_reduction(True)`` was called (then: plain argmax).
"""

from __future__ import annotations

import torch

from ppd_decode.models.packed_linear import switched_on, weight_key

_U32 = 2.0 ** -24  # unit roundoff of fp32
_UNIT = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
_FP16_MAX_ROWS = 2  # unpacked, fp16 is the faster screen up to here on AVX-512 CPUs and bf16 beyond: fp16 has
#                     no matrix kernel there, so its cost grows with the rows


def _fp16_reduction_is_exact() -> bool:
    get = getattr(torch._C, "_get_cpu_allow_fp16_reduced_precision_reduction", None)
    return get is None or not get()


class ExactArgmax:
    """``argmax(h)``: the argmax over the vocabulary of ``lm_head(h)`` for final-normed hidden states ``h`` [..., H],
    as a LongTensor [...], computed as described above."""

    def __init__(self, lm_head: torch.nn.Linear):
        self.lm_head = lm_head
        w = lm_head.weight.detach()
        self.screens = w.device.type == "cpu" and w.dtype == torch.float32 and lm_head.bias is None \
            and _fp16_reduction_is_exact()
        self.fallbacks = 0  # rows that needed the full head (near-ties): for tests and curiosity
        if not self.screens:
            return
        self.w = w
        ku = w.shape[1] * _U32
        self.dot_rounding = ku / (1 - ku)  # |fl32(x . y) - x . y| <= this * sum_j |x_j y_j| (any summation order)
        w64 = w.double()
        self.low, self.err, self.norm = {}, {}, {}
        for dt in _UNIT:
            lo = w.to(dt)
            self.low[dt] = lo
            # the largest ||W_i - lo(W_i)|| and ||lo(W_i)|| over the vocabulary (one scalar bound for all rows)
            self.err[dt] = float((w64 - lo.double()).norm(dim=1).max())
            self.norm[dt] = float(lo.double().norm(dim=1).max())
        self.w_norm = float(w64.norm(dim=1).max())

    def gamma(self, h_norm: torch.Tensor) -> torch.Tensor:
        """Bound on |fl32(h . W_i) - h . W_i| for every i: K u / (1 - K u) * ||h|| * max ||W_i||."""
        return self.dot_rounding * h_norm * self.w_norm

    def _packed_bf16(self):
        """The bf16 screen packed once for oneDNN (like the decoder's matmuls, packed_linear.py), or None where oneDNN
        cannot or may not; packed, it is cheaper than either unpacked screen at every row count. oneDNN accumulates
        bf16 products in fp32 by default (its "strict" accumulation mode), which the bound needs."""
        if "_packed" not in self.__dict__:
            self._packed = None
            if switched_on() and torch.backends.mkldnn.is_available():
                try:
                    self._packed = torch.ops.mkldnn._reorder_linear_weight(self.low[torch.bfloat16], 4)
                except (AttributeError, RuntimeError):  # no bf16 kernels on this CPU, or an older torch
                    pass
        return self._packed

    def __getstate__(self):
        state = dict(self.__dict__)  # oneDNN's packed tensors do not pickle (PPD sends the model to its workers)
        state.pop("_packed", None)
        return state

    def screen(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Approximate logits [R, V] (as fp32) and, per row, ``beta`` [R]: |a_i - h . W_i| <= beta for every i."""
        packed = self._packed_bf16()
        if packed is not None:
            dt = torch.bfloat16
            h_lo = h.to(dt)
            a = torch.ops.mkldnn._linear_pointwise(h_lo, packed, None, "none", [], "").float()
        else:
            dt = torch.float16 if h.shape[0] <= _FP16_MAX_ROWS else torch.bfloat16
            h_lo = h.to(dt)
            a = (h_lo @ self.low[dt].T).float()
        h_norm = h.double().norm(dim=1)
        dh = (h.double() - h_lo.double()).norm(dim=1)
        beta = (h_norm * self.err[dt]  # the matrix's rounding, seen by the exact h
                + dh * self.norm[dt]  # the hidden state's rounding
                + self.dot_rounding * h_lo.double().norm(dim=1) * self.norm[dt]  # fp32 accumulation
                + _UNIT[dt] * a.abs().amax(dim=1).double())  # the low-precision output's rounding
        return a, beta.float()

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if not self.screens:
            return self.lm_head(h).argmax(-1)
        shape = h.shape[:-1]
        flat = h.reshape(-1, h.shape[-1])
        a, beta = self.screen(flat)
        g = self.gamma(flat.double().norm(dim=1)).float()
        # every token that could be the fp32 head's argmax (its exact logit within 2 gamma of the top)
        floor = a.amax(dim=1) - 2 * beta - 2 * g
        out = torch.empty(flat.shape[0], dtype=torch.long, device=h.device)
        for r in range(flat.shape[0]):
            cand = (a[r] >= floor[r]).nonzero()[:, 0]
            if len(cand) and torch.isfinite(a[r, cand]).all() and torch.isfinite(floor[r]):
                if len(cand) == 1:
                    out[r] = cand[0]
                    continue
                rows = self.w.index_select(0, cand)
                exact = rows @ flat[r]
                # each candidate's own fp32 rounding bound, K u sum_j |h_j W_ij| (that sum slightly inflated for
                # its own rounding): the fp32 head's logit f_i lies within 2 g_i of the rescored one
                g_i = self.dot_rounding * (1 + 2 * self.dot_rounding) * (rows.abs() @ flat[r].abs())
                best = int(exact.argmax())
                lo_best = exact[best] - 2 * g_i[best]
                hi_rest = exact + 2 * g_i
                hi_rest[best] = -float("inf")
                if bool(lo_best > hi_rest.max()):
                    out[r] = cand[best]
                    continue
            self.fallbacks += 1  # a near-tie: the full head on this row, as generate computes it
            out[r] = self.lm_head(flat[r][None, None]).argmax(-1).reshape(())
        return out.reshape(shape)


def exact_argmax(model) -> ExactArgmax:
    """The model's ``ExactArgmax``, built once (the half-size copies take a second) and kept on the model."""
    head = model.lm_head
    cached = getattr(model, "_ppd_exact_argmax", None)
    key = (id(head), *weight_key(head.weight))  # rebuilt if the weights were replaced or edited
    if cached is None or cached[0] != key:
        cached = (key, ExactArgmax(head))
        model._ppd_exact_argmax = cached
    return cached[1]
