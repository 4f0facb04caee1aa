"""Corpus BLEU with sacrebleu's default settings (13a tokenisation), one reference per sentence."""

import datasets
import evaluate

_KWARGS = """
Args:
    predictions: list of str (translations); references: list of str (one reference each).
Returns:
    {"bleu": 0..100, "signature": sacrebleu's signature}
"""


class SacrebleuBleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__, citation="Post 2018", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references):
        import sacrebleu

        bleu = sacrebleu.BLEU()
        score = bleu.corpus_score(predictions, [references])
        return {"bleu": score.score, "signature": str(bleu.get_signature())}
