"""Match rate p_k: the fraction of positions where the final layer's greedy token (reference) is among an early
head's top-k tokens (prediction: the head's tokens ranked best first). The ppd definition, see docs/method.md."""

import datasets
import evaluate

_DESCRIPTION = __doc__
_KWARGS = """
Args:
    predictions: list of lists of int, a head's top tokens at each position, best first (at least max(k) of them).
    references: list of int, the final layer's argmax at the same positions.
    k: list of int, the k values to report (default [1, 2, 3, 5, 10]).
Returns:
    {"p@1": ..., "p@2": ..., "positions": n}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class MatchRate(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("int64")),
                                        "references": datasets.Value("int64")}))

    def _compute(self, predictions, references, k=(1, 2, 3, 5, 10)):
        n = len(references)
        short = [i for i, p in enumerate(predictions) if len(p) < max(k)]
        if short:
            raise ValueError(f"prediction {short[0]} ranks {len(predictions[short[0]])} tokens, fewer than k={max(k)}")
        out = {f"p@{kk}": (sum(r in p[:kk] for p, r in zip(predictions, references)) / n if n else float("nan"))
               for kk in k}
        out["positions"] = n
        return out
