"""The lab's own verbs: init, render, validate, up, status, etcdctl, halt,
destroy, ssh-config, ssh, exec, reboot (top-level: `lab up`, not `lab lab up`)."""

from __future__ import annotations

import sys
import time
from typing import Annotated, Optional

import typer

from lab.cli.options import (DEFAULT_FILE, FileOpt, JsonOpt, NameOpt, NodesOpt, ProviderOpt, SetOpt, flags,
                             locked_lab, open_lab)
from lab.cli.output import err, member_table, node_table, out, print_json, progress
from lab.errors import UsageError

verbs = typer.Typer(rich_markup_mode=None)
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}  # `lab VERB -- ARGS...`


@verbs.command()
def init(file: FileOpt = DEFAULT_FILE, name: NameOpt = None, nodes: NodesOpt = None,
         provider: ProviderOpt = None,
         force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False) -> None:
    """Write a commented lab.yaml with every default spelled out."""
    from lab.core import lifecycle

    lifecycle.init(file, flags(name, nodes, provider), force)
    out().print(f"wrote {file}; next: `lab up`")


@verbs.command()
def render(file: FileOpt = DEFAULT_FILE, name: NameOpt = None, nodes: NodesOpt = None,
           provider: ProviderOpt = None, sets: SetOpt = None,
           stdout: Annotated[bool, typer.Option("--stdout", help="Print instead of writing the file.")] = False,
           ) -> None:
    """Render the Vagrantfile of the lab into its directory (.lab/NAME/Vagrantfile)."""
    result = open_lab(file, name, nodes, provider, sets).render(write=not stdout)
    if result.note:
        progress(result.note)
    if stdout:
        sys.stdout.write(result.text)
    else:
        out().print(f"rendered {result.path} for provider {result.provider}")


@verbs.command()
def validate(file: FileOpt = DEFAULT_FILE, name: NameOpt = None, nodes: NodesOpt = None,
             provider: ProviderOpt = None, sets: SetOpt = None) -> None:
    """Validate lab.yaml, and the rendered Vagrantfile with `vagrant validate` when vagrant is installed."""
    for line in open_lab(file, name, nodes, provider, sets).validate():
        out().print(line)


@verbs.command()
def up(file: FileOpt = DEFAULT_FILE, name: NameOpt = None, nodes: NodesOpt = None,
       provider: ProviderOpt = None, sets: SetOpt = None, as_json: JsonOpt = False,
       no_bootstrap: Annotated[bool, typer.Option(
           "--no-bootstrap", help="Boot the nodes only: no lab registry or DNS, Docker settings, etcd or scheduler.")
       ] = False,
       ) -> None:
    """Create the lab (or start it again), wait for SSH, and bootstrap the etcd cluster."""
    lab = open_lab(file, name, nodes, provider, sets)
    started = time.monotonic()
    with lab.lock("up"):
        result = lab.up(progress, bootstrap=not no_bootstrap)
    took = time.monotonic() - started
    from lab.core.services import endpoints

    services = endpoints(lab.state)
    if as_json:
        print_json({"lab": lab.name, "provider": result.selection.name, "services": services,
                    "ssh_config": str(result.ssh_config), "nodes": [s.to_json() for s in result.nodes],
                    "seconds": {"total": round(took, 3), **{k: round(v, 3) for k, v in result.seconds.items()}}})
        return
    progress(f"up in {took:.1f} s ({result.phases()})")
    console = out()
    console.print(node_table(result.nodes, title=f"lab {lab.name} is up ({result.selection.name})",
                             roles=lab.roles()))
    first = result.nodes[0].name if result.nodes else "node-1"
    if not no_bootstrap:
        console.print(member_table(lab.etcd_status()))
    try:
        etcd = f"lab etcdctl -- endpoint status   (endpoints {lab.etcdctl_env()['ETCDCTL_ENDPOINTS']})"
    except UsageError as exc:  # nodes behind a jump host: the hint says how to reach etcd there
        etcd = exc.hint or exc.message
    console.print(f"  shell:    lab ssh {first}\n"
                  f"  command:  lab exec -- uptime\n"
                  f"  etcd:     {etcd}\n"
                  + (f"  docker:   lab ssh {first} -- docker run ubuntu /bin/echo hello world   "
                     f"(registry {services['registry']}: lab image list)\n" if "registry" in services else "")
                  + f"  ssh:      ssh -F {result.ssh_config} {first}\n"
                  f"  testinfra: pytest --hosts={','.join('ssh://' + s.name for s in result.nodes)} "
                  f"--ssh-config={result.ssh_config}")


@verbs.command()
def status(file: FileOpt = DEFAULT_FILE, name: NameOpt = None, as_json: JsonOpt = False) -> None:
    """Show every node (state, IP, boot id, etcd member or worker) and every etcd member (health, leader,
    Raft term and index)."""
    lab = open_lab(file, name)
    statuses = lab.status()
    running = any(s.state.value == "running" for s in statuses)
    members = lab.etcd_status() if lab.created and running else []
    provider = lab.state.get("provider") if lab.state else None
    roles = lab.roles()  # a lab not created yet: what its spec would make
    if as_json:
        print_json({"lab": lab.name, "created": lab.created, "provider": provider,
                    "nodes": [{**s.to_json(), "role": roles.get(s.name)} for s in statuses],
                    "etcd": [m.__dict__ for m in members]})
        return
    out().print(node_table(statuses, title=f"lab {lab.name}" + (f" ({provider})" if lab.state else " (not created)"),
                           roles=roles))
    if members:
        out().print(member_table(members))


