"""VirtualBox through Vagrant: machines brought up concurrently, faults through VBoxManage."""

from __future__ import annotations

import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from lab.errors import CommandError, PrerequisiteError, ProviderError
from lab.host.run import run
from lab.providers.base import Progress, no_progress
from lab.providers.vagrant.provider import VagrantProvider


def up_concurrently(nodes: list[str], up_one: Callable[[str], None], *, first_alone: bool,
                    progress: Progress = no_progress) -> None:
    """Bring machines up at once, for providers whose `vagrant up` cannot.

    With linked clones the first `vagrant up` imports the box and makes the
    master VM every clone is taken from, so it runs alone; then one
    `vagrant up NODE` per remaining node, all at once (each its own Vagrant
    process: Vagrant locks per machine, not per project). Every node's
    failure is reported, not just the first; nodes that did come up stay up
    (the caller's rollback removes them).
    """
    failures: dict[str, str] = {}

    def attempt(node: str) -> None:
        try:
            up_one(node)
        except (CommandError, ProviderError) as exc:
            failures[node] = exc.message

    waves = [nodes[:1], nodes[1:]] if first_alone else [nodes]
    for wave in waves:
        if not wave:
            continue
        if len(wave) > 1:
            progress(f"vagrant up {' '.join(wave)}: {len(wave)} at once")
        with ThreadPoolExecutor(max_workers=len(wave)) as pool:
            list(pool.map(attempt, wave))
        if failures:
            break  # the master clone failed: the rest would fail the same way
    if failures:
        raise ProviderError(f"{len(failures)} of {len(nodes)} machines did not come up:\n"
                            + "\n".join(f"  {node}: {why}" for node, why in failures.items()),
                            hint="see each node's Vagrant output above; `lab destroy` removes what was made")



def _virtualbox_manage() -> str | None:
    found = shutil.which("VBoxManage")
    if found:
        return found
    # VirtualBox on Windows does not put itself on PATH; Vagrant looks here too.
    for var in ("VBOX_MSI_INSTALL_PATH", "VBOX_INSTALL_PATH"):
        for directory in filter(None, os.environ.get(var, "").split(";")):
            candidate = Path(directory) / "VBoxManage.exe"
            if candidate.is_file():
                return str(candidate)
    return None


VIRTUALBOX_HINT = {
    "win32": "install VirtualBox: `winget install --id Oracle.VirtualBox -e`, or the installer from virtualbox.org",
    "darwin": "install VirtualBox: `brew install --cask virtualbox`, or the installer from virtualbox.org",
}.get(sys.platform, "install VirtualBox from virtualbox.org (it is not in Debian)")


class VirtualboxProvider(VagrantProvider):
    name = "virtualbox"
    vagrant_provider = "virtualbox"
    label = "VirtualBox"
    box_formats = ("virtualbox",)

    @classmethod
    def hypervisor_problem(cls) -> tuple[str, str] | None:
        if _virtualbox_manage() is None:
            return "VBoxManage not found", VIRTUALBOX_HINT
        return None

    def _vagrant_up(self, nodes: list[str], progress: Progress) -> None:
        # `vagrant up --parallel` is refused by the VirtualBox provider: one
        # process per node instead (see up_concurrently).
        up_concurrently(nodes, lambda node: self._run(
            lambda v: v.up(vm_name=node, provider=self.vagrant_provider, provision=False),
            lambda line, node=node: progress(f"{node}: {line}")),
            first_alone=self.context.spec.providers.virtualbox.linked_clone, progress=progress)

    def _vboxmanage(self, *args: str) -> None:
        binary = _virtualbox_manage()
        if binary is None:
            raise PrerequisiteError("VBoxManage not found", hint=VIRTUALBOX_HINT)
        run([binary, *args], shown_as="VBoxManage", where=f"{self.name} lab {self.context.spec.name}", timeout=60)

    def kill(self, node: str) -> None:
        self._require_created(node, "kill")
        self._vboxmanage("controlvm", self.machine_name(node), "poweroff")

    def pause(self, node: str) -> None:
        self._require_created(node, "pause")
        self._vboxmanage("controlvm", self.machine_name(node), "pause")

    def resume(self, node: str) -> None:
        self._require_created(node, "resume")
        self._vboxmanage("controlvm", self.machine_name(node), "resume")
        self._reapply_partition(node)

