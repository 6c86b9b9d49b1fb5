"""Where lab keeps per-user files on Linux: exactly where it always did (platformdirs underneath).

macOS and Windows locations are checked by tests/foreign (a simulated interpreter).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lab.errors import PrerequisiteError
from lab.host import paths


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def test_linux_defaults(home: Path) -> None:
    assert paths.cache_dir() == home / ".cache" / "lab"
    assert paths.state_home() == home / ".local" / "state" / "lab"


def test_linux_xdg_variables(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", "/srv/cache")
    monkeypatch.setenv("XDG_STATE_HOME", "/srv/state")
    assert (paths.cache_dir(), paths.state_home()) == (Path("/srv/cache/lab"), Path("/srv/state/lab"))
    # The XDG spec says a relative value is invalid: ignored, as it always was.
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert paths.cache_dir() == home / ".cache" / "lab"


def test_linux_runtime_dir(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paths, "effective_uid", lambda: 0)
    assert paths.runtime_dir() == Path("/run/lab")
    monkeypatch.setattr(paths, "effective_uid", lambda: 1000)
    assert paths.runtime_dir() == home / ".local" / "state" / "lab" / "run"
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert paths.runtime_dir() == Path("/run/user/1000/lab")


def test_nothing_is_created_by_asking(home: Path) -> None:
    paths.cache_dir(), paths.state_home(), paths.runtime_dir()
    assert list(home.iterdir()) == []


def test_an_interactive_program_replaces_lab_on_posix(tmp_path: Path) -> None:
    # In a child: exec replaces the process, so the child's status is the program's.
    code = "from lab.host.ssh import exec_interactive; exec_interactive(['sh', '-c', 'exit 5'])"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 5


def test_a_missing_ssh_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from lab.host.ssh import exec_interactive

    monkeypatch.setenv("PATH", os.devnull)
    with pytest.raises(PrerequisiteError, match="ssh not found on PATH") as raised:
        exec_interactive(["ssh", "node-1"])
    assert "openssh-client" in raised.value.hint
