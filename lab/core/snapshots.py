"""Lab snapshots: the whole lab at one moment, saved and restored in seconds.

    lab snapshot save NAME [--force]   every node stands still together while its state is copied
    lab snapshot restore NAME          every node back to that moment, started, etcd healthy
    lab snapshot list | rm NAME

A snapshot is a directory `LAB_DIR/snapshots/NAME/`: the provider's copy of
every node (nspawn: each node's upper layer and Docker directory, see
lab.providers.nspawn.snapshot) and `snapshot.json`, what a restore needs to
be safe: the nodes, their addresses and boot slots, the image, the lab's etcd
identity (token, members) and settings, the partition and the update in
progress at that moment. It is recorded in the lab's state (kind `snapshot`,
checked by lab.core.state) before it takes its name, and goes with the lab
directory on `lab destroy`.

Restoring is stopping every node, swapping its layers and booting it; a
copy of the layers is no part of it: after a save, and after each restore
once the cluster is back, the provider prepares a spare copy (nspawn:
`NAME/spare/`, as large again as the snapshot) that the next restore takes
by rename. Without one (a failed preparation) the restore copies first.

A save is written to `.NAME.partial` and renamed into place only when
complete: a full disk or Ctrl-C leaves no half snapshot, and `--force`
replaces an old one only once the new one is whole. A restore refuses, with
one message, a snapshot of other nodes or another image than the lab's: its
layers would be put over the wrong lower layer or given to the wrong member.

Callers hold the lab's lock (the CLI through `locked_lab`; `lab test
--from-snapshot` holds it for the whole run).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab.core.lab import Lab
from lab.core.state import NAME, SNAPSHOTS_DIR
from lab.errors import LabError, StateError, UsageError
from lab.host.files import write_atomic
from lab.node.layout import BOOT_SLOTS
from lab.providers.base import NodeSnapshot, Progress, no_progress

META_FILE = "snapshot.json"
META_VERSION = 1
ETCD_HEALTH_TIMEOUT = 60.0


@dataclass(frozen=True)
class Snapshot:
    """What snapshot.json says: the moment saved, and what the lab must match to take it back."""

    name: str
    created_at: str
    provider: str
    image: dict[str, str]  # the lab's image record: name, version, key, rootfs ({} for Vagrant labs)
    nodes: list[NodeSnapshot]
    addresses: dict[str, str]
    etcd: dict[str, Any]  # the state's etcd section: tls, token, members
    etcd_settings: dict[str, Any]  # the spec's etcd settings the nodes' files held
    partition: list[list[str]] | None = None
    update: dict[str, Any] | None = None
    services: list[str] = field(default_factory=list)  # host services that ran (registry, dns)
    running: list[str] = field(default_factory=list)  # nodes that ran; the others were stopped
    frozen_s: float = 0.0
    size_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"version": META_VERSION, "name": self.name, "created_at": self.created_at,
                "provider": self.provider, "image": self.image, "nodes": [n.to_json() for n in self.nodes],
                "addresses": self.addresses, "etcd": self.etcd, "etcd_settings": self.etcd_settings,
                "partition": self.partition, "update": self.update, "services": self.services,
                "running": self.running, "frozen_s": round(self.frozen_s, 3), "size_bytes": self.size_bytes}

    @classmethod
    def from_json(cls, data: Any, where: Path) -> "Snapshot":
        """Parse snapshot.json, refusing anything lab would not have written (it names paths and nodes)."""
        def bad(what: str) -> StateError:
            return StateError(f"{where}: {what}", hint=f"remove the snapshot (`lab snapshot rm {where.parent.name}`) "
                                                       "and save a new one")

        if not isinstance(data, dict) or data.get("version") != META_VERSION:
            raise bad(f"not a version {META_VERSION} snapshot record")
        nodes = []
        for entry in data.get("nodes") or []:
            if not (isinstance(entry, dict) and isinstance(entry.get("node"), str) and NAME.fullmatch(entry["node"])
                    and entry.get("boot_slot") in BOOT_SLOTS and isinstance(entry.get("slots"), dict)
                    and all(k in BOOT_SLOTS and isinstance(v, str) for k, v in entry["slots"].items())):
                raise bad(f"node record {entry!r} is not one lab writes")
            nodes.append(NodeSnapshot(entry["node"], entry["boot_slot"], dict(entry["slots"])))
        if not nodes:
            raise bad("it names no node")
        text = {"name", "created_at", "provider"}
        if not all(isinstance(data.get(k), str) for k in text):
            raise bad(f"{', '.join(sorted(text))} must be text")
        for key in ("image", "addresses", "etcd", "etcd_settings"):
            if not isinstance(data.get(key), dict):
                raise bad(f"{key} is not a mapping")
        partition = data.get("partition")
        if partition is not None and not (isinstance(partition, list) and all(
                isinstance(g, list) and all(isinstance(n, str) for n in g) for g in partition)):
            raise bad("partition is not a list of node groups")
        return cls(name=data["name"], created_at=data["created_at"], provider=data["provider"],
                   image=data["image"], nodes=nodes, addresses=data["addresses"], etcd=data["etcd"],
                   etcd_settings=data["etcd_settings"], partition=partition,
                   update=data.get("update") if isinstance(data.get("update"), dict) else None,
                   services=[s for s in data.get("services") or [] if isinstance(s, str)],
                   running=[s for s in data.get("running") or [] if isinstance(s, str)],
                   frozen_s=float(data.get("frozen_s") or 0.0), size_bytes=int(data.get("size_bytes") or 0))

    @property
    def node_names(self) -> list[str]:
        return [n.node for n in self.nodes]


@dataclass(frozen=True)
class SnapshotRow:
    """One line of `lab snapshot list`."""

    name: str
    created_at: str
    nodes: list[str]
    size_bytes: int
    frozen_s: float
    complete: bool  # False: recorded, but its directory or snapshot.json is missing (an interrupted save)


@dataclass(frozen=True)
class RestoreResult:
    name: str
    took_s: float  # until the cluster was back: every node answering SSH, every etcd member healthy
    nodes_s: float  # until every node answered SSH again
    etcd_s: float  # from then until every member was healthy
    prepared_s: float = 0.0  # afterwards: the next restore's copy made, the replaced layers removed


# ---------------------------------------------------------------- pure checks


def check_name(name: str) -> None:
    if not NAME.fullmatch(name):
        raise UsageError(f"{name!r} is not a snapshot name",
                         hint="use letters, digits, '.', '_' and '-', starting with a letter or digit "
                              "(63 characters at most)")


def lab_facts(state: Any) -> dict[str, Any]:
    """What a snapshot must match of the lab, from its state: nodes, addresses, image, etcd identity, provider."""
    image = state.get("image") or {}
    return {"provider": state.get("provider"), "nodes": list(state.get("nodes") or []),
            "addresses": dict(state.get("addresses") or {}),
            "image": {k: image[k] for k in ("name", "version", "key", "rootfs") if k in image},
            "etcd_tls": (state.get("etcd") or {}).get("tls")}


def differences(snapshot: Snapshot, facts: dict[str, Any]) -> list[str]:
    """Why this snapshot cannot be restored on the lab these facts describe (empty: it can)."""
    found = []
    if snapshot.provider != facts["provider"]:
        found.append(f"provider: snapshot {snapshot.provider}, lab {facts['provider']}")
    if snapshot.node_names != facts["nodes"]:
        found.append(f"nodes: snapshot {', '.join(snapshot.node_names)}, lab {', '.join(facts['nodes']) or 'none'}")
    elif snapshot.addresses != facts["addresses"]:
        changed = sorted(n for n in snapshot.node_names if snapshot.addresses.get(n) != facts["addresses"].get(n))
        found.append("addresses of " + ", ".join(f"{n} (snapshot {snapshot.addresses.get(n)}, lab "
                                                 f"{facts['addresses'].get(n)})" for n in changed))
    image, lab_image = snapshot.image, facts["image"]
    which = "key" if "key" in image and "key" in lab_image else "rootfs"
    if image.get(which) != lab_image.get(which):
        found.append(f"image: snapshot {describe_image(image)}, lab {describe_image(lab_image)}")
    tls = snapshot.etcd.get("tls")
    if tls is not None and facts["etcd_tls"] is not None and tls != facts["etcd_tls"]:
        found.append(f"etcd.tls: snapshot {tls}, lab {facts['etcd_tls']}")
    return found


def describe_image(image: dict[str, str]) -> str:
    if not image:
        return "none recorded"
    return f"{image.get('name', '?')} {image.get('version', '?')} (key {image.get('key', image.get('rootfs', '?'))})"


def settings_note(snapshot: Snapshot, spec_settings: dict[str, Any]) -> str | None:
    """A line saying the nodes now run the snapshot's etcd settings, not the spec's, when they differ."""
    changed = [k for k in sorted(set(snapshot.etcd_settings) | set(spec_settings))
               if k != "tls" and snapshot.etcd_settings.get(k) != spec_settings.get(k)]
    if not changed:
        return None
    return ("etcd runs the snapshot's settings (" + ", ".join(f"{k} {snapshot.etcd_settings.get(k)}" for k in changed)
            + "), not the spec's (" + ", ".join(f"{k} {spec_settings.get(k)}" for k in changed)
            + "): `lab up` applies the spec's")


# ---------------------------------------------------------------- on disk


def snapshots_dir(lab: Lab) -> Path:
    """LAB_DIR/snapshots, made if missing; a symlink (a checkout's) is refused: lab removes trees below it."""
    base = lab.lab_dir / SNAPSHOTS_DIR
    if base.is_symlink() or (base.exists() and not base.is_dir()):
        raise StateError(f"{base} is not a directory lab made", hint=f"remove {base}, then retry")
    base.mkdir(exist_ok=True)
    return base


def load(lab: Lab, name: str) -> Snapshot:
    check_name(name)
    lab.require_created("restore")
    directory = snapshots_dir(lab) / name
    meta = directory / META_FILE
    if not lab.state.find("snapshot", name) or not meta.is_file():
        known = [row.name for row in rows(lab) if row.complete]
        raise UsageError(f"lab {lab.name!r} has no snapshot {name!r}" + (
            "" if lab.state.find("snapshot", name) == [] else " (its save was interrupted)"),
            hint=f"snapshots are: {', '.join(known)}" if known else "take one with `lab snapshot save NAME`")
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StateError(f"{meta}: cannot be read ({exc})", hint=f"`lab snapshot rm {name}` and save a new one") \
            from None
    return Snapshot.from_json(data, meta)


def rows(lab: Lab) -> list[SnapshotRow]:
    """Every recorded snapshot, oldest first; an interrupted one shows as incomplete."""
    if lab.state is None:
        return []
    found = []
    for res in lab.state.find("snapshot"):
        meta = lab.lab_dir / SNAPSHOTS_DIR / res["id"] / META_FILE
        try:
            snapshot = Snapshot.from_json(json.loads(meta.read_text(encoding="utf-8")), meta)
        except (OSError, ValueError, StateError):
            found.append(SnapshotRow(res["id"], res.get("created_at", "?"), [], 0, 0.0, complete=False))
            continue
        found.append(SnapshotRow(snapshot.name, snapshot.created_at, snapshot.node_names, snapshot.size_bytes,
                                 snapshot.frozen_s, complete=True))
    return sorted(found, key=lambda row: row.created_at)


def _remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _leftovers(base: Path) -> list[Path]:
    """What an interrupted save left: `.NAME.partial` and `.NAME.replaced` directories."""
    return [p for p in base.iterdir() if p.name.startswith(".") and p.name.endswith((".partial", ".replaced"))]


# ---------------------------------------------------------------- verbs


def save(lab: Lab, name: str, force: bool = False, progress: Progress = no_progress) -> Snapshot:
    """Save every node of the lab at one moment as snapshot NAME (--force: replace one of that name)."""
    check_name(name)
    lab.require_created("snapshot")
    provider = lab.provider()
    base = snapshots_dir(lab)
    final = base / name
    taken_before = [dict(res) for res in lab.state.find("snapshot", name)]  # copies: record() updates in place
    if (taken_before or final.exists()) and not force:
        when = taken_before[0].get("created_at", "?") if taken_before else "?"
        raise UsageError(f"lab {lab.name!r} has a snapshot {name!r} already (taken {when})",
                         hint=f"`lab snapshot save {name} --force` replaces it, or choose another name")
    for leftover in _leftovers(base):  # the lock is held: nobody else is saving
        _remove_tree(leftover)
    partial, replaced = base / f".{name}.partial", base / f".{name}.replaced"
    started = time.monotonic()
    try:
        taken = provider.snapshot(partial, progress)
        from lab.core.services import endpoints

        snapshot = Snapshot(
            name=name, created_at=now(), provider=lab.state["provider"], image=lab_facts(lab.state)["image"],
            nodes=taken.nodes, addresses=dict(lab.state.get("addresses") or {}),
            etcd=dict(lab.state.get("etcd") or {}), etcd_settings=lab.spec.etcd.model_dump(),
            partition=lab.state.get("partition"), update=lab.state.get("update"),
            services=sorted(endpoints(lab.state)) if lab.state.get("subnet") else [],
            running=taken.running, frozen_s=taken.frozen_s, size_bytes=_size(partial))
        write_atomic(partial / META_FILE, json.dumps(snapshot.to_json(), indent=2) + "\n")
        # Recorded before it takes its name, as every resource is.
        lab.state.record("snapshot", name, dir=str(final), created_at=snapshot.created_at)
        if final.exists() or final.is_symlink():
            _remove_tree(replaced)
            os.rename(final, replaced)
        os.rename(partial, final)
    except BaseException:
        _remove_tree(partial)
        if replaced.exists() and not final.exists():
            os.rename(replaced, final)  # the old snapshot stays what it was
        if taken_before:
            lab.state.record("snapshot", name, **{k: v for k, v in taken_before[0].items() if k not in ("kind", "id")})
        elif lab.state.find("snapshot", name):
            lab.state.forget("snapshot", name)
        raise
    _remove_tree(replaced)
    progress(f"saved {name}: {len(snapshot.nodes)} nodes, {snapshot.size_bytes / 2**20:.0f} MiB, nodes frozen "
             f"{snapshot.frozen_s:.2f} s, {time.monotonic() - started:.1f} s in all")
    _prepare(provider, final, progress)
    return snapshot


def _prepare(provider, directory: Path, progress: Progress) -> float:
    """Get the next restore ready (the provider's spare copy); a failure only makes that restore slower."""
    started = time.monotonic()
    try:
        provider.prepare_restore(directory, progress)
    except LabError as exc:
        progress(f"the next restore will copy the snapshot first: {exc.message}")
    return time.monotonic() - started


def restore(lab: Lab, name: str, progress: Progress = no_progress) -> RestoreResult:
    """Put the whole lab back to snapshot NAME and wait until etcd is healthy."""
    from lab.host.ssh import close_masters

    snapshot = load(lab, name)
    problems = differences(snapshot, lab_facts(lab.state))
    if problems:
        raise StateError(f"snapshot {name!r} was not taken of lab {lab.name!r} as it is now: " + "; ".join(problems),
                         hint="a snapshot restores only the nodes and image it was taken of: `lab snapshot save "
                              f"{name} --force` takes a new one of this lab")
    note = settings_note(snapshot, lab.spec.etcd.model_dump())
    if note:
        progress(note)
    provider = lab.provider()
    started = time.monotonic()
    close_masters(lab.ssh_config_path, snapshot.node_names)  # their nodes are about to vanish
    provider.heal()
    directory = lab.lab_dir / SNAPSHOTS_DIR / name
    provider.restore(directory, snapshot.nodes, progress)
    nodes_s = time.monotonic() - started
    if snapshot.partition:
        provider.partition(snapshot.partition)
    # The state says what the nodes' disks say now: the members and the roll in progress of that moment.
    if snapshot.etcd:
        lab.state.set("etcd", snapshot.etcd)
    lab.state.set("update", snapshot.update)
    lab.write_ssh_config(provider)
    _start_services(lab, provider, snapshot, progress)
    if snapshot.etcd.get("token"):
        from lab.cluster.etcd_bootstrap import EtcdBootstrap

        EtcdBootstrap(provider.context, provider.ssh_endpoints()).wait_healthy(progress, ETCD_HEALTH_TIMEOUT)
    took = time.monotonic() - started
    progress(f"restored {name} in {took:.1f} s (nodes answer SSH after {nodes_s:.1f} s, etcd healthy "
             f"{took - nodes_s:.1f} s later)")
    return RestoreResult(name, took, nodes_s, took - nodes_s, prepared_s=_prepare(provider, directory, progress))


def _start_services(lab: Lab, provider, snapshot: Snapshot, progress: Progress) -> None:
    """The lab's host services (registry, DNS) the snapshot's nodes expect, if a `lab halt` stopped them."""
    from lab.core.services import running, start_services, wanted

    stopped = [s for s in snapshot.services if not running(lab.state, s)]
    if stopped and wanted(lab.state["provider"]):
        start_services(provider.context, progress)


def remove(lab: Lab, name: str) -> None:
    check_name(name)
    lab.require_created("remove a snapshot of")
    directory = lab.lab_dir / SNAPSHOTS_DIR / name
    if not lab.state.find("snapshot", name) and not directory.exists():
        known = [row.name for row in rows(lab)]
        raise UsageError(f"lab {lab.name!r} has no snapshot {name!r}",
                         hint=f"snapshots are: {', '.join(known)}" if known else "there are none")
    snapshots_dir(lab)  # refuses a planted symlink before anything is removed below it
    _remove_tree(directory)
    lab.state.forget("snapshot", name)


def _size(directory: Path) -> int:
    """Bytes the snapshot takes on disk (holes count for nothing, hard links once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for parent, subdirs, files in os.walk(directory):
        for entry in (*subdirs, *files):
            try:
                info = os.lstat(os.path.join(parent, entry))
            except OSError:
                continue
            if (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                total += info.st_blocks * 512
    return total


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
