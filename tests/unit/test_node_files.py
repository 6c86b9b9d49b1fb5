"""The files shipped to the nodes run there as plain scripts: python3 and the standard library, nothing of lab."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from lab.cluster.agents import node_sources


@pytest.mark.parametrize("program", ["agent.py", "updater.py"])
def test_agents_import_their_siblings_as_plain_files(tmp_path, program):
    for path in node_sources():  # exactly what bootstrap copies to /var/lib/lab/
        shutil.copy(path, tmp_path / path.name)
    # -S -E -s: no site-packages (so no lab package), as on a node; the script's folder stays on sys.path.
    result = subprocess.run([sys.executable, "-S", "-E", "-s", str(tmp_path / program)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr  # imports resolved; then the usage error: no config given
    assert result.stderr.strip() == f"usage: {program} CONFIG.json"
