"""offlab: offline-RL datasets, quality metrics, learners, off-policy evaluation and MLflow tracking."""

__version__ = "0.1.0"

from offlab.data.schema import Dataset, DatasetCard  # noqa: E402
from offlab.data.store import Transitions, delete_dataset, load_dataset, write_dataset  # noqa: E402
from offlab.errors import OfflabError  # noqa: E402

__all__ = [
    "Dataset",
    "DatasetCard",
    "OfflabError",
    "Transitions",
    "__version__",
    "delete_dataset",
    "load_dataset",
    "write_dataset",
]
