"""ROUGE-1/2/L F-measure (rouge_score, with stemming), averaged over documents, on a 0..100 scale."""

import datasets
import evaluate

_KWARGS = """
Args:
    predictions: list of str (summaries); references: list of str (reference highlights).
Returns:
    {"rouge1": .., "rouge2": .., "rougeL": ..}
"""


class RougeScores(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__, citation="Lin 2004", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references):
        from rouge_score import rouge_scorer

        kinds = ["rouge1", "rouge2", "rougeL"]
        scorer = rouge_scorer.RougeScorer(kinds, use_stemmer=True)
        scores = [scorer.score(r, p) for p, r in zip(predictions, references)]
        n = max(1, len(scores))
        return {k: 100 * sum(s[k].fmeasure for s in scores) / n for k in kinds}
