"""`lab doctor --json` on this host, for real (the pure judgement is tests/unit/test_doctor.py):
nspawn is usable as root, the document is whole, and doctor agrees with the providers' own
availability checks, the ones `lab up` runs. It boots nothing and leaves nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("systemd-nspawn") is None,
                                reason="needs root and systemd-nspawn")


def test_lab_doctor_on_this_host(tmp_path: Path):
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "lab.cli", "doctor", "--json", "--nodes", "3"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - started
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads(result.stdout)
    providers = {p["provider"]: p for p in document["providers"]}
    assert providers["nspawn"]["usable"], providers["nspawn"]
    assert document["host"]["root"] is True and document["host"]["system"] == "Linux"
    assert providers["hyperv"]["reason"].startswith("not on this OS")
    assert document["recommended"] in document["usable"]
    needs = {n["what"]: n for n in document["resources"]["needs"]}
    assert document["resources"]["nodes"] == 3 and needs["memory"]["available_mib"] > 0
    assert needs["lab directory"]["available_mib"] > 0
    assert not (tmp_path / ".lab").exists()  # it looked, it made nothing
    print(f"lab doctor --json: {seconds:.1f} s; usable: {document['usable']}; recommended: {document['recommended']}")

    # What `lab up` itself would find: a provider whose own availability() says usable is usable for doctor
    # too (libvirt's also wants a Lab OS box added, which doctor reports as a next step instead).
    from lab.providers import provider_class

    for name in ("nspawn", "virtualbox", "libvirt"):
        availability = provider_class(name).availability()
        if availability.usable:
            assert providers[name]["usable"], (name, availability, providers[name])
    assert providers["nspawn"]["usable"] == provider_class("nspawn").availability().usable
