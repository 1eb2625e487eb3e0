"""A pytest plugin for mutation runs (pyproject.toml, [tool.mutmut]): the tests a mutant
runs go in the suite's own order, the order `scripts/test` runs and CI checks.

mutmut passes them in the order of a Python set, which changes with each run's hash seed.
A test that fails after some other test but not alone (as one did at commit cd0a332) then
fails in some runs and not in others, each time counting as a kill for the mutant.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: (*item.location[:2], item.nodeid))  # file, line, parameters
