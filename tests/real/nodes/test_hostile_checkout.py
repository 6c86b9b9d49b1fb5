"""A hostile checkout, through the real CLI as root: a symlinked `.lab` and a
forged state.json naming a real host bridge, a host directory and a host
process; `lab destroy` and `lab status` refuse with one message and the host
keeps all of them. (The rules themselves: tests/unit/test_checkout_boundary.py.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2")

VICTIM_LINK = "labvictim0"


def lab_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lab.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def assert_refused(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr and fragment in result.stderr, result.stderr


@pytest.fixture
def victims(tmp_path: Path):
    """A host directory with a file, a host bridge and a sleeping host process, all of which must survive."""
    directory = tmp_path / "victim"
    (directory / "etc").mkdir(parents=True)
    (directory / "etc" / "keep").write_text("keep\n")
    subprocess.run(["ip", "link", "del", VICTIM_LINK], capture_output=True)
    subprocess.run(["ip", "link", "add", VICTIM_LINK, "type", "bridge"], check=True)
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        yield directory, sleeper
    finally:
        sleeper.kill()
        sleeper.wait()
        subprocess.run(["ip", "link", "del", VICTIM_LINK], capture_output=True)


def survived(directory: Path, sleeper: subprocess.Popen) -> None:
    assert (directory / "etc" / "keep").read_text() == "keep\n"
    assert subprocess.run(["ip", "link", "show", VICTIM_LINK], capture_output=True).returncode == 0
    assert sleeper.poll() is None


def test_a_symlinked_labs_directory_is_refused(tmp_path, victims):
    directory, sleeper = victims
    project = tmp_path / "project"
    project.mkdir()
    (project / "lab.yaml").write_text("name: etc\nprovider: nspawn\n")
    (project / ".lab").symlink_to(directory)
    for verb in (["destroy"], ["status"], ["up"]):
        assert_refused(lab_cli(*verb, cwd=project), "is a symlink")
    survived(directory, sleeper)


def test_a_forged_state_naming_host_things_is_refused(tmp_path, victims):
    directory, sleeper = victims
    project = tmp_path / "project"
    lab_dir = project / ".lab" / "lab"
    lab_dir.mkdir(parents=True)
    (project / "lab.yaml").write_text("provider: nspawn\n")
    (lab_dir / "state.json").write_text(json.dumps({
        "version": 1, "name": "lab", "provider": "nspawn", "subnet": "10.77.200.0/24", "nodes": ["node-1"],
        "resources": [
            {"kind": "bridge", "id": VICTIM_LINK},
            {"kind": "node", "id": "node-1", "dir": str(directory), "supervisor_pid": sleeper.pid},
            {"kind": "mount", "id": str(directory / "etc")},
        ]}))
    for verb in (["destroy"], ["status"], ["halt"]):
        assert_refused(lab_cli(*verb, cwd=project), "refusing to act on a state that is not this lab's")
    survived(directory, sleeper)
