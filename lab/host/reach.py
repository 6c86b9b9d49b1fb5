"""How this machine reaches a node's TCP ports: directly, or through an SSH jump host.

Directly is the default: the nodes' addresses are routable from here (a bridge, a
VM network, a LAN). Machines behind a bastion (`providers.hosts.jump`) are reached
as OpenSSH's ProxyJump reaches them: one SSH connection to the jump host per
command, and a `direct-tcpip` channel through it for every connection to a node
(SSH, etcd's client port, a service's port). The node's own address stays in
every URL, host-key check and TLS check: only the socket is carried.
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
_jumps: dict[tuple, Any] = {}  # one open connection to each jump host, shared by every thread of this command
_jumps_lock = threading.Lock()


def _key(jump: "SSHEndpoint") -> tuple:
    return jump.host, jump.port, jump.user, str(jump.identity_file), str(jump.known_hosts)


def jump_connection(jump: "SSHEndpoint"):
    """The open Fabric connection to the jump host (made once per command; again if it dropped)."""
    from lab.host.ssh import NodeUnreachable, connect

    with _jumps_lock:  # Connection.open is not safe to race: the first caller opens it for the others
        connection = _jumps.get(_key(jump))
        if connection is None or connection.transport is None or not connection.transport.is_active():
            connection = connect(jump)
            try:
                connection.open()
            except NodeUnreachable as exc:
                raise ProviderError(f"cannot reach the jump host {jump.user}@{jump.host}:{jump.port}: "
                                    f"{exc.cause or type(exc.cause).__name__}",
                                    hint="check providers.hosts.jump in lab.yaml (address, user, port, key) and "
                                         "that it answers SSH from this machine") from None
            connection.transport.set_keepalive(5)
            _jumps[_key(jump)] = connection
        return connection


def channel_to(jump: "SSHEndpoint", host: str, port: int, timeout: float | None = None):
    """A direct-tcpip channel to host:port, opened by the jump host: a socket-like paramiko Channel.

    A host that does not answer raises what paramiko raises (ChannelException), as a direct connection
    raises OSError: callers that wait for a booting node retry on it; a jump host that cannot be
    reached at all is a ProviderError saying so.
    """
    transport = jump_connection(jump).transport
    return transport.open_channel("direct-tcpip", (host, int(port)), ("", 0), timeout=timeout)


def tunnel_socket(jump: "SSHEndpoint", host: str, port: int, timeout: float | None = None) -> socket.socket:
    """A real socket connected to host:port through the jump host.

    What needs a socket of its own (TLS, httpcore) gets one end of a socket
    pair; a thread copies between the other end and the SSH channel until
    either side closes.
    """
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
            except ssh_errors() as exc:
                raise httpcore.ConnectError(f"through the jump host {self.jump.host}: "
                                            f"{exc or type(exc).__name__}") from None

    return TunnelBackend
