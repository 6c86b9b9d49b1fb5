"""The lab: one spec, its directory, its state, its provider.

This is the core the CLI is a thin shell over. Functions here raise
`LabError`s and report progress through a callback; they never print or exit.

A lab lives in `<directory of lab.yaml>/.lab/<name>/`: the rendered
Vagrantfile, `state.json`, the per-lab SSH key and known_hosts, node state
and scenario runs.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lab.host import network
from lab.host.paths import effective_uid
from lab.errors import LabError, StateError, UsageError
from lab.node.layout import BOOT_SLOTS, NODE_PKI_DIR
from lab.providers import Selection, select
from lab.providers.base import LabContext, NodeState, NodeStatus, Progress, Provider, no_progress
from lab.model.spec import LabSpec, LoadedSpec, Override, ResolvedNode, load_spec
from lab.core.services import prepare_containers, stop_services
from lab.core.state import LABS_DIR, LabState, lab_lock

# A command that changes a running lab (a fault, a node, a unit) waits this
# long for another to let go of the lab's lock, then says which one holds it.
CHANGE_WAIT = 5.0


def check_lab_dir(lab_dir: Path) -> None:
    """Refuse a `.lab` or lab directory a checkout or another user could point elsewhere.

    lab runs as root and removes its lab directory on destroy: a `.lab` that is
    a symlink (to /, say) or a directory another user owns (who could swap its
    contents for symlinks) must never be acted on.
    """
    euid = effective_uid()  # None on Windows, where the folder's ACL decides
    for path in (lab_dir.parent, lab_dir):
        if path.is_symlink():
            raise StateError(f"{path} is a symlink (to {os.readlink(path)}); lab keeps its labs only in a real "
                             "directory of the project", hint=f"remove the symlink {path}, then retry")
        if euid is not None and path.exists():
            owner = path.lstat().st_uid
            if owner not in (euid, 0):
                raise StateError(f"{path} belongs to user id {owner}, not to you ({euid}) or root",
                                 hint=f"check who made {path}; remove it, or run lab as its owner")


class Lab:
    def __init__(self, loaded: LoadedSpec) -> None:
        self.loaded = loaded
        self.spec: LabSpec = loaded.spec
        self.lab_dir = (loaded.project_dir / LABS_DIR / self.spec.name).absolute()
        check_lab_dir(self.lab_dir)
        self.lab_id = network.lab_id(self.lab_dir)
        self.state = LabState.load(self.lab_dir)

    @classmethod
    def open(cls, spec_path: Path | str = "lab.yaml", overrides: list[Override] | None = None) -> "Lab":
        return cls(load_spec(spec_path, overrides))

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def created(self) -> bool:
        return self.state is not None

    @contextmanager
    def lock(self, command: str, wait: float = 0.0) -> Iterator["Lab"]:
        """Hold the lab's lock for a command that changes the lab (a clear "busy" error after `wait` s).

        The state is read again once the lock is held: the command that held it
        before may have just recorded a node or a resource, and saving the
        state as it was read before would lose that record.
        """
        with lab_lock(self.lab_dir, command, wait):
            self.state = LabState.load(self.lab_dir)
            yield self

    # ------------------------------------------------------------ provider

    def selection(self) -> Selection:
        """The provider: the one the lab was created with, else what the spec asks for."""
        if self.state is not None:
            recorded = self.state.get("provider")
            if self.spec.provider not in ("auto", recorded):
                raise UsageError(
                    f"lab {self.name!r} was created with provider {recorded!r}, the spec now asks for "
                    f"{self.spec.provider!r}",
                    hint=f"`lab destroy` first, or use --provider {recorded}")
            return Selection(recorded, automatic=False, considered={}, origin="the one this lab was created with")
        return select(self.spec.provider)

    def subnet_for(self, provider: str, claim: bool) -> ipaddress.IPv4Network:
        if self.state is not None and self.state.get("subnet"):
            return ipaddress.IPv4Network(self.state["subnet"])
        pool = network.VIRTUALBOX_POOL if provider == "virtualbox" else network.DEFAULT_POOL
        if claim:
            return network.claim_subnet(self.lab_dir, self.name, self.spec.network.subnet, pool,
                                        own_devices=set())
        if self.spec.network.subnet is not None:
            return self.spec.network.subnet
        taken = [ipaddress.IPv4Network(c.subnet) for c in network.claims() if c.lab_id != self.lab_id]
        return network.choose_subnet(self.lab_id, pool, taken)

    def context(self, provider: str, *, claim: bool = False) -> LabContext:
        from lab.providers import provider_class

        # What the spec leaves to the host (libvirt's driver: auto), as the provider runs this lab: in
        # the lab's own spec too, as scenarios read etcd's timings from it for their liveness bounds.
        self.spec = provider_class(provider).settled_spec(self.spec, self.state)
        nodes = self.spec.node_specs()
        if self.state is not None and self.state.get("nodes"):
            # The nodes the lab has (created, added, removed) win over a spec
            # edited since; nodes added at run time inherit the spec's defaults.
            known = {n.name: n for n in nodes}
            defaults = self.spec.nodes
            nodes = [known.get(name) or ResolvedNode(name=name, index=i, cpus=defaults.cpus, memory=defaults.memory,
                                                     metadata=dict(defaults.metadata))
                     for i, name in enumerate(self.state["nodes"], start=1)]
        subnet = self.subnet_for(provider, claim)
        # Addresses are kept in the state once given: removing node-2 must not move node-3.
        recorded = dict(self.state.get("addresses") or {}) if self.state is not None else {}
        addresses = (provider_class(provider).fixed_addresses(self.spec, [n.name for n in nodes], recorded)
                     or network.assign_addresses(subnet, [n.name for n in nodes], recorded))
        ssh_dir = self.lab_dir / "ssh"
        return LabContext(spec=self.spec, lab_dir=self.lab_dir, lab_id=self.lab_id, nodes=nodes,
                          addresses=addresses, subnet=str(subnet), ssh_key=ssh_dir / "id_ed25519",
                          known_hosts=ssh_dir / "known_hosts", state=self.state,
                          jump=provider_class(provider).jump_host(self.spec, self.lab_dir, ssh_dir / "known_hosts"))

    def provider(self) -> Provider:
        from lab.providers import provider_class

        selection = self.selection()
        return provider_class(selection.name)(self.context(selection.name))

    # ------------------------------------------------------------ commands

    def up(self, progress: Progress = no_progress, bootstrap: bool = True) -> "UpResult":
        """Create (or start) every node; on a new lab, any failure removes what was made (see lab.core.up)."""
        from lab.core.up import UpRun, run_steps, up_steps

        if self.state is not None:
            self.check_ssh_key(progress)
        run = UpRun(lab=self, progress=progress, new_lab=self.state is None)
        run_steps(run, up_steps(bootstrap))
        self.spec = run.provider.context.spec  # as the provider settled it while booting (libvirt: a KVM probe)
        return UpResult(selection=run.selection, nodes=run.provider.status(), ssh_config=self.ssh_config_path,
                        seconds=run.seconds)

    def node_add(self, progress: Progress = no_progress, role: str | None = None) -> str:
        """Boot one more node: an etcd member joined at run time (member add before its etcd starts), or a
        worker whose etcd gateway forwards to the members. Default: a member while the lab has fewer
        members than its spec's `etcd.members` (its default for the new node count), else a worker."""
        from lab.cluster.etcd_bootstrap import (MEMBER, ROLES, EtcdBootstrap, member_names, new_node_role,
                                                record_members)

        self.require_created("add a node to")
        if role is not None and role not in ROLES:
            raise UsageError(f"--role {role!r} is not a node role", hint=f"use one of: {', '.join(ROLES)}")
        self.check_ssh_key(progress)
        names = list(self.state["nodes"])
        index = len(names) + 1
        while f"{self.spec.nodes.prefix}-{index}" in names:
            index += 1
        new = f"{self.spec.nodes.prefix}-{index}"
        # A provider that gives addresses itself (existing hosts) may have none left: said before anything
        # is recorded, or every later command would fail on a node without an address.
        from lab.providers import provider_class

        provider_class(self.selection().name).fixed_addresses(self.spec, names + [new],
                                                               dict(self.state.get("addresses") or {}))
        current = member_names(self.context(self.selection().name))
        role = role or new_node_role(self.spec, len(current), len(names) + 1)
        # Recorded before it exists: the node, and whether it is a member (a lab recorded before roles
        # existed gets its list written out here, every node so far a member).
        record_members(self.context(self.selection().name), current + ([new] if role == MEMBER else []))
        self.state.set("nodes", names + [new])
        context = self.context(self.selection().name)
        self.state.set("addresses", context.addresses)
        provider = self.provider()
        progress(f"adding {new} at {context.addresses[new]} as an etcd {role}")
        try:
            provider.up(progress)
            self.write_ssh_config(provider)
            prepare_containers(provider, progress)
            endpoints = provider.ssh_endpoints()
            if role == MEMBER:
                EtcdBootstrap(provider.context, endpoints).join(new, progress)
            else:
                EtcdBootstrap(provider.context, endpoints).start_gateway(new, progress)
            from lab.cluster.agents import SchedulerBootstrap

            SchedulerBootstrap(provider.context, endpoints).run(progress, nodes=[new])
        except BaseException:
            progress(f"rolling back: removing {new}")
            try:  # a member added but never started would cost the cluster its fault tolerance
                EtcdBootstrap(provider.context, provider.ssh_endpoints()).leave(new, progress)
            except LabError:
                progress(f"could not remove {new}'s etcd member; `lab etcdctl -- member list` shows it")
            self._forget_node(provider, new, progress)
            raise
        return new

    def _forget_node(self, provider: Provider, node: str, progress: Progress) -> None:
        provider.remove_node(node, progress)
        etcd_state = dict(self.state.get("etcd") or {})
        if node in etcd_state.get("members", []):  # a member whose removal from etcd failed: it is gone all the same
            self.state.set("etcd", {**etcd_state, "members": [n for n in etcd_state["members"] if n != node]})
        self.state.set("nodes", [n for n in self.state["nodes"] if n != node])
        self.state.set("addresses", {n: ip for n, ip in self.state["addresses"].items() if n != node})
        self.write_ssh_config(self.provider())

    def node_remove(self, node: str, progress: Progress = no_progress) -> None:
        """Remove a member from etcd cleanly (and from the workers' gateways), then destroy the node.
        A worker's node is destroyed at once: nothing of it is in etcd's membership."""
        from lab.cluster.etcd_bootstrap import EtcdBootstrap, member_names

        self.require_created("remove a node from")
        context = self.context(self.selection().name)
        context.node(node)
        if len(context.nodes) == 1:
            raise UsageError(f"{node} is the lab's last node", hint="use `lab destroy` to remove the whole lab")
        if member_names(context) == [node]:
            raise UsageError(f"{node} is the lab's last etcd member: without it no node reaches etcd",
                             hint="add a member first (`lab node add --role member`), or `lab destroy` the lab")
        provider = self.provider()
        EtcdBootstrap(context, provider.ssh_endpoints()).leave(node, progress)
        self._forget_node(provider, node, progress)
        prepare_containers(self.provider(), progress)  # the lab DNS forgets the node's name

    def roles(self) -> dict[str, str]:
        """Each node's part in etcd: "member" or "worker" (a lab not created yet: what the spec would make)."""
        from lab.cluster.etcd_bootstrap import MEMBER, WORKER, roles

        if self.state is None:  # without choosing a provider: nothing but the spec decides
            names = [n.name for n in self.spec.node_specs()]
            count = self.spec.etcd_member_count(len(names))
            return {name: MEMBER if index < count else WORKER for index, name in enumerate(names)}
        return roles(self.context(self.selection().name))

    def status(self) -> list[NodeStatus]:
        if self.state is None:
            return [NodeStatus(n.name, NodeState.NOT_CREATED) for n in self.spec.node_specs()]
        return self.provider().status()

    def halt(self, progress: Progress = no_progress) -> None:
        from lab.host.ssh import close_masters

        self.require_created("halt")
        close_masters(self.ssh_config_path, self.state.get("nodes", []))
        stop_services(self.state, progress)
        self.provider().halt(progress)

    def destroy(self, progress: Progress = no_progress, forget_unreachable: bool = False) -> bool:
        """Remove everything of the lab. Returns False if there was nothing to remove. `forget_unreachable`:
        a node that cannot be reached (an existing host gone for good) is forgotten, not waited for."""
        # What is on disk, not what this object read when it opened the lab: another command (a `lab node
        # add` that restarted the lab DNS, say) may have recorded resources since, which would be left running.
        self.state = LabState.load(self.lab_dir)
        if self.state is None:
            existed = self.lab_dir.exists()  # a rendered Vagrantfile, say
            if existed:
                try:
                    shutil.rmtree(self.lab_dir)
                except OSError as exc:
                    raise StateError(f"cannot remove {self.lab_dir}: {exc.strerror or exc}",
                                     hint=f"see what holds it (`findmnt -R {self.lab_dir}`, `lsof +D "
                                          f"{self.lab_dir}`), then run `lab destroy` again") from None
                self._remove_labs_dir_if_empty()
            network.release_subnet(self.lab_dir)
            return existed
        from lab.host.ssh import close_masters

        close_masters(self.ssh_config_path, self.state.get("nodes", []))
        stop_services(self.state, progress)
        provider = self.provider()
        provider.forget_unreachable = forget_unreachable
        provider.destroy(progress)
        network.release_subnet(self.lab_dir)
        shutil.rmtree(self.lab_dir, ignore_errors=True)
        self._remove_labs_dir_if_empty()
        self.state = None
        return True

    def _remove_labs_dir_if_empty(self) -> None:
        try:
            self.lab_dir.parent.rmdir()
        except OSError:
            pass  # other labs live there

    def destroy_quietly(self) -> None:
        """Destroy for a rollback: never raises a LabError, whose state file `lab destroy` would retry from."""
        try:
            self.destroy()
        except (LabError, OSError):
            pass  # the state file survives; `lab destroy` retries from it

    def check_ssh_key(self, progress: Progress = no_progress) -> None:
        """Before changing a lab that exists: its SSH key is there.

        A lost `id_ed25519.pub` is derived again from the private key; a lost
        private key stops the command before it changes anything (every SSH
        attempt would only time out).
        """
        from lab.host.ssh import ensure_keypair

        key = self.lab_dir / "ssh" / "id_ed25519"
        if not key.is_file():
            raise StateError(f"the lab's SSH key {key} is missing: lab cannot reach the nodes without it",
                             hint="the nodes trust only that key: restore it from a backup, or `lab destroy` "
                                  "and `lab up` to make the lab anew")
        if not key.with_suffix(".pub").is_file():
            ensure_keypair(key, comment=f"lab-{self.name}")
            progress(f"{key.with_suffix('.pub')} was missing: derived it again from the private key")

    def require_created(self, verb: str) -> None:
        if self.state is None:
            raise StateError(f"lab {self.name!r} does not exist yet, nothing to {verb}",
                             hint="create it with `lab up`")

    # ------------------------------------------------------------ etcd

    def etcd_client(self, timeout: float = 2.0):
        from lab.cluster.etcd_bootstrap import client_for

        self.require_created("reach")
        return client_for(self.context(self.selection().name), timeout=timeout)

    def etcd_status(self) -> list["MemberRow"]:
        """Each member's health, role and Raft position, as seen from the host."""
        from concurrent.futures import ThreadPoolExecutor

        from lab.cluster.etcd_bootstrap import members
        from lab.cluster.etcdclient import EtcdError

        context = self.context(self.selection().name)
        client = self.etcd_client(timeout=1.0)

        def probe(member) -> MemberRow:
            try:
                status = client.status(member.client_url)
            except EtcdError as exc:
                return MemberRow(member.node, member.client_url, healthy=False, error=exc.message)
            return MemberRow(member.node, member.client_url, healthy=client.health(member.client_url),
                             member_id=status.member_id, leader=status.is_leader, raft_term=status.raft_term,
                             raft_index=status.raft_index, db_size=status.db_size, version=status.version)

        cluster = members(context)
        with ThreadPoolExecutor(max_workers=max(1, len(cluster))) as pool:
            return list(pool.map(probe, cluster))

    def etcdctl_env(self) -> dict[str, str]:
        """Environment for the host's etcdctl: endpoints and, with TLS, the lab's certificates."""
        from lab.cluster.etcd_bootstrap import members
        from lab.host.pki import LabPki

        self.require_created("reach")
        context = self.context(self.selection().name)
        if context.jump is not None:  # a program of its own: the tunnels of lab.host.reach live in lab's process
            raise UsageError("`lab etcdctl` reaches etcd from this machine directly, and this lab's nodes are "
                             f"behind the jump host {context.jump.host}",
                             hint="run etcdctl on a member: `lab ssh node-1 -- etcdctl --cacert "
                                  f"{NODE_PKI_DIR}/ca.crt --cert {NODE_PKI_DIR}/node.crt --key "
                                  f"{NODE_PKI_DIR}/node.key endpoint status` (its endpoint is 127.0.0.1:2379)")
        env = {"ETCDCTL_API": "3", "ETCDCTL_ENDPOINTS": ",".join(m.client_url for m in members(context))}
        if self.spec.etcd.tls:
            pki = LabPki(self.lab_dir / "pki")
            env.update(ETCDCTL_CACERT=str(pki.ca), ETCDCTL_CERT=str(pki.client.cert),
                       ETCDCTL_KEY=str(pki.client.key))
        return env

    # ------------------------------------------------------------ Vagrantfile

    def vagrant_provider(self) -> tuple[str, str | None]:
        """The Vagrant provider to render for, and a note when it is not the lab's own."""
        from lab.model.catalog import VAGRANT_PROVIDERS

        name = self.selection().name
        if name in VAGRANT_PROVIDERS:
            return name, None
        return "virtualbox", (f"the {name} provider needs no Vagrantfile; rendered the one for virtualbox, "
                              "the laptop default (choose another with --provider)")

    def render(self, write: bool = True) -> "RenderResult":
        from lab.providers.vagrant.render import render_vagrantfile, write_vagrantfile

        provider, note = self.vagrant_provider()
        context = self.context(provider)
        text = render_vagrantfile(context, provider)
        path = write_vagrantfile(context, provider) if write else context.lab_dir / "Vagrantfile"
        return RenderResult(path=path, provider=provider, text=text, note=note)

    def validate(self) -> list[str]:
        """Check the spec (already done on load) and the rendered Vagrantfile with real `vagrant validate`."""
        report = [f"{self.loaded.path}: valid" if self.loaded.exists else "no lab.yaml: the defaults are valid"]
        provider, note = self.vagrant_provider()
        if note:
            report.append(note)
        if shutil.which("vagrant") is None:
            from lab.host.vagrant import VAGRANT_HINT

            report.append(f"vagrant is not installed: skipped `vagrant validate` ({VAGRANT_HINT})")
            return report
        from lab.providers.vagrant.provider import validate

        validate(self.context(provider), provider)
        report.append(f"{self.lab_dir / 'Vagrantfile'}: vagrant validate passed ({provider})")
        return report

    # ------------------------------------------------------------ SSH

    @property
    def ssh_config_path(self) -> Path:
        return self.lab_dir / "ssh_config"

    def ssh_endpoints(self):
        self.require_created("reach")
        return self.provider().ssh_endpoints()

    def write_ssh_config(self, provider: Provider) -> None:
        from lab.host.files import write_atomic

        write_atomic(self.ssh_config_path, self.ssh_config(provider))

    def ssh_config(self, provider: Provider | None = None) -> str:
        from lab.host.ssh import control_path, render_ssh_config

        endpoints = (provider or self.provider()).ssh_endpoints() if self.created else {}
        self.require_created("reach")
        return render_ssh_config(endpoints.values(), control=control_path(self.lab_id))

    def node_names(self) -> list[str]:
        return [n.name for n in self.context(self.selection().name).nodes]


