"""The Vagrant runner: how lab runs `vagrant` and reads what Vagrant keeps on the host.

The only module of lab that imports `vagrant` (python-vagrant), and only inside
`run_vagrant`, so importing lab stays cheap. Nothing here knows a lab or a
provider class: the environment every vagrant command runs with, Vagrant's
home (added boxes, installed plugins), a python-vagrant call with its output
streamed to a progress callback, the plain `vagrant validate` and `vagrant
box` commands, and `lab.host.run` for the hypervisors' own command-line tools.
Reading Vagrant's output is lab.providers.vagrant.parsers' job.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from lab.errors import CommandError, PrerequisiteError, ProviderError
from lab.host.run import Result, run, text_of

T = TypeVar("T")
Progress = Callable[[str], None]

VAGRANT_HINT = {
    "win32": "install Vagrant: `winget install --id Hashicorp.Vagrant -e`, or the installer from Vagrant's "
             "downloads page; then open a new terminal (the installer puts vagrant on PATH)",
    "darwin": "install Vagrant: `brew tap hashicorp/tap && brew install hashicorp/tap/hashicorp-vagrant`, "
              "or the installer from Vagrant's downloads page",
}.get(sys.platform, "install Vagrant: `apt-get install vagrant` on Debian and Ubuntu, "
                    "or the package for your system from Vagrant's downloads page")
# Variables that would make Vagrant look at another directory, another
# Vagrantfile, another .vagrant, or a provider other than the lab's.
_FOREIGN_VARIABLES = ("VAGRANT_CWD", "VAGRANT_VAGRANTFILE", "VAGRANT_DOTFILE_PATH", "VAGRANT_DEFAULT_PROVIDER")
# Providers whose `vagrant up` boots machines in parallel by itself, safely.
NATIVE_PARALLEL = frozenset({"libvirt"})
_OUTPUT_TAIL_LINES = 200


# ---------------------------------------------------------------- environment and Vagrant's home

def vagrant_environment(provider: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment every vagrant command of a lab runs with."""
    env = dict(os.environ if base is None else base)
    for name in _FOREIGN_VARIABLES:
        env.pop(name, None)
    if provider not in NATIVE_PARALLEL:
        env["VAGRANT_NO_PARALLEL"] = "1"  # see lab.providers.vagrant.provider's docstring
    else:
        env.pop("VAGRANT_NO_PARALLEL", None)
    env.update({
        "VAGRANT_CHECKPOINT_DISABLE": "1",        # no version check against HashiCorp's servers
        "VAGRANT_BOX_UPDATE_CHECK_DISABLE": "1",  # boxes are local: no catalog to ask
        "VAGRANT_NO_COLOR": "1",                  # output goes to progress lines and error tails
        # A preference, not a force: status and destroy still answer where the
        # hypervisor is missing, and created machines keep their own provider.
        "VAGRANT_PREFERRED_PROVIDERS": provider,
    })
    return env


