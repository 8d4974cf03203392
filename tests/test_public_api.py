"""offlab's public API is exactly `offlab.__all__` (as httpx's test_exported_members.py checks its own)."""

from __future__ import annotations

import inspect
import subprocess
import sys

import offlab


def public_members(module) -> set[str]:
    """Names a user can reach on the package that are neither private nor submodules."""
    return {
        name for name, value in vars(module).items()
        if (not name.startswith("_") or name == "__version__") and not inspect.ismodule(value)
    }


def test_all_equals_the_public_members():
    assert len(offlab.__all__) == len(set(offlab.__all__))
    assert set(offlab.__all__) == public_members(offlab)


def test_every_exported_name_resolves_and_is_documented():
    for name in offlab.__all__:
        value = getattr(offlab, name)
        if name != "__version__":
            assert inspect.getdoc(value), f"offlab.{name} has no docstring"
    assert issubclass(offlab.OfflabError, Exception)


def test_importing_offlab_does_not_import_torch():
    """`offlab data ...` commands start without torch (seconds saved on every call); Transitions imports it."""
    code = "import sys, offlab; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
