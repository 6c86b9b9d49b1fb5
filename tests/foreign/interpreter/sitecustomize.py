"""Make this interpreter look like Python on Windows or macOS, for tests/foreign.

Active only when FOREIGN_SYSTEM is "Windows" or "Darwin"; tests/foreign puts
this folder first on PYTHONPATH. Before lab is imported:
- POSIX-only modules (fcntl, pwd, grp, termios, resource, tty, pty, ...)
  raise ImportError, as on Windows;
- POSIX-only `os` names (geteuid, getuid, fork, killpg, setsid, chown,
  O_NOFOLLOW, O_DIRECTORY, uname, ...) are removed, except the few the
  standard library's POSIX code itself calls at run time (statvfs, WNOHANG); on "Windows" the
  signals it lacks (SIGKILL, SIGSTOP, SIGHUP, ...) too, and os.exec* raise
  (there they start a child and end the parent at once);
- sys.platform, platform.system(), uname() and release() say win32/Windows
  or darwin/Darwin.
Both runs remove the same POSIX names: the "macOS" run is stricter than a Mac,
so that it checks lab's macOS branches with no Linux-only call hiding in them.

What loads first, with the real OS's POSIX functions: the standard library's
own POSIX parts (subprocess, tempfile, sysconfig's cached variables,
urllib.request) and the libraries that would need a Windows-only C module here
(filelock, rich, typer, psutil): they load their Linux implementations. platformdirs
loads after the switch, so it takes the simulated system's branch; on
"Windows" it finds %LOCALAPPDATA% from the environment (its fallback when
ctypes' Windows API is missing).

Not simulated: os.name stays "posix", so pathlib, os.path and subprocess are
Linux's (no drive letters, backslashes, CreateProcess or console); PATHEXT is
one extension (".exe") because os.pathsep stays ":"; the file system, /proc and
the programs on PATH are this machine's.
"""

from __future__ import annotations

import os
import sys

SYSTEM = os.environ.get("FOREIGN_SYSTEM")

BLOCKED_MODULES = frozenset({"fcntl", "pwd", "grp", "termios", "resource", "tty", "pty", "posix_ipc",
                             "syslog", "crypt", "spwd", "nis", "readline"})
# Present on Linux, absent on Windows; removed on "macOS" too (see above).
POSIX_OS_NAMES = ("geteuid", "getuid", "getgid", "getegid", "getgroups", "getresuid", "getresgid",
                  "setuid", "setgid", "seteuid", "setegid", "setreuid", "setregid", "initgroups",
                  "killpg", "setsid", "getsid", "fork", "forkpty", "getpgid", "setpgid", "getpgrp", "setpgrp",
                  "chown", "lchown", "fchown", "mkfifo", "mknod", "major", "minor", "makedev",
                  "uname", "getloadavg", "sched_getaffinity", "sched_setaffinity",
                  "pipe2", "memfd_create", "eventfd", "pidfd_open", "openpty", "ttyname", "ctermid",
                  "nice", "wait3", "wait4", "O_NOFOLLOW", "O_DIRECTORY", "O_CLOEXEC",
                  "sync", "getpriority", "setpriority")
# Kept though Windows lacks them: the standard library's POSIX code calls them at run time (shutil's
# disk_usage and copyfile: statvfs, sendfile; subprocess: waitpid, WNOHANG, posix_spawn), where
# Windows' Python has code of its own; removing them would fail the stdlib, not lab.
WINDOWS_MISSING_SIGNALS = ("SIGKILL", "SIGSTOP", "SIGCONT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGALRM",
                           "SIGCHLD", "SIGQUIT", "SIGPIPE", "SIGTSTP", "SIGTTIN", "SIGTTOU", "SIGWINCH")


STDLIB_FIRST = ("shutil", "subprocess", "tempfile", "threading", "urllib.request")
LIBRARIES_FIRST = ("filelock", "rich.console", "typer", "psutil")


class _BlockPosixModules:
    """A meta-path finder that refuses the POSIX-only modules, as Windows' Python has none of them."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED_MODULES:
            raise ImportError(f"No module named {name!r} (blocked: simulated {SYSTEM})", name=name)
        return None


def _simulate(system: str) -> None:
    import importlib
    import platform
    import signal
    import sysconfig
    # The standard library's own POSIX parts load first, with what they need
    # (tempfile binds O_NOFOLLOW, subprocess its POSIX internals): Windows'
    # Python has its own versions of these modules, which are not under test.
    for module in STDLIB_FIRST:
        importlib.import_module(module)
    sysconfig.get_config_vars()  # cached now: its file name derives from sys.platform
    # Third-party libraries that would load a Windows-only C module (msvcrt,
    # ctypes.windll) load their POSIX implementation first, under the real platform.
    for module in LIBRARIES_FIRST:
        try:
            importlib.import_module(module)
        except ImportError:
            pass  # not installed: then lab does not use it either

    sys.platform = {"Windows": "win32", "Darwin": "darwin"}[system]
    real_uname = platform.uname()
    fake_uname = platform.uname_result(system, real_uname.node, "10.0.22631" if system == "Windows" else "23.6.0",
                                       real_uname.version, real_uname.machine)
    platform.uname = lambda: fake_uname
    platform.system = lambda: system
    platform.release = lambda: fake_uname.release
    # platformdirs takes the simulated system's branch (its macOS code binds the
    # geteuid a Mac has). On "Windows" it finds %LOCALAPPDATA% through its
    # fallback for a Python without ctypes: the environment variable.
    real_ctypes = sys.modules.get("ctypes")
    if system == "Windows":
        sys.modules["ctypes"] = None
    try:
        importlib.import_module("platformdirs")
    finally:
        if system == "Windows":
            if real_ctypes is None:
                sys.modules.pop("ctypes", None)
            else:
                sys.modules["ctypes"] = real_ctypes

    for name in BLOCKED_MODULES:
        sys.modules.pop(name, None)
    sys.meta_path.insert(0, _BlockPosixModules())
    for name in POSIX_OS_NAMES:
        if hasattr(os, name):
            delattr(os, name)
    if system == "Windows":
        for name in WINDOWS_MISSING_SIGNALS:
            if hasattr(signal, name):
                delattr(signal, name)
                signal.Signals._member_map_.pop(name, None)

        # shutil.which reads PATHEXT on "win32", split by os.pathsep, which stays ":" here:
        # one extension, so a program is found as NAME.exe, as Windows finds vagrant.exe.
        os.environ["PATHEXT"] = ".exe"

        def no_exec(*args, **kwargs):
            raise AssertionError("os.exec* on Windows starts a child and returns at once to the shell: "
                                 "lab must not rely on it (simulated Windows)")

        for name in ("execv", "execve", "execvp", "execvpe", "execl", "execlp", "execle", "execlpe"):
            setattr(os, name, no_exec)


if SYSTEM:
    _simulate(SYSTEM)
