"""The frozen base model as a feature extractor: one forward gives every requested layer's hidden state.

Forward hooks on the decoder layers collect the outputs; when no final-layer output is needed, the hook of the
deepest requested layer stops the forward there, so the layers above it never run. This composes with the
transformers model's own forward (masks, rotary embeddings) instead of re-implementing it.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class _StopForward(Exception):
    pass


def _layer_output(output):
    return output if torch.is_tensor(output) else output[0]


@contextmanager
def layer_outputs(model, layers, store: dict, stop: bool = False):
    """While open, every forward of ``model`` puts layer ``d``'s output (the hidden state after decoder layer d,
    1-based) in ``store[d]`` for each ``d`` in ``layers``; with ``stop`` the forward ends after the deepest of them
    (``FrozenBackbone`` catches that). The model's own forward runs: masks, caches and rotary embeddings are its."""
    decoder_layers = model.model.layers
    deepest = max(layers)
    handles = []
    for d in layers:
        def hook(_module, _args, output, d=d):
            store[d] = _layer_output(output)
            if stop and d == deepest:
                raise _StopForward
        handles.append(decoder_layers[d - 1].register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


class FrozenBackbone:
    def __init__(self, model, layers: list[int]):
        self.model = model.eval().requires_grad_(False)
        self.layers = sorted(set(layers))
        self.deepest = self.layers[-1]

    def _hooks(self, store: dict, stop: bool):
        return layer_outputs(self.model, self.layers, store, stop)

    @contextmanager
    def _final_state(self, store: dict, on: bool = True):
        """A hook on the final norm that keeps its output (the final normed hidden state) as ``store["h"]``."""
        handle = self.model.model.norm.register_forward_hook(lambda m, a, o: store.setdefault("h", o)) if on else None
        try:
            yield
        finally:
            if handle is not None:
                handle.remove()

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 final_logits: bool = False, final_hidden: bool = False):
        """``({d: hidden [B, T, H]}, logits [B, T, V] or None)``. Without ``final_logits`` only layers 1..deepest run.
        With ``final_hidden`` (which implies the full forward) a third item: the final normed hidden [B, T, H]."""
        store: dict[int, torch.Tensor] = {}
        logits = None
        final = {}
        with self._final_state(final, on=final_hidden), self._hooks(store, stop=not (final_logits or final_hidden)):
            try:
                out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                logits = out.logits if final_logits else None
            except _StopForward:
                pass
        hidden = {d: store[d] for d in self.layers}
        return (hidden, logits, final["h"]) if final_hidden else (hidden, logits)

    @torch.no_grad()
    def with_final_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """``({d: hidden}, final normed hidden [B, T, H])``: the full forward, but the LM head runs on one position
        only (``logits_to_keep=1``), so the caller projects just the positions it scores."""
        store: dict[int, torch.Tensor] = {}
        final = {}
        with self._final_state(final), self._hooks(store, stop=False):
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
        return {d: store[d] for d in self.layers}, final["h"]
