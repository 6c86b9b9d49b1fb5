"""A checkout turned CRLF (a Windows clone with core.autocrlf=true, say, shared into WSL2, that did not
honour .gitattributes) still boots a lab, and what it ships to the node is LF: the agents' code, their
units, and a unit `lab unit start` sends. The lab runs from that copy (`PYTHONPATH`), as root, on nspawn.
(Each shipping point alone, image builds included: tests/unit/test_line_endings.py.)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab.testing.crlf import crlf_copy as copy_as_crlf

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("systemd-nspawn") is None,
                                reason="needs root and systemd-nspawn")

REPO = Path(__file__).resolve().parents[3]
UNIT = "hello.service"


def crlf_copy(source: Path, target: Path) -> None:
    """As git converts a checkout: every file without a NUL byte is text."""
    copy_as_crlf(source, target, lambda data: b"\0" not in data)


@pytest.fixture(scope="module")
def crlf_lab(tmp_path_factory):
    from lab.images.build import build_image

    # Built from this checkout; the CRLF copy names the same image, since keys hash recipes as LF.
    build_image("labos", "1")
    root = tmp_path_factory.mktemp("crlf")
    checkout = root / "checkout"
    for name in ("lab", "boxes", "scenarios", "Vagrantfile.j2"):
        crlf_copy(REPO / name, checkout / name)
    project = root / "project"
    project.mkdir()
    crlf_copy(REPO / "scenarios" / "first-look" / UNIT, project / UNIT)
    env = {**os.environ, "PYTHONPATH": str(checkout), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("LAB_FILE", None)

    def lab(*args: str, timeout: float = 300) -> str:
        result = subprocess.run([sys.executable, "-m", "lab.cli", *args], cwd=project, env=env,
                                capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0 and "Traceback" not in result.stderr, \
            f"lab {' '.join(args)}: {result.stdout[-2000:]}{result.stderr[-3000:]}"
        return result.stdout

    where = subprocess.run([sys.executable, "-c", "import lab; print(lab.__file__)"], cwd=project, env=env,
                           capture_output=True, text=True, timeout=60, check=True).stdout
    assert where.startswith(str(checkout)), where  # the CRLF copy runs, not this checkout
    try:
        lab("up", "--nodes", "1", "--provider", "nspawn", "--name", "crlf", timeout=600)
        yield lab
    finally:
        subprocess.run([sys.executable, "-m", "lab.cli", "destroy", "--name", "crlf"], cwd=project, env=env,
                       capture_output=True, timeout=300)


def node_sha256(lab, *paths: str) -> dict[str, str]:
    lines = lab("exec", "--name", "crlf", "--", "sha256sum", *paths).splitlines()
    return {line.split()[-1]: line.split()[-2] for line in lines if len(line.split()) >= 2}


def lf_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_agents_reach_the_node_as_lf(crlf_lab):
    from lab.cluster.agents import AGENT_UNIT_TEXT, node_sources

    sources = node_sources()
    shipped = node_sha256(crlf_lab, *(f"/var/lib/lab/{p.name}" for p in sources),
                          "/etc/systemd/system/lab-agent.service")
    for path in sources:
        assert shipped[f"/var/lib/lab/{path.name}"] == lf_sha256(path), path.name
    assert shipped["/etc/systemd/system/lab-agent.service"] == hashlib.sha256(AGENT_UNIT_TEXT.encode()).hexdigest()
    crlf_lab("exec", "--name", "crlf", "--", "systemctl", "is-active", "--quiet", "lab-agent", "lab-update")


def test_a_crlf_unit_file_runs_on_the_node_as_lf(crlf_lab):
    crlf_lab("unit", "start", "--name", "crlf", UNIT)
    deadline = time.monotonic() + 60
    while UNIT not in crlf_lab("exec", "--name", "crlf", "--", "ls", "/etc/systemd/system"):
        assert time.monotonic() < deadline, f"{UNIT} was not placed on the node within 60 s"
        time.sleep(1)
    shipped = node_sha256(crlf_lab, f"/etc/systemd/system/{UNIT}")
    assert shipped[f"/etc/systemd/system/{UNIT}"] == lf_sha256(REPO / "scenarios" / "first-look" / UNIT)
    crlf_lab("unit", "destroy", "--name", "crlf", UNIT)
