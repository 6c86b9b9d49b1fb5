"""Provider registry and auto-selection.

Providers are imported only when asked for, so `lab --help` never loads
python-vagrant or the nspawn machinery. An unknown name fails with the list of
valid ones.
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
import platform
from dataclasses import dataclass
from typing import Iterator

from lab.errors import PrerequisiteError, UsageError
from lab.model.catalog import AUTO_ORDER, PROVIDER_FOR_SYSTEM, PROVIDERS, SYSTEM_NAMES
from lab.providers.base import Availability, Provider

# name -> "module:Class": the one list, in lab.model.catalog (the spec validates against it too).
_REGISTRY = {name: entry.target for name, entry in PROVIDERS.items()}


def names() -> list[str]:
    return list(_REGISTRY)


def elsewhere(name: str) -> PrerequisiteError | None:
    """Why provider `name` cannot run on this host's system (it is Linux-only, say), else None."""
    entry = PROVIDERS.get(name)
    here = platform.system()
    if entry is None or not entry.systems or here in entry.systems:
        return None
    instead = PROVIDER_FOR_SYSTEM.get(here, "virtualbox")
    only = " and ".join(SYSTEM_NAMES.get(system, system) for system in entry.systems)
    return PrerequisiteError(f"the {name} provider runs on {only} only; this host runs {SYSTEM_NAMES.get(here, here)}",
                             hint=f"use the {instead} provider here: `lab up --provider {instead}` "
                                  f"(or `provider: {instead}` in lab.yaml)")


def provider_class(name: str) -> type[Provider]:
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise UsageError(f"unknown provider {name!r}", hint=f"choose one of: {', '.join(_REGISTRY)}") from None
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


@dataclass(frozen=True)
class Selection:
    name: str
    automatic: bool
    considered: dict[str, Availability]  # what auto-selection saw, in order
    origin: str = "from the spec"

    def describe(self) -> str:
        if not self.automatic:
            return f"provider: {self.name} ({self.origin})"
        others = "; ".join(f"{n}: {a.reason}" for n, a in self.considered.items() if n != self.name)
        return f"provider: {self.name} (auto{'; ' + others if others else ''})"


def select(requested: str) -> Selection:
    if requested != "auto":
        # A Linux-only provider on a Mac says so here, before its modules (which need Linux) are imported.
        problem = elsewhere(requested)
        if problem is not None:
            raise problem
        provider_class(requested)  # validate the name early
        return Selection(requested, automatic=False, considered={})
    considered: dict[str, Availability] = {}
    for name in AUTO_ORDER:
        problem = elsewhere(name)
        availability = Availability(False, problem.message) if problem else provider_class(name).availability()
        considered[name] = availability
        if availability.usable:
            return Selection(name, automatic=True, considered=considered)
    reasons = "\n".join(f"  {n}: {a.reason}" for n, a in considered.items())
    hint = ("install VirtualBox and Vagrant (`lab doctor` says how on this system)"
            if platform.system() != "Linux" else
            "run as root with systemd-nspawn installed (apt-get install systemd-container), "
            "or install VirtualBox / vagrant-libvirt")
    raise PrerequisiteError(f"no provider can run on this host:\n{reasons}", hint=hint)


@contextmanager
def substituted(name: str, target: str) -> Iterator[None]:
    """Make `name` resolve to another "module:Class" for a while: how tests put
    lab.testing's fake provider under the core, the engine and the CLI."""
    previous = _REGISTRY[name]
    _REGISTRY[name] = target
    try:
        yield
    finally:
        _REGISTRY[name] = previous
