"""Off-policy evaluation: FQE, the importance-sampling family, doubly robust, model-based OPE, and their
validation against simulator truth (METRICS.md Part B).

    from offlab.evaluation.ope import estimate, log_estimates
    result = estimate(learner, "hopper-medium", "fqe,wpdis,wdr,mb")   # JSON-ready dict
    log_estimates(run_id, result)                                       # ope/<estimator> metrics on the run

One module per estimator family (fqe, importance, doubly_robust, model_based), sharing the target-policy
interface (policy), the episode view (episodes), the behaviour density (behavior) and the dynamics
ensemble (offlab.dynamics); `runner.estimate` runs them, `validate` scores them against truth (truth).
"""

from offlab.evaluation.ope.behavior import BehaviorConfig, fit_behavior
from offlab.evaluation.ope.fqe import FQE, FQEConfig
from offlab.evaluation.ope.model_based import ModelBasedConfig, model_based_estimate
from offlab.evaluation.ope.policy import TargetPolicy, as_target_policy
from offlab.evaluation.ope.runner import (
    DEFAULT_ESTIMATORS,
    DEFAULT_GAMMA,
    ESTIMATORS,
    SharedFits,
    estimate,
    log_estimates,
    metric_values,
    parse_estimators,
)
from offlab.evaluation.ope.truth import monte_carlo
from offlab.evaluation.ope.validate import dope_metrics, load_suite, validate_suite

__all__ = [
    "DEFAULT_ESTIMATORS", "DEFAULT_GAMMA", "ESTIMATORS", "FQE", "BehaviorConfig", "FQEConfig", "ModelBasedConfig",
    "SharedFits", "TargetPolicy", "as_target_policy", "dope_metrics", "estimate", "fit_behavior", "load_suite",
    "log_estimates", "metric_values", "model_based_estimate", "monte_carlo", "parse_estimators", "validate_suite",
]
