"""Fixtures of the fast tier shared by its CLI tests."""

from __future__ import annotations

import pytest

DEMO = """\
description: A demo.
nodes: 2
lab:
  etcd: {election_timeout_ms: 1000}
steps:
  - sleep: 1
"""


@pytest.fixture
def fake_lab(project, monkeypatch):
    """Labs on lab.testing's fake provider (under the name nspawn), booted without etcd; a
    scenario `demo` whose run is a stub that passes, fails or raises as `fake_lab.outcome` says."""
    from types import SimpleNamespace

    from lab.core.lab import Lab
    from lab.scenarios import engine
    from lab.testing.fake import fake_provider

    monkeypatch.setenv("XDG_STATE_HOME", str(project.parent / "state"))
    (project / "scenarios" / "demo").mkdir(parents=True)
    (project / "scenarios" / "demo" / "scenario.yaml").write_text(DEMO)
    real_up = Lab.up
    monkeypatch.setattr(Lab, "up", lambda self, progress, bootstrap=True: real_up(self, progress, bootstrap=False))

    class StubRun:
        def __init__(self, lab, found, spec, progress, earlier=None) -> None:
            self.found = found

        def run(self):
            if provider.outcome.get("raise"):
                raise provider.outcome["raise"]
            ok = provider.outcome.get("ok", True)
            run_dir = project.parent / "runs" / self.found.name
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "junit.xml").write_text("<testsuite/>\n")
            return SimpleNamespace(scenario=self.found.name, ok=ok, run_dir=run_dir, measurements={"ops": 5},
                                   failures=[] if ok else [SimpleNamespace(description="step 1 failed")])

    monkeypatch.setattr(engine, "ScenarioRun", StubRun)
    with fake_provider("nspawn") as provider:
        provider.outcome = {}
        yield provider
        del provider.outcome
