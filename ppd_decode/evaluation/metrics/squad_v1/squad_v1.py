"""SQuAD v1.1 exact match and F1, with the official evaluation script's answer normalisation (max over the
reference answers of each question)."""

import collections
import re
import string

import datasets
import evaluate

_KWARGS = """
Args:
    predictions: list of str, one answer per question.
    references: list of list of str, the gold answers of each question.
Returns:
    {"exact_match": 0..100, "f1": 0..100}
"""


def normalize(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1(pred: str, gold: str) -> float:
    p, g = normalize(pred).split(), normalize(gold).split()
    common = collections.Counter(p) & collections.Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


class SquadV1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__, citation="Rajpurkar et al. 2016", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Sequence(datasets.Value("string"))}))

    def _compute(self, predictions, references):
        n = len(predictions)
        em = sum(max(normalize(p) == normalize(g) for g in gs) for p, gs in zip(predictions, references))
        f = sum(max(f1(p, g) for g in gs) for p, gs in zip(predictions, references))
        return {"exact_match": 100 * em / n, "f1": 100 * f / n}
