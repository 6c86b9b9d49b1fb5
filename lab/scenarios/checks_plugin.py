"""A pytest plugin loaded into every scenario's testinfra run (`-p lab.scenarios.checks_plugin`):
fixtures a check needs beside testinfra's `host`, so scenario files do not each
carry their own copy.

    def test_member_is_healthy(etcdctl):
        assert etcdctl("endpoint health").rc == 0
"""

from __future__ import annotations

from typing import Callable

import pytest

from lab.node.layout import CLIENT_PORT, NODE_PKI_DIR


@pytest.fixture
def etcdctl(host) -> Callable[[str], object]:
    """Run etcdctl on the node against its own member, with the lab's certificates when TLS is on."""
    if host.file(f"{NODE_PKI_DIR}/node.crt").exists:
        flags = (f"--endpoints=https://127.0.0.1:{CLIENT_PORT} --cacert={NODE_PKI_DIR}/ca.crt "
                 f"--cert={NODE_PKI_DIR}/node.crt --key={NODE_PKI_DIR}/node.key")
    else:
        flags = f"--endpoints=http://127.0.0.1:{CLIENT_PORT}"
    return lambda args: host.run(f"ETCDCTL_API=3 etcdctl {flags} {args}")
