"""`lab up` as a list of named steps with one rollback, as kind creates a cluster.

Each step is a small function of an `UpRun` (the lab, its provider, what was
made so far). A step that creates something host-wide registers how to undo
it *before* going on, so a failure or Ctrl-C at any step of a new lab runs the
undos newest first and leaves nothing behind. On an existing lab nothing is
undone: its nodes and state were there before this `lab up` and stay.

The list is data: `up_steps()` is what `lab up` runs, and tests run it
against the fake provider in `lab.testing` with a failure injected at each
step in turn.
"""

from __future__ import annotations

import datetime
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

from lab.core.state import SCHEMA_VERSION, LabState
from lab.errors import LabError, PrerequisiteError
from lab.host import network
from lab.providers import Selection, provider_class
from lab.providers.base import Progress, Provider

if TYPE_CHECKING:
    from lab.core.lab import Lab


@dataclass
class UpRun:
    """What one `lab up` has learnt and made so far; steps read and fill it in."""

    lab: "Lab"
    progress: Progress
    new_lab: bool
    selection: Selection | None = None
    provider: Provider | None = None
    subnet: str | None = None
    seeded: set[str] = field(default_factory=set)  # nodes that boot with their services in place
    undo: list[tuple[str, Callable[[], None]]] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # each step's wall time, for `lab up`'s summary and bench/

    def on_failure(self, what: str, action: Callable[[], None]) -> None:
        self.undo.append((what, action))


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[UpRun], None]
    # Steps that only a lab being created needs (claims, keys); skipped on a re-run.
    new_lab_only: bool = False
    existing_lab_only: bool = False


DOCTOR_POINTER = "run `lab doctor` for what this host can run"


@contextmanager
def pointing_to_doctor() -> Iterator[None]:
    """A host that lacks what the provider needs: the error's hint also names `lab doctor`,
    which lists every provider this host can run and the command that fixes each gap."""
    try:
        yield
    except PrerequisiteError as exc:
        if DOCTOR_POINTER not in (exc.hint or ""):
            exc.hint = f"{exc.hint}; {DOCTOR_POINTER}" if exc.hint else DOCTOR_POINTER
        raise


def select_provider(run: UpRun) -> None:
    with pointing_to_doctor():  # provider: auto, and no provider can run here
        run.selection = run.lab.selection()
    run.progress(run.selection.describe())


def preflight(run: UpRun) -> None:
    # A new lab is checked before anything exists, so bad input, a missing
    # tool or a lab too big for the host leaves nothing behind; an existing one
    # is checked with its own context.
    cls = provider_class(run.selection.name)
    provider = cls(run.lab.context(run.selection.name))
    with pointing_to_doctor():
        provider.preflight()
    for note in provider.preflight_notes():
        run.progress(f"note: {note}")
    if run.new_lab:
        from lab.core.doctor import capacity_problem

        problem = capacity_problem(run.lab.spec, run.lab.lab_dir, run.selection.name)
        if problem is not None:
            raise problem


def claim_subnet(run: UpRun) -> None:
    # Claimed in the per-user registry under its lock: two `lab up` at once never share a subnet.
    run.on_failure("subnet claim", lambda: network.release_subnet(run.lab.lab_dir))
    run.subnet = str(run.lab.subnet_for(run.selection.name, claim=True))


def record_state(run: UpRun) -> None:
    lab = run.lab
    nodes = [n.name for n in lab.spec.node_specs()]
    # Roles are fixed here, the first nodes the members: `lab node add/remove` change them, not a spec edit.
    members = nodes[:lab.spec.etcd_member_count(len(nodes))]
    state = LabState(lab.lab_dir, {
        "version": SCHEMA_VERSION, "name": lab.name, "lab_id": lab.lab_id, "provider": run.selection.name,
        "created_at": now(), "subnet": run.subnet, "resources": [],
        "nodes": nodes, "etcd": {"tls": lab.spec.etcd.tls, "members": members},
    })
    state.save()
    lab.state = state
    # From here on, destroy (which reads this state) is the one undo: it removes
    # every resource the provider records before creating it, and the subnet claim.
    run.on_failure("everything recorded in state.json", lab.destroy_quietly)


def assign_addresses(run: UpRun) -> None:
    run.lab.state.set("addresses", run.lab.context(run.selection.name).addresses)


