"""Learners. Importing this package registers every learner in `ALGOS`."""

from offlab.algos.base import ALGOS, Algorithm, LearnerSpec, get_algo, register

__all__ = ["ALGOS", "Algorithm", "LearnerSpec", "get_algo", "register"]