@verbs.command(context_settings=PASS_THROUGH)
def etcdctl(ctx: typer.Context, file: FileOpt = DEFAULT_FILE, name: NameOpt = None) -> None:
    """Run the host's etcdctl against the lab: `lab etcdctl -- endpoint status -w table`."""
    import os
    import shutil

    from lab.errors import PrerequisiteError
    from lab.host.ssh import exec_interactive

    if shutil.which("etcdctl") is None:
        raise PrerequisiteError("etcdctl not found on this host", hint="apt-get install etcd-client")
    env = {**os.environ, **open_lab(file, name).etcdctl_env()}
    raise typer.Exit(exec_interactive(["etcdctl", *ctx.args], env))


@verbs.command()
def halt(file: FileOpt = DEFAULT_FILE, name: NameOpt = None) -> None:
    """Power every node off cleanly; `lab up` starts them again with their state."""
    lab = open_lab(file, name)
    with lab.lock("halt"):
        lab.halt(progress)
    out().print(f"lab {lab.name} halted")


@verbs.command()
def destroy(file: FileOpt = DEFAULT_FILE, name: NameOpt = None,
            forget_unreachable: Annotated[bool, typer.Option(
                "--forget-unreachable",
                help="provider: hosts: forget a host that does not answer (gone for good) instead of keeping "
                     "the lab for another `lab destroy`; what lab put on it stays there")] = False) -> None:
    """Remove every node, mount, bridge, rule and file the lab created."""
    from lab.core import lifecycle

    lab_name, existed = lifecycle.destroy(file, flags(name), progress, forget_unreachable=forget_unreachable)
    out().print(f"lab {lab_name} destroyed" if existed else f"lab {lab_name} does not exist; nothing to do")


@verbs.command("ssh-config")
def ssh_config(file: FileOpt = DEFAULT_FILE, name: NameOpt = None) -> None:
    """Print an ssh_config for the nodes (for `ssh -F` and `pytest --ssh-config`)."""
    sys.stdout.write(open_lab(file, name).ssh_config())


def _endpoints(lab, nodes: list[str]) -> dict:
    """The SSH endpoints of the lab's nodes, after checking that every name given is one of them."""
    endpoints = lab.ssh_endpoints()
    unknown = [n for n in nodes if n not in endpoints]
    if unknown:
        raise UsageError(f"no node named {unknown[0]!r} in lab {lab.name!r}", hint=f"nodes are: {', '.join(endpoints)}")
    return endpoints


@verbs.command(context_settings=PASS_THROUGH)
def ssh(node: Annotated[str, typer.Argument(help="Node to open a shell on.")], ctx: typer.Context,
        file: FileOpt = DEFAULT_FILE, name: NameOpt = None) -> None:
    """Open a shell on NODE (or run `lab ssh NODE -- CMD`)."""
    from lab.host.ssh import exec_interactive, ssh_argv

    lab = open_lab(file, name)
    endpoint = _endpoints(lab, [node])[node]
    lab.write_ssh_config(lab.provider())
    raise typer.Exit(exec_interactive(ssh_argv(endpoint, lab.ssh_config_path, list(ctx.args) or None)))


@verbs.command("exec", context_settings=PASS_THROUGH)
def exec_(ctx: typer.Context, file: FileOpt = DEFAULT_FILE, name: NameOpt = None,
          node: Annotated[Optional[list[str]], typer.Option("--node", help="Only on this node (repeatable).")] = None,
          timeout: Annotated[Optional[float], typer.Option(help="Seconds before a command is given up.")] = None,
          as_json: JsonOpt = False) -> None:
    """Run a command on every node in parallel: `lab exec -- uptime`. Output is prefixed by node."""
    import shlex

    from lab.host.ssh import run_many

    if not ctx.args:
        raise UsageError("no command given", hint="put the command after --, e.g. `lab exec -- uptime`")
    endpoints = _endpoints(open_lab(file, name), node or [])
    command = shlex.join(ctx.args) if len(ctx.args) > 1 else ctx.args[0]
    results = run_many([endpoints[n] for n in (node or endpoints)], command, timeout=timeout, echo=not as_json)
    if as_json:
        print_json([r.__dict__ for r in results])
    failed = [r for r in results if not r.ok]
    for result in failed:
        reason = "unreachable: " + result.stderr.strip() if result.exit_status is None and not result.stdout \
            else f"exit {result.exit_status}"
        err().print(f"[red]{result.node}: {reason}[/red]")
    if failed:
        raise typer.Exit(1)


@verbs.command()
def reboot(node: Annotated[str, typer.Argument(help="Node to reboot.")], file: FileOpt = DEFAULT_FILE,
           name: NameOpt = None) -> None:
    """Reboot NODE cleanly and wait until it answers SSH again."""
    with locked_lab(file, name, f"reboot {node}") as lab:
        lab.context(lab.selection().name).node(node)
        lab.provider().reboot(node, progress)
    out().print(f"{node} rebooted")
