"""lab.host.mounts: reading mountinfo (pure)."""

from __future__ import annotations

from lab.host.mounts import unescape_mountinfo


def test_mountinfo_escapes_are_decoded():
    assert unescape_mountinfo(r"/tmp/a\040b\011c\134d") == "/tmp/a b\tc\\d"
