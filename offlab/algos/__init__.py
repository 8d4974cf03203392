"""Learners. Importing this package registers every learner in `ALGOS`."""

import offlab.algos.bc  # noqa: E402, F401
from offlab.algos.base import ALGOS, Algorithm, LearnerSpec, get_algo, register
from offlab.algos.iql import IQL  # noqa: E402
from offlab.algos.prdc import PRDC  # noqa: E402
from offlab.algos.td3bc import TD3BC  # noqa: E402

__all__ = ["ALGOS", "IQL", "PRDC", "TD3BC", "Algorithm", "LearnerSpec", "get_algo", "register"]
