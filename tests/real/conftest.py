"""Real tests: they boot nspawn nodes (tests/real/nodes, tests/real/images) or
VMs and Vagrant itself (tests/real/vm). The markers are set here, in one
place, from the folder a test lives in, so `pytest -m "not nodes and not vm"`
(the fast tier) is exactly tests/unit/.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REAL = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(str(item.fspath)).resolve()
        if REAL not in path.parents:
            continue
        folder = path.relative_to(REAL).parts[0]
        item.add_marker(pytest.mark.vm if folder == "vm" else pytest.mark.nodes)