def vagrant_home(environ: dict[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    value = environ.get("VAGRANT_HOME")
    return Path(value).expanduser() if value else Path.home() / ".vagrant.d"


def added_box_dirs(box: str, provider: str, version: str = "*") -> list[Path]:
    """Where Vagrant keeps an added box for a provider: ~/.vagrant.d/boxes/NAME/VERSION/[ARCH/]PROVIDER
    (the ARCH level is Vagrant 2.4's); none when it is not added."""
    directory = vagrant_home() / "boxes" / box.replace("/", "-VAGRANTSLASH-")
    return [path for pattern in (f"{version}/{provider}", f"{version}/*/{provider}")
            for path in sorted(directory.glob(pattern)) if path.is_dir()]


def _plugin_files(environ: dict[str, str] | None = None) -> list[Path]:
    """Where Vagrant records installed plugins: the user's, then system ones."""
    environ = os.environ if environ is None else environ
    files = [vagrant_home(environ) / "plugins.json"]
    embedded = [environ.get("VAGRANT_INSTALLER_EMBEDDED_DIR"), "/opt/vagrant/embedded",
                "/usr/share/vagrant-plugins",  # Debian's vagrant and vagrant-* packages
                r"C:\HashiCorp\Vagrant\embedded"]
    files += [Path(directory) / "plugins.json" for directory in embedded if directory]
    return files


def plugin_installed(plugin: str, environ: dict[str, str] | None = None) -> bool:
    """Is a Vagrant plugin installed? Reads Vagrant's plugin files instead of
    running `vagrant plugin list`, which takes a second or more."""
    for path in _plugin_files(environ):
        # Debian's vagrant-* packages drop one file per plugin in plugins.d/.
        if (path.parent / "plugins.d" / f"{plugin}.json").is_file():
            return True
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        installed = data.get("installed") if isinstance(data, dict) else None
        if isinstance(installed, dict) and plugin in installed:
            return True
    return False


def require_vagrant() -> str:
    """The path of the vagrant binary; PrerequisiteError when Vagrant is not installed."""
    found = shutil.which("vagrant")
    if found is None:
        raise PrerequisiteError("vagrant not found", hint=VAGRANT_HINT)
    return found


# ---------------------------------------------------------------- running commands

def vagrant_validate(directory: Path, provider: str, extra: list[str]) -> Result:
    """`vagrant validate --machine-readable EXTRA` in `directory`, whatever its exit status."""
    # python-vagrant's Vagrant.validate() ignores its env=, so run it here.
    return run([require_vagrant(), "validate", "--machine-readable", *extra], shown_as="vagrant",
               where=str(directory), timeout=120, check=False, cwd=directory, env=vagrant_environment(provider))


def vagrant_box(*args: str) -> str:
    """Run `vagrant box ARGS`; its output, or a CommandError naming the sub-command."""
    env = dict(os.environ, VAGRANT_CHECKPOINT_DISABLE="1", VAGRANT_NO_COLOR="1")
    # `vagrant box add` copies a ~700 MiB box: minutes, never hours.
    return run([require_vagrant(), "box", *args], shown_as="vagrant", where=f"vagrant box {args[0]}",
               timeout=1800, env=env).stdout


# A carriage return or an erase-line: what comes after it replaces what came before on a terminal.
_REWRITE = re.compile(r"\r|\x1b\[[02]?K")
_TERMINAL_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def plain_line(text: str) -> str:
    """A line of Vagrant's output as a terminal would leave it: the last of the updates it rewrote in place
    (the box upload's "Progress: N%", hundreds to a line), without terminal controls."""
    segments = [_TERMINAL_CONTROL.sub("", segment).rstrip() for segment in _REWRITE.split(text)]
    return next((segment for segment in reversed(segments) if segment.strip()), "")


class _OutputSink:
    """File handles for python-vagrant's `out_cm`/`err_cm` that feed progress.

    Each use opens a pipe; a reader thread splits it into lines, passes each to
    the progress callback and keeps a tail for error messages.
    """

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.lines: deque[str] = deque(maxlen=_OUTPUT_TAIL_LINES)
        self._lock = threading.Lock()

    def text(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    @contextlib.contextmanager
    def cm(self) -> Iterator[Any]:
        read_fd, write_fd = os.pipe()
        reader = threading.Thread(target=self._pump, args=(read_fd,), daemon=True)
        reader.start()
        writer = os.fdopen(write_fd, "wb")
        try:
            yield writer
        finally:
            writer.close()
            # A grandchild still holding the pipe must not hang lab: give up
            # on the rest of its output after a while.
            reader.join(timeout=5)

    def _pump(self, read_fd: int) -> None:
        with os.fdopen(read_fd, "rb") as reader:
            for raw in reader:
                line = plain_line(raw.decode("utf-8", "replace"))
                if not line:
                    continue
                with self._lock:
                    self.lines.append(line)
                    try:
                        self.progress(line)
                    except Exception:  # a broken progress display must not kill the command
                        pass


# What Vagrant prints when a Ctrl-C reached it: it is finishing (or undoing) the step it is in.
_VAGRANT_CLEANING_UP = "Waiting for cleanup before exiting"
# Vagrant's own Ctrl-C (a terminal's reaches it too) shows its clean-up message within this; if it does not,
# lab passes the Ctrl-C on.
VAGRANT_HEARD_CTRL_C_WITHIN = 2.0
# How long Vagrant may take over that after a Ctrl-C before lab kills it: an emulated VM's
# domain is created or destroyed in seconds, a box upload into libvirt's pool in a minute.
VAGRANT_CLEANUP_WAIT = 90.0


@contextlib.contextmanager
def vagrant_cleans_up_on_ctrl_c(sink: "_OutputSink", progress: Progress,
                                wait: float = VAGRANT_CLEANUP_WAIT) -> Iterator[Callable[[], bool]]:
    """While a Vagrant command runs, a first Ctrl-C lets Vagrant finish its own clean-up; yields "was it?".

    python-vagrant kills its child on any exception, KeyboardInterrupt
    included: a Vagrant killed while creating machines leaves a half-made VM
    that lab's rollback may not find. So the first SIGINT raises nothing here:
    from a terminal Vagrant got it too (it prints "Waiting for cleanup"); one
    sent to lab's pid alone (a CI runner stopping a job) is passed on once (a
    second makes Vagrant exit at once, uncleaned). Vagrant then exits and the
    caller raises KeyboardInterrupt. A second Ctrl-C, or `wait` seconds, stop
    it at once. Only the main thread gets signals: elsewhere nothing changes.
    """
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    interrupted: list[float] = []

    def pass_on() -> None:
        import time

        import psutil

        try:
            vagrants = [child for child in psutil.Process().children(recursive=False)
                        if any("vagrant" in part for part in child.cmdline()[:3])]
        except psutil.Error:
            return
        deadline = time.monotonic() + VAGRANT_HEARD_CTRL_C_WITHIN
        while time.monotonic() < deadline and _VAGRANT_CLEANING_UP not in sink.text():
            time.sleep(0.1)
        if _VAGRANT_CLEANING_UP not in sink.text() and sys.platform != "win32":  # Windows: one console, one Ctrl-C
            for child in vagrants:
                with contextlib.suppress(psutil.Error):
                    child.send_signal(signal.SIGINT)
        _, alive = psutil.wait_procs(vagrants, timeout=wait)
        for child in alive:
            with contextlib.suppress(psutil.Error):
                for process in [*child.children(recursive=True), child]:
                    process.kill()

    def on_sigint(signum: int, frame: Any) -> None:
        if interrupted:
            raise KeyboardInterrupt  # the second: python-vagrant kills Vagrant now
        interrupted.append(1.0)
        progress(f"interrupted: letting Vagrant clean up (up to {wait:.0f} s; Ctrl-C again stops it at once)")
        threading.Thread(target=pass_on, name="vagrant-ctrl-c", daemon=True).start()

    from lab.host.processes import interrupt_signals

    # A SIGTERM the command turned into an interrupt (lab.cli.main) gets the same clean-up wait.
    previous = {signum: signal.signal(signum, on_sigint) for signum in interrupt_signals()}
    try:
        yield lambda: bool(interrupted)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_vagrant(root: Path, provider: str, call: Callable[[Any], T], progress: Progress, *, where: str) -> T:
    """Run one python-vagrant call on the Vagrantfile in `root`; its output goes to `progress` line by line.

    A failing command becomes a CommandError carrying the command, its exit
    status and the tail of its output.
    """
    require_vagrant()
    import vagrant  # python-vagrant; imported here so `import lab` stays light

    sink = _OutputSink(progress)
    machine = vagrant.Vagrant(root=str(root), env=vagrant_environment(provider), out_cm=sink.cm, err_cm=sink.cm)
    with vagrant_cleans_up_on_ctrl_c(sink, progress) as interrupted:
        try:
            result = call(machine)
        except subprocess.CalledProcessError as exc:
            if interrupted():  # Vagrant stopped because of the Ctrl-C, once it had cleaned up
                raise KeyboardInterrupt from None
            raise _vagrant_failed(exc, sink, root, where) from None
        except OSError as exc:
            raise ProviderError(f"cannot run vagrant in {root}: {exc}") from None
    if interrupted():  # Vagrant finished before it heard of the Ctrl-C: lab stops all the same
        raise KeyboardInterrupt
    return result


def _vagrant_failed(exc: subprocess.CalledProcessError, sink: "_OutputSink", root: Path, where: str) -> CommandError:
    """A failing Vagrant command as a CommandError: the command, its exit status, the tail of its output."""
    command = exc.cmd if isinstance(exc.cmd, str) else shlex.join(["vagrant", *[str(part) for part in exc.cmd[1:]]])
    output = "\n".join(filter(None, [sink.text(), text_of(exc.output).rstrip()]))
    return CommandError(command, where=where, exit_status=exc.returncode, output=output,
                        hint=f"run `{command}` in {root} to see Vagrant's whole output")
