"""Files and commands on a node over SSH, as the bootstrap steps use them.

Both bootstraps (etcd, the agents) write their files the same way: upload,
swap in only what changed, and (re)start a unit only when something did, so
re-running `lab up` changes nothing on a node that is already right.
"""

from __future__ import annotations

import io
import shlex
from dataclasses import dataclass
from pathlib import Path

from lab.errors import CommandError, LabError, ProviderError
from lab.host.ssh import SSHEndpoint, timed_out

# Every command lab runs on a node during bootstrap; apt-get gets its own, longer bound.
COMMAND_TIMEOUT = 120.0
APT_TIMEOUT = 900.0


class BootstrapError(LabError):
    exit_code = 8


@dataclass(frozen=True)
class RemoteFile:
    path: str
    content: bytes
    mode: int
    owner: str = "root"


def put_files(connection, files: list[RemoteFile], node: str) -> bool:
    """Upload every file (each only if it differs). Returns whether any changed."""
    return any([put_if_changed(connection, file, node) for file in files])  # a list: upload them all


def put_if_changed(connection, file: RemoteFile, node: str) -> bool:
    """Upload through a temp file and swap it in only if the content differs."""
    temporary = f"{file.path}.lab-new"
    directory = str(Path(file.path).parent)
    check(connection, f"mkdir -p {shlex.quote(directory)}", node)
    # SFTP has no timeout of its own: bound every read/write on its channel.
    connection.sftp().get_channel().settimeout(COMMAND_TIMEOUT)
    connection.put(io.BytesIO(file.content), remote=temporary)
    quoted, quoted_tmp = shlex.quote(file.path), shlex.quote(temporary)
    # fsync the file before the rename and the directory after it: a VM whose
    # power is pulled (`lab fault kill`) seconds later otherwise comes back with
    # the new name on an empty file (ext4 delayed allocation), e.g. a unit file
    # systemd then reads as masked. Container nodes share the host's page cache
    # and never showed it.
    script = (f"chmod {file.mode:o} {quoted_tmp} && chown {file.owner} {quoted_tmp} && "
              f"if cmp -s {quoted_tmp} {quoted}; then rm -f {quoted_tmp}; "
              f"else sync {quoted_tmp} && mv -f {quoted_tmp} {quoted} && sync {shlex.quote(directory)} "
              f"&& echo CHANGED; fi")
    result = check(connection, script, node)
    return "CHANGED" in result.stdout


def units_active(connection, node: str, *units: str) -> bool:
    return run_bounded(connection, f"systemctl is-active --quiet {' '.join(units)}", node).exited == 0


def check(connection, command: str, node: str, timeout: float = COMMAND_TIMEOUT):
    """Run `command` on a connection; a CommandError naming the node if it fails or outlives `timeout`."""
    result = run_bounded(connection, command, node, timeout)
    if result.exited != 0:
        raise CommandError(command, where=node, exit_status=result.exited, output=result.stdout + result.stderr)
    return result


def run_bounded(connection, command: str, node: str, timeout: float = COMMAND_TIMEOUT):
    """Run `command`, whatever its exit status; one that outlives `timeout` is a CommandError naming the node.

    A node frozen mid-command must end in a message, never hang `lab up` or leave invoke's traceback.
    """
    try:
        return connection.run(command, warn=True, hide=True, in_stream=False, timeout=timeout)
    except Exception as exc:
        if not timed_out(exc):
            raise
        raise CommandError(command, where=node, exit_status=None, output=exc.result.stdout + exc.result.stderr,
                           hint=f"it did not finish in {timeout:.0f} s: is {node} paused or overloaded?") from None


def journal_tail(endpoint: SSHEndpoint, unit: str, lines: int = 12) -> str:
    """A unit's state and last journal lines on a node, indented and prefixed, for error messages."""
    from lab.host.ssh import run

    try:
        text = run(endpoint, f"systemctl is-active {unit}; journalctl -u {unit} -n {lines} --no-pager -o cat",
                   timeout=10).stdout
    except ProviderError as exc:
        text = exc.message
    return "\n".join(f"    {endpoint.node}: {line}" for line in text.strip().splitlines()[-lines:])
