"""One way to run a command on the host, as invoke's runner: `run()` returns a
`Result`; a failure raises one `CommandError` carrying the argv, where it ran,
the exit code (None for a timeout) and the tail of its output.

Always an argv list, never a shell. A missing program is a
`PrerequisiteError` naming it, not a FileNotFoundError traceback. Every call
that can block has a timeout: a hung tool must end in a message, not a hang.
"""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from lab.errors import CommandError, PrerequisiteError

DEFAULT_TIMEOUT = 120.0


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run(argv: Sequence[str | Path], *, where: str = "host", check: bool = True, timeout: float | None = DEFAULT_TIMEOUT,
        input: str | None = None, env: Mapping[str, str] | None = None, cwd: Path | str | None = None,
        hint: str | None = None, missing_hint: str | None = None, shown_as: str | None = None) -> Result:
    """Run argv and capture its output; raise CommandError on failure (if check) or timeout.

    `shown_as` names the program in messages as a user would type it (`vagrant`, not its full path).
    """
    args = tuple(str(a) for a in argv)
    shown = shlex.join([shown_as or args[0], *args[1:]])
    try:
        completed = subprocess.run(args, capture_output=True, text=True, errors="replace", input=input,
                                   stdin=None if input is not None else subprocess.DEVNULL, timeout=timeout,
                                   env=dict(env) if env is not None else None, cwd=cwd, check=False)
    except FileNotFoundError:
        raise PrerequisiteError(f"{shown_as or args[0]} is not installed (needed for `{shown}`)",
                                hint=missing_hint or "run tools/install.sh, which installs every host tool lab uses") \
            from None
    except subprocess.TimeoutExpired as exc:
        output = text_of(exc.stdout) + text_of(exc.stderr)
        raise CommandError(shown, where=where, exit_status=None, output=output,
                           hint=hint or f"it did not finish in {timeout:.0f} s") from None
    result = Result(args, completed.returncode, completed.stdout or "", completed.stderr or "")
    if check and not result.ok:
        raise CommandError(shown, where=where, exit_status=result.exit_code, output=result.output,
                           hint=hint)
    return result


def text_of(data: bytes | str | None) -> str:
    """Captured output as text, whether a library handed it over as bytes, str or None."""
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")