# ---------------------------------------------------------------- images the labs of this host use


def images_in_use() -> dict[str, list[str]]:
    """The OS image root filesystems the labs of this host boot or have staged -> the labs using each.

    Found through the labs registry (every lab with a subnet claim, running or
    halted) and what each lab's state records, not through host mounts: a
    halted node mounts nothing but boots its image again on the next `lab up`.
    A lab whose state cannot be read is an error: it might use any image.
    """
    used: dict[str, list[str]] = {}
    for claim in network.claims():
        lab_dir = Path(claim.lab_dir)
        try:
            state = LabState.load(lab_dir)
        except StateError as exc:
            raise StateError(f"cannot tell which images lab {claim.name!r} ({lab_dir}) uses: {exc.message}",
                             hint=exc.hint) from None
        if state is None:
            continue
        for rootfs in booted_images(state):
            used.setdefault(os.path.realpath(rootfs), []).append(f"lab {claim.name!r} in {lab_dir}")
    return used


def booted_images(state: LabState) -> set[str]:
    """Every image root filesystem a lab's state names: the image the lab was created from, and each node's boot slots (`slot-a`, `slot-b` links in the
    node's recorded directory, which lies inside the lab directory)."""
    found: set[str] = set()
    image = state.get("image")
    if isinstance(image, dict) and isinstance(image.get("rootfs"), str):
        found.add(image["rootfs"])
    for node in state.find("node"):
        if not isinstance(node.get("dir"), str):
            continue  # a provider without node directories (Vagrant): its boxes are Vagrant's copies
        for slot in BOOT_SLOTS:
            try:
                found.add(os.readlink(Path(node["dir"]) / f"slot-{slot}"))
            except OSError:
                pass  # a slot never staged
    return found


@dataclass
class MemberRow:
    node: str
    endpoint: str
    healthy: bool
    member_id: str = ""
    leader: bool = False
    raft_term: int = 0
    raft_index: int = 0
    db_size: int = 0
    version: str = ""
    error: str = ""


@dataclass
class RenderResult:
    path: Path
    provider: str
    text: str
    note: str | None


@dataclass
class UpResult:
    selection: Selection
    nodes: list[NodeStatus]
    ssh_config: Path
    seconds: dict[str, float]  # wall time of each step of `lab up` that ran

    def phases(self) -> str:
        """The steps that took a noticeable time, e.g. "boot nodes 1.6 s, etcd 0.2 s"."""
        return ", ".join(f"{name} {took:.1f} s" for name, took in self.seconds.items() if took >= 0.05)
