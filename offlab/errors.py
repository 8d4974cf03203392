"""User-facing errors: every problem a user can fix is an `OfflabError` with a one-line message.

Our exception hierarchy:

    OfflabError                     anything the user can fix; the CLI prints it and exits 2
    ├── DatasetNotFound             a name that is neither in the catalog nor on disk
    ├── DatasetExists               writing over an existing dataset without --overwrite
    ├── DataValidationError         data that breaks the trajectory schema (NaN, order, widths...)
    ├── SourceUnavailable           a source that cannot be reached here (Minari hub, missing file)
    ├── EnvError                    an env id that is not installed, or shapes that do not match it
    ├── ConfigError                 a bad config file, --set key or value, unknown learner
    ├── PolicyError                 a policy file that cannot be loaded or does not fit the env
    └── TrackingError               an unreachable or inconsistent MLflow tracking store

Internal bugs are not OfflabErrors: they keep their traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class OfflabError(Exception):
    """A problem the user can fix. The message is one line naming what failed and the fix."""


class DatasetNotFound(OfflabError):
    """A dataset name that is neither in the catalog nor in the local cache."""


class DatasetExists(OfflabError):
    """A write would replace an existing dataset and --overwrite was not given."""


class DataValidationError(OfflabError):
    """Data that breaks the trajectory schema."""


class SourceUnavailable(OfflabError):
    """A data source that cannot be read here: a missing file, or a hub with no network."""


class EnvError(OfflabError):
    """An env id that is not installed, or data whose shapes do not match the env."""


class ConfigError(OfflabError):
    """A bad config: unknown key, wrong type, unparsable file, unknown learner."""


class PolicyError(OfflabError):
    """A policy that cannot be loaded or does not fit the env."""


class TrackingError(OfflabError):
    """An MLflow tracking store that cannot be reached or holds something unexpected."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' did you mean 'x'?' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""
