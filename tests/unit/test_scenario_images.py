"""`lab scenario rolling-update` as written: the OS versions the chosen scenarios roll to are built before
the lab is created, once, and only where they are missing (the build itself is tests/real/images/)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from lab.core import lifecycle
from lab.scenarios.model import find


def scenario(name):
    found = find(name, Path("/nonexistent"))
    return found, found.load()


def test_the_versions_a_scenario_rolls_to_are_read_from_its_update_steps():
    assert lifecycle.rolled_versions(scenario("rolling-update")[1]) == ["1", "2"]
    assert lifecycle.rolled_versions(scenario("rolling-update-rollback")[1]) == ["2-broken"]
    assert lifecycle.rolled_versions(scenario("raft-failover")[1]) == []


def runs_on(provider: str, scenarios):
    lines: list[str] = []
    lab = SimpleNamespace(spec=SimpleNamespace(box=SimpleNamespace(name="labos")),
                          selection=lambda: SimpleNamespace(name=provider))
    return SimpleNamespace(lab=lab, scenarios=scenarios, progress=lines.append), lines


def test_only_missing_versions_are_built_and_the_user_is_told(monkeypatch):
    built: list[tuple[str, str]] = []
    monkeypatch.setattr("lab.images.cache.find_image", lambda box, v: object() if v == "1" else None)
    monkeypatch.setattr("lab.images.build.build_image", lambda box, v, progress=None: built.append((box, v)))
    runs, lines = runs_on("nspawn", [scenario("rolling-update"), scenario("rolling-update-rollback")])
    lifecycle.PHASES["images"].run(runs)
    assert built == [("labos", "2"), ("labos", "2-broken")]
    assert "as `lab box build --version 2`" in lines[0]


def test_nothing_is_built_when_every_version_is_there_or_the_provider_cannot_roll(monkeypatch):
    built: list[str] = []
    monkeypatch.setattr("lab.images.build.build_image", lambda box, v, progress=None: built.append(v))
    monkeypatch.setattr("lab.images.cache.find_image", lambda box, v: object())
    lifecycle.PHASES["images"].run(runs_on("nspawn", [scenario("rolling-update")])[0])
    monkeypatch.setattr("lab.images.cache.find_image", lambda box, v: None)
    lifecycle.PHASES["images"].run(runs_on("libvirt", [scenario("rolling-update")])[0])
    assert built == []
