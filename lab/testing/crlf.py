"""A tree as a Windows clone with `core.autocrlf=true` has it, for the tests of lab's line-ending guards."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable


def crlf_copy(source: Path, target: Path, is_text: Callable[[bytes], bool]) -> Path:
    """Copy `source` (a file or a tree) to `target` with every text file's LF made CRLF, modes kept;
    `is_text` says which files git would treat as text."""
    for file in [source] if source.is_file() else sorted(source.rglob("*")):
        if not file.is_file() or "__pycache__" in file.parts:
            continue
        copy = target if file == source else target / file.relative_to(source)
        copy.parent.mkdir(parents=True, exist_ok=True)
        data = file.read_bytes()
        copy.write_bytes(data.replace(b"\n", b"\r\n") if is_text(data) else data)
        shutil.copymode(file, copy)
    return target
