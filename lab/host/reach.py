"""How this machine reaches a node's TCP ports: directly, or through an SSH jump host.

Directly is the default: the nodes' addresses are routable from here (a bridge, a
VM network, a LAN). Machines behind a bastion (`providers.hosts.jump`) are reached
as OpenSSH's ProxyJump reaches them: one SSH connection to the jump host per
command, and a `direct-tcpip` channel through it for every connection to a node
(SSH, etcd's client port, a service's port). The node's own address stays in
every URL, host-key check and TLS check: only the socket is carried. SSH's own
part (the shared jump connection, its channels) is in lab.host.ssh; this module
gives what speaks HTTP a socket through it.
"""

from __future__ import annotations

import functools
import select
import socket
import threading
from typing import TYPE_CHECKING, Any

from lab.errors import ProviderError

if TYPE_CHECKING:
    from lab.host.ssh import SSHEndpoint

_PUMP_CHUNK = 65536


def tunnel_socket(jump: "SSHEndpoint", host: str, port: int, timeout: float | None = None) -> socket.socket:
    """A real socket connected to host:port through the jump host.

    What needs a socket of its own (TLS, httpcore) gets one end of a socket
    pair; a thread copies between the other end and the SSH channel until
    either side closes.
    """
    from lab.host.ssh import channel_to

    channel = channel_to(jump, host, port, timeout)
    ours, theirs = socket.socketpair()
    threading.Thread(target=_pump, args=(theirs, channel), name=f"tunnel-{host}:{port}", daemon=True).start()
    ours.settimeout(timeout)
    return ours


def _pump(sock: socket.socket, channel) -> None:
    try:
        while True:
            readable, _, _ = select.select([sock, channel], [], [])
            if sock in readable:
                data = sock.recv(_PUMP_CHUNK)
                if not data:
                    break
                channel.sendall(data)
            if channel in readable:
                data = channel.recv(_PUMP_CHUNK)
                if not data:
                    break
                sock.sendall(data)
    except OSError:
        pass  # either side went away: both are closed below
    finally:
        channel.close()
        sock.close()


def http_client(jump: "SSHEndpoint | None", *, verify: Any = True, **kwargs):
    """An httpx.Client that reaches its URLs' hosts directly, or through the jump host.

    Through a jump, URLs keep the node's address (TLS checks that name); only the
    transport's sockets come from `tunnel_socket`. Never a proxy from the
    environment: lab's requests go to the lab's nodes only.
    """
    import httpx

    if jump is None:
        return httpx.Client(verify=verify, trust_env=False, **kwargs)
    transport = httpx.HTTPTransport(verify=verify, trust_env=False, limits=kwargs.pop("limits", httpx.Limits()))
    pool = getattr(transport, "_pool", None)
    if pool is None or not hasattr(pool, "_network_backend"):  # httpx/httpcore changed their insides
        raise ProviderError("this httpx cannot carry connections through a jump host",
                            hint="install the httpx version pyproject.toml names (tools/install.sh)")
    pool._network_backend = _tunnel_backend_class()(jump)
    return httpx.Client(transport=transport, trust_env=False, **kwargs)


@functools.cache
def _tunnel_backend_class():
    """httpcore's own backend, its sockets made by tunnel_socket (defined on first use: httpcore loads then)."""
    import httpcore
    from httpcore._backends.sync import SyncStream  # the stream httpcore's own backend wraps a socket in

    class TunnelBackend(httpcore.SyncBackend):
        def __init__(self, jump: "SSHEndpoint") -> None:
            self.jump = jump

        def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
            from lab.host.ssh import ssh_errors

            try:
                return SyncStream(tunnel_socket(self.jump, host, port, timeout))
            except ProviderError as exc:  # httpx reports these as a ConnectError, as a refused connection
                raise httpcore.ConnectError(exc.message) from None
            except socket.timeout as exc:
                raise httpcore.ConnectTimeout(str(exc)) from None
            except ssh_errors() as exc:
                raise httpcore.ConnectError(f"through the jump host {self.jump.host}: "
                                            f"{exc or type(exc).__name__}") from None

    return TunnelBackend
