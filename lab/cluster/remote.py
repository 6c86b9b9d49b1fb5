"""Files and commands on a node over SSH, as the bootstrap steps use them.

Both bootstraps (etcd, the agents) write their files the same way: upload,
swap in only what changed, and (re)start a unit only when something did, so
re-running `lab up` changes nothing on a node that is already right.
"""

from __future__ import annotations

import io
import secrets
import shlex
import tarfile
from pathlib import PurePosixPath

from lab.errors import CommandError, LabError, ProviderError
from lab.host.files import to_lf
from lab.host.ssh import SSHEndpoint, timed_out
from lab.providers.base import NodeFile

# Every command lab runs on a node during bootstrap; apt-get gets its own, longer bound.
COMMAND_TIMEOUT = 120.0
APT_TIMEOUT = 900.0
# Where a node receives a bundle of files before they are swapped into place (removed right after).
UPLOAD_DIR = "/var/tmp"


class BootstrapError(LabError):
    exit_code = 8


def put_files(connection, files: list[NodeFile], node: str) -> bool:
    """Write every file whose content differs (see written_files); returns whether any changed."""
    return bool(written_files(connection, files, node))


def written_files(connection, files: list[NodeFile], node: str) -> list[str]:
    """Write every file whose content differs, in two round trips whatever their number: one upload
    of them all as one tar, one script that swaps each changed one in. Returns the paths it wrote.

    Each file is checked and swapped on its own (`PATH.lab-new`, compared, fsynced, renamed), so a
    file already right is never touched and a reader never sees half of one.
    """
    if not files:
        return []
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as bundle:
        for index, file in enumerate(files):
            # LF on the node even from a CRLF checkout (a Windows clone): a unit or script with CR breaks there.
            content = to_lf(file.content)
            entry = tarfile.TarInfo(str(index))
            entry.size = len(content)
            bundle.addfile(entry, io.BytesIO(content))
    archive.seek(0)
    remote_bundle = f"{UPLOAD_DIR}/lab-put-{secrets.token_hex(8)}.tar"
    # SFTP has no timeout of its own: bound every read/write on its channel.
    connection.sftp().get_channel().settimeout(COMMAND_TIMEOUT)
    connection.put(archive, remote=remote_bundle)
    script = [f"bundle={shlex.quote(remote_bundle)}", 'trap \'rm -f "$bundle"\' EXIT', "set -e"]
    for index, file in enumerate(files):
        script.append(_swap_in(file, f'tar -xOf "$bundle" {index}', f"CHANGED {index}"))
    result = check(connection, "\n".join(script), node)
    changed = {line.split()[1] for line in result.stdout.splitlines() if line.startswith("CHANGED ")}
    return [file.path for index, file in enumerate(files) if str(index) in changed]


def _swap_in(file: NodeFile, content_command: str, changed_marker: str) -> str:
    """Shell that writes `content_command`'s output as `file` only if it differs, printing the marker then."""
    quoted, temporary = shlex.quote(file.path), shlex.quote(f"{file.path}.lab-new")
    directory = shlex.quote(str(PurePosixPath(file.path).parent))
    # fsync the file before the rename and the directory after it: a VM whose
    # power is pulled (`lab fault kill`) seconds later otherwise comes back with
    # the new name on an empty file (ext4 delayed allocation), e.g. a unit file
    # systemd then reads as masked. Container nodes share the host's page cache
    # and never showed it.
    # The new file is made under umask 077: never readable by others before its own mode is set (a key).
    return (f"mkdir -p {directory}; (umask 077; {content_command} > {temporary}); "
            f"chmod {file.mode:o} {temporary}; chown {shlex.quote(file.owner)} {temporary}; "
            f"if cmp -s {temporary} {quoted}; then rm -f {temporary}; "
            f"else sync {temporary}; mv -f {temporary} {quoted}; sync {directory}; echo {changed_marker}; fi")


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
