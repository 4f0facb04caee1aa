"""``python -m ppd_decode.evaluation``: the match-rate report (a Hydra app over ``configs/eval.yaml``)."""

from ppd_decode.evaluation.report import main

main()
