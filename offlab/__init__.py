"""offlab: offline-RL datasets, quality metrics, learners, off-policy evaluation and MLflow tracking."""

__version__ = "0.1.0"

from offlab.data.schema import Dataset, DatasetCard  # noqa: E402
from offlab.data.store import Transitions, delete_dataset, load_dataset, write_dataset  # noqa: E402
from offlab.errors import (  # noqa: E402
    ConfigError,
    DatasetExists,
    DatasetNotFound,
    DataValidationError,
    EnvError,
    OfflabError,
    PolicyError,
    SourceUnavailable,
    TrackingError,
)

__all__ = [
    "ConfigError",
    "DataValidationError",
    "Dataset",
    "DatasetCard",
    "DatasetExists",
    "DatasetNotFound",
    "EnvError",
    "OfflabError",
    "PolicyError",
    "SourceUnavailable",
    "TrackingError",
    "Transitions",
    "__version__",
    "delete_dataset",
    "load_dataset",
    "write_dataset",
]