def ssh_keypair(run: UpRun) -> None:
    from lab.host.ssh import ensure_keypair

    context = run.lab.context(run.selection.name)
    # A new lab's key is always made here: one already in the lab directory (a checkout may ship one)
    # would be what every node, and every existing host of `provider: hosts`, trusts for root.
    for path in (context.ssh_key, context.ssh_key.with_suffix(".pub")):
        path.unlink(missing_ok=True)
    ensure_keypair(context.ssh_key, comment=f"lab-{run.lab.name}")


def check_subnet_claim(run: UpRun) -> None:
    from lab.cluster.etcd_bootstrap import tls_mode

    context = run.lab.context(run.selection.name)
    network.ensure_claim_matches(run.lab.lab_dir, context.subnet)
    # Before any node boots: a spec whose etcd.tls differs from the lab's is refused up front.
    tls_mode(context)


def make_provider(run: UpRun) -> None:
    run.provider = provider_class(run.selection.name)(run.lab.context(run.selection.name))


def first_boot_files(run: UpRun) -> None:
    """Nodes not created yet boot with their Docker settings, etcd and agents in place and enabled, where
    the provider can write a node's disk before it boots (nspawn): their services start with them, and
    the bootstrap steps below only wait for them instead of setting each node up over SSH."""
    from lab.cluster.agents import SchedulerBootstrap
    from lab.cluster.etcd_bootstrap import EtcdBootstrap
    from lab.core.services import docker_seeds

    provider = run.provider
    seeds = docker_seeds(provider)
    for source in (EtcdBootstrap(provider.context, {}).first_boot_seeds(),
                   SchedulerBootstrap(provider.context, {}).first_boot_seeds()):
        for node, seed in source.items():
            seeds[node] = seeds[node] + seed
    run.seeded = provider.seed_first_boot(seeds)


def boot_nodes(run: UpRun) -> None:
    run.provider.up(run.progress)


def ssh_config(run: UpRun) -> None:
    run.lab.write_ssh_config(run.provider)


def containers(run: UpRun) -> None:
    from lab.core.services import prepare_containers

    prepare_containers(run.provider, run.progress, seeded=run.seeded)


def etcd(run: UpRun) -> None:
    from lab.cluster.etcd_bootstrap import EtcdBootstrap

    EtcdBootstrap(run.provider.context, run.provider.ssh_endpoints()).run(run.progress, seeded=run.seeded)


def scheduler(run: UpRun) -> None:
    from lab.cluster.agents import SchedulerBootstrap

    SchedulerBootstrap(run.provider.context, run.provider.ssh_endpoints()).run(run.progress, seeded=run.seeded)


def up_steps(bootstrap: bool = True) -> list[Step]:
    steps = [
        Step("select provider", select_provider),
        Step("preflight", preflight),
        Step("claim subnet", claim_subnet, new_lab_only=True),
        Step("record state", record_state, new_lab_only=True),
        Step("assign addresses", assign_addresses, new_lab_only=True),
        Step("ssh keypair", ssh_keypair, new_lab_only=True),
        Step("check subnet claim", check_subnet_claim, existing_lab_only=True),
        Step("provider", make_provider),
    ]
    if bootstrap:
        steps.append(Step("first-boot files", first_boot_files))
    steps += [Step("boot nodes", boot_nodes), Step("ssh config", ssh_config)]
    if bootstrap:
        steps += [Step("containers", containers), Step("etcd", etcd), Step("scheduler", scheduler)]
    return steps


def run_steps(run: UpRun, steps: list[Step]) -> None:
    """Run the steps in order; on any failure (Ctrl-C included) of a new lab, undo newest first."""
    try:
        for step in steps:
            if (step.new_lab_only and not run.new_lab) or (step.existing_lab_only and run.new_lab):
                continue
            started = time.monotonic()
            step.run(run)
            run.seconds[step.name] = time.monotonic() - started
            run.done.append(step.name)
    except BaseException:
        if run.new_lab and run.undo:
            run.progress("rolling back: removing what this `lab up` created")
            rollback(run)
        raise


def rollback(run: UpRun) -> None:
    for what, action in reversed(run.undo):
        try:
            action()
        except (LabError, OSError) as exc:  # keep undoing the rest; state.json lets `lab destroy` retry
            run.progress(f"could not undo the {what}: {exc}")
    run.undo.clear()


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
