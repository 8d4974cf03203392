"""Policy evaluation: rollouts in the real simulator (`online`); off-policy estimators arrive in `ope`."""

from offlab.evaluation.online import EvalResult, Evaluator, evaluate_policy

__all__ = ["EvalResult", "Evaluator", "evaluate_policy"]
