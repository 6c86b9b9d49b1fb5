"""Ctrl-C during `vagrant up`: lab waits for Vagrant's own clean-up before its rollback runs (else Vagrant
defines a VM after lab looked, and it is left behind). A stand-in `vagrant` on PATH, real processes, real
SIGINT to lab's pid alone (as a CI runner stopping a job sends it) and to its process group (a terminal)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

# Vagrant's behaviour, reduced: on the first SIGINT it says it is cleaning up, takes a moment, and
# writes what it finished; without one it would go on "creating" a machine for a long time.
STAND_IN = """#!/bin/sh
echo "$$" > "$MARKS/vagrant.pid"
trap 'echo "==> node-1: Waiting for cleanup before exiting..."; sleep 1; echo cleaned > "$MARKS/cleanup"; exit 1' INT
echo "Bringing machine 'node-1' up with 'libvirt' provider..."
i=0
while [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
echo defined > "$MARKS/late-domain"
"""

LAB_SIDE = """
import sys
from pathlib import Path
import lab.host.vagrant
from lab.host.vagrant import run_vagrant
lab.host.vagrant.VAGRANT_HEARD_CTRL_C_WITHIN = 0.5  # the stand-in says it at once
try:
    run_vagrant(Path(sys.argv[1]), "libvirt", lambda machine: machine.up(), print, where="test")
except KeyboardInterrupt:
    print("lab: rolling back", flush=True)
    sys.exit(130)
"""


@pytest.mark.parametrize("to_group", [False, True], ids=["to-lab-alone", "from-a-terminal"])
def test_ctrl_c_waits_for_vagrants_cleanup_and_leaves_no_vagrant(tmp_path, to_group):
    bin_dir, marks, root = tmp_path / "bin", tmp_path / "marks", tmp_path / "lab"
    for directory in (bin_dir, marks, root):
        directory.mkdir()
    vagrant = bin_dir / "vagrant"
    vagrant.write_text(STAND_IN)
    vagrant.chmod(0o755)
    (root / "Vagrantfile").write_text("# stand-in\n")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", MARKS=str(marks))
    lab = subprocess.Popen([sys.executable, "-c", textwrap.dedent(LAB_SIDE), str(root)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 20
    while not (marks / "vagrant.pid").exists():
        assert time.monotonic() < deadline and lab.poll() is None, lab.stdout.read() if lab.poll() else "no vagrant"
        time.sleep(0.05)
    time.sleep(0.3)
    if to_group:  # a terminal's Ctrl-C: lab and Vagrant both get it
        os.killpg(lab.pid, signal.SIGINT)
    else:  # lab's pid only (a CI runner stopping a job): Vagrant got nothing
        lab.send_signal(signal.SIGINT)
    output, _ = lab.communicate(timeout=30)
    assert lab.returncode == 130, output
    assert (marks / "cleanup").read_text().strip() == "cleaned", output
    assert output.index("Waiting for cleanup") < output.index("lab: rolling back")
    pid = int((marks / "vagrant.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    time.sleep(0.5)
    assert not (marks / "late-domain").exists()
