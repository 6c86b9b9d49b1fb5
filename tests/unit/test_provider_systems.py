"""A provider asked for on a system it does not run on says so, and names the one that works there."""

from __future__ import annotations

import platform

import pytest

from lab.errors import PrerequisiteError
from lab.providers import select


@pytest.mark.parametrize("system, provider, only, instead", [
    ("Darwin", "nspawn", "Linux", "virtualbox"),
    ("Windows", "libvirt", "Linux", "virtualbox"),
    ("Darwin", "hyperv", "Windows", "virtualbox"),
    ("Linux", "parallels", "macOS", "libvirt"),
])
def test_a_provider_of_another_system_is_refused_by_name(monkeypatch: pytest.MonkeyPatch, system: str,
                                                         provider: str, only: str, instead: str) -> None:
    monkeypatch.setattr(platform, "system", lambda: system)
    with pytest.raises(PrerequisiteError, match=f"the {provider} provider runs on {only} only") as raised:
        select(provider)
    assert f"--provider {instead}" in raised.value.hint


def test_auto_passes_over_linux_only_providers_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    from lab.providers.vagrant.virtualbox import VirtualboxProvider
    from lab.providers.base import Availability

    monkeypatch.setattr(VirtualboxProvider, "availability", classmethod(lambda cls: Availability(False, "no")))
    with pytest.raises(PrerequisiteError) as raised:
        select("auto")
    assert "libvirt: the libvirt provider runs on Linux only" in raised.value.message
    assert "nspawn: the nspawn provider runs on Linux only" in raised.value.message
    assert "VirtualBox and Vagrant" in raised.value.hint
