"""Reaching nodes over SSH: keys, ssh_config, and commands on many nodes at once.

Commands run through Fabric (paramiko), with host keys verified against the
lab's own known_hosts where the provider records one. Interactive shells
(`lab ssh`) use the system's `ssh` client with the same settings, written as
an ssh_config so `ssh -F`, `pytest --ssh-config` and testinfra see the same.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, BinaryIO, Callable, Iterable, Iterator, TextIO

from lab.errors import CommandError, PrerequisiteError, ProviderError
from lab.host.files import write_atomic

# paramiko logs a traceback from its transport thread for every refused banner
# while a node boots; lab reports connection failures itself. (Configuring a
# logger imports nothing of paramiko.)
logging.getLogger("paramiko").addHandler(logging.NullHandler())
logging.getLogger("paramiko").propagate = False


@contextlib.contextmanager
def transport_log(path: Path) -> Iterator[None]:
    """paramiko's own account of this process's SSH connections (each connect and login; what failed, with
    its traceback and which side closed) in `path`, from every thread, while the block runs: what explains
    a connection that dropped, after the fact."""
    logger = logging.getLogger("paramiko")
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(threadName)s %(name)s %(levelname)s %(message)s"))
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # not DEBUG: the key exchange's every step, for each of thousands
    try:
        yield
    finally:
        logger.setLevel(previous)
        logger.removeHandler(handler)
        handler.close()


@dataclass(frozen=True)
class SSHEndpoint:
    """Everything needed to reach one node over SSH, for ssh, Fabric and testinfra alike."""

    node: str
    host: str
    port: int
    user: str
    identity_file: Path
    # None means the provider cannot vouch for host keys (Vagrant's own boxes).
    known_hosts: Path | None = None
    extra_options: dict[str, str] = field(default_factory=dict)
    # The bastion this node is reached through (lab.host.reach), or None: reached directly.
    jump: "SSHEndpoint | None" = None


def ensure_keypair(private_key: Path, comment: str) -> Path:
    """Create the lab's own ed25519 keypair once (never a shared insecure key); a lost .pub is derived again."""
    if private_key.exists():
        public_key = private_key.with_suffix(".pub")
        if not public_key.exists():
            write_atomic(public_key, public_key_line(private_key.read_bytes(), comment), mode=0o644)
        return private_key
    private_text, public_text = generate_ed25519(comment)
    private_key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(private_key, private_text, mode=0o600)
    write_atomic(private_key.with_suffix(".pub"), public_text, mode=0o644)
    return private_key


def known_hosts_name(address: str, port: int) -> str:
    """How ssh and paramiko name a host in known_hosts: ADDRESS on port 22, else [ADDRESS]:PORT."""
    return address if port == 22 else f"[{address}]:{port}"


def record_host_key(known_hosts: Path, node: str, ip: str, public_line: str) -> None:
    """Pin a node's host key under its name and address, replacing what was pinned before."""
    key_type, key_data = public_line.split()[:2]
    lines = [line for line in (known_hosts.read_text().splitlines() if known_hosts.exists() else [])
             if line.split(" ", 1)[0] != f"{node},{ip}"]
    lines.append(f"{node},{ip} {key_type} {key_data}")
    known_hosts.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(known_hosts, "\n".join(lines) + "\n", mode=0o644)


def generate_ed25519(comment: str) -> tuple[str, str]:
    """(OpenSSH private key, `ssh-ed25519 AAAA... comment` public line)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption()).decode()
    return private, _openssh_public(key, comment)


def public_key_line(private_text: bytes, comment: str) -> str:
    """The `ssh-ed25519 AAAA... comment` line of an OpenSSH private key."""
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_ssh_private_key(private_text, password=None)
    except (ValueError, TypeError) as exc:
        raise ProviderError(f"the lab's SSH private key cannot be read: {exc}",
                            hint="restore it from a backup, or `lab destroy` and `lab up` to make the lab anew"
                            ) from None
    return _openssh_public(key, comment)


def _openssh_public(key, comment: str) -> str:
    from cryptography.hazmat.primitives import serialization

    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    return f"{public} {comment}\n"


def _quote(value: str) -> str:
    return f'"{value}"' if any(c.isspace() for c in value) else value


def config_path(path: PurePath) -> str:
    """A host path as ssh_config takes it on every OS: forward slashes (C:/Users/... on Windows,
    which Windows' OpenSSH reads; a backslash there may be taken for an escape), quoted if it has spaces."""
    return _quote(path.as_posix())


def control_path(lab_id: str) -> str | None:
    """Where a multiplexing ssh master for a node listens (ssh expands %n to the node); None on Windows,
    whose OpenSSH has no multiplexing.

    Short and outside the lab directory: unix socket paths are limited to
    about 100 bytes. Inert unless a client asks for ControlMaster, as
    testinfra's ssh backend does: one connection per node instead of one per
    check. `close_masters` ends them.
    """
    from lab.host.paths import private_dir, runtime_dir

    if sys.platform == "win32":
        return None
    # Not /tmp: a socket another user planted there would see every command.
    return str(private_dir(runtime_dir() / "ssh") / f"{lab_id}-%n")


def render_ssh_config(endpoints: Iterable[SSHEndpoint], control: str | None = None) -> str:
    blocks = []
    jumps: dict[str, SSHEndpoint] = {}
    for ep in endpoints:
        lines = [f"Host {ep.node}", f"  HostName {ep.host}", f"  Port {ep.port}", f"  User {ep.user}",
                 f"  IdentityFile {config_path(ep.identity_file)}", "  IdentitiesOnly yes",
                 "  LogLevel ERROR", "  ServerAliveInterval 5", "  ServerAliveCountMax 3"]
        if ep.jump is not None:
            # ssh runs the jump as `ssh -F THIS_FILE -W ... JUMP`: its block below is found there.
            jumps[ep.jump.node] = ep.jump
            lines.append(f"  ProxyJump {ep.jump.node}")
        if control:
            lines.append(f"  ControlPath {control}")
        if ep.known_hosts is not None:
            lines += [f"  UserKnownHostsFile {config_path(ep.known_hosts)}", "  StrictHostKeyChecking yes",
                      f"  HostKeyAlias {ep.node}"]
        else:
            lines += ["  UserKnownHostsFile /dev/null", "  StrictHostKeyChecking no"]
        lines += [f"  {key} {value}" for key, value in ep.extra_options.items()]
        blocks.append("\n".join(lines))
    if jumps:
        blocks += render_ssh_config(jumps.values()).rstrip("\n").split("\n\n")
    return "\n\n".join(blocks) + "\n"


def close_masters(ssh_config: Path, nodes: Iterable[str]) -> None:
    """End multiplexing ssh masters left by testinfra, so nothing outlives a command."""
    if sys.platform == "win32" or not ssh_config.exists() or shutil.which("ssh") is None:
        return
    for node in nodes:
        try:
            subprocess.run(["ssh", "-F", str(ssh_config), "-O", "exit", node], capture_output=True,
                           check=False, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass  # best effort: a master left behind exits when its node goes


def ssh_argv(endpoint: SSHEndpoint, ssh_config: Path, command: list[str] | None = None) -> list[str]:
    argv = ["ssh", "-F", str(ssh_config)]
    if command:
        argv += [endpoint.node, "--", *command]
    else:
        argv += ["-t", endpoint.node]
    return argv


# ---------------------------------------------------------------- Fabric


class NodeUnreachable(ProviderError):
    """A node did not answer over SSH: refused, timed out, or it stopped talking (a paused node does)."""

    def __init__(self, endpoint: SSHEndpoint, cause: BaseException) -> None:
        super().__init__(f"{endpoint.node}: cannot reach {endpoint.user}@{endpoint.host}:{endpoint.port} over SSH: "
                         f"{str(cause) or type(cause).__name__}",
                         hint=f"check that {endpoint.node} runs (`lab status`); a paused node answers nothing "
                              f"until `lab fault resume {endpoint.node}`, a stopped one until "
                              f"`lab fault start {endpoint.node}`")
        self.cause = cause


def ssh_errors() -> tuple[type[BaseException], ...]:
    """What paramiko and the socket layer raise when a node does not answer (paramiko imported here)."""
    import paramiko

    return paramiko.SSHException, OSError, EOFError


_parsed: dict[str, tuple[tuple[int, int, int, int], Any]] = {}
_parsed_lock = threading.Lock()


def parsed_known_hosts(path: Path):
    """A known_hosts file as paramiko's HostKeys, parsed once per version of the file (its device, inode,
    size and mtime: lab replaces it whole, write_atomic). Each connection used to parse the whole file: with a
    100-node lab's entries and a poll per node while they boot, `lab up` spent seconds of CPU there."""
    import paramiko

    try:
        stat = path.stat()
    except FileNotFoundError:  # nothing pinned: every key is refused (RejectPolicy), with lab's own message
        return paramiko.HostKeys()
    version = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    with _parsed_lock:
        cached = _parsed.get(str(path))
        if cached is not None and cached[0] == version:
            return cached[1]
    keys = paramiko.HostKeys(str(path))
    with _parsed_lock:
        _parsed[str(path)] = (version, keys)
    return keys


def connect(endpoint: SSHEndpoint, timeout: float = 10.0, answer_timeout: float | None = None):
    """A Fabric Connection that verifies the node's host key when the provider knows it.

    `timeout` bounds reaching the node (TCP, or the jump host's channel); `answer_timeout` (`timeout` if
    not given) bounds its sshd's greeting, and the authentication apart, once it was reached (the whole
    negotiation gets a second more).

    The connection opens on first use; a node that does not answer then raises
    NodeUnreachable (a ProviderError naming the node), never a paramiko error,
    whoever runs the commands.
    """
    import paramiko
    from fabric import Config, Connection

    if not endpoint.identity_file.is_file():
        raise ProviderError(f"{endpoint.node}: the lab's SSH key {endpoint.identity_file} is missing",
                            hint="the nodes trust only that key: restore it from a backup, or `lab destroy` "
                                 "and `lab up` to make the lab anew")
    config = Config(overrides={"load_ssh_configs": False, "run": {"warn": True, "hide": True}})
    # paramiko's one limit on the whole negotiation (whole seconds: Fabric truncates it): a second over
    # the greeting's own, so that a node that never greets is said to be that, not "No existing session"
    # (the limit passed first).
    negotiation_timeout = timeout if answer_timeout is None else math.ceil(answer_timeout) + 1
    gateway = None
    if endpoint.jump is not None:
        gateway = jump_connection(endpoint.jump)
    connection = Connection(endpoint.host, user=endpoint.user, port=endpoint.port, config=config,
                            connect_timeout=negotiation_timeout, gateway=gateway,
                            connect_kwargs={"key_filename": [str(endpoint.identity_file)],
                                            "look_for_keys": False, "allow_agent": False,
                                            "banner_timeout": answer_timeout or timeout,
                                            "auth_timeout": answer_timeout or timeout})
    client = connection.client
    if endpoint.known_hosts is not None:
        # known_hosts entries are written under the node name and its IP; an
        # unknown or changed key is refused, never silently accepted.
        host_keys = client.get_host_keys()
        host_keys.clear()
        name = known_hosts_name(endpoint.host, endpoint.port)
        for key_type, key in (parsed_known_hosts(endpoint.known_hosts).lookup(name) or {}).items():
            host_keys.add(name, key_type, key)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
    else:
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    connection.open = _closed_if_it_fails(connection)
    if endpoint.jump is not None:
        # Fabric's own opens the channel with paramiko's default wait (an hour) for a host that never answers.
        connection.open_gateway = lambda: channel_to(endpoint.jump, endpoint.host, endpoint.port, timeout)
        connection.open = _again_if_the_jump_dropped(connection.open, endpoint.jump)
    elif answer_timeout is not None:
        connection.open = _reaching_within(connection, timeout)
    # Fabric's run/sudo/put/sftp all open through `self.open()`: the instance
    # attributes below win over the class's methods.
    for name in ("open", "run", "sudo"):
        setattr(connection, name, _guarded(getattr(connection, name), endpoint))
    return connection


# ---------------------------------------------------------------- jump hosts (see lab.host.reach)

_jumps: dict[tuple, Any] = {}  # one open connection to each jump host, shared by every thread of this command
_jumps_lock = threading.Lock()


def _key(jump: SSHEndpoint) -> tuple:
    return jump.host, jump.port, jump.user, str(jump.identity_file), str(jump.known_hosts)


class JumpUnreachable(NodeUnreachable):
    """The jump host itself did not answer: every node behind it is unreachable from here."""

    def __init__(self, endpoint: SSHEndpoint, cause: BaseException) -> None:
        ProviderError.__init__(self, f"cannot reach the jump host {endpoint.user}@{endpoint.host}:{endpoint.port}: "
                                     f"{str(cause) or type(cause).__name__}",
                               hint="check the jump host in lab.yaml (providers.hosts.jump, or the host of "
                                    "providers.libvirt.uri) and that it answers SSH from this machine; a lab checks "
                                    "it against the key it pinned at its first `lab up` (`lab-jump` in the lab's "
                                    "ssh/known_hosts): a jump host replaced since needs a new lab")
        self.cause = cause


# How long the jump host may take to connect a channel at most; a caller waiting less gives up on it
# and the channel is closed whenever it does open (channel_to).
CHANNEL_OPEN_LIMIT = 150.0


def jump_connection(jump: SSHEndpoint):
    """The open Fabric connection to the jump host (made once per command; again if it dropped)."""
    with _jumps_lock:  # Connection.open is not safe to race: the first caller opens it for the others
        connection = _jumps.get(_key(jump))
        if connection is None or connection.transport is None or not connection.transport.is_active():
            connection = connect(jump)
            try:
                connection.open()
            except NodeUnreachable as exc:
                raise JumpUnreachable(jump, exc.cause) from None
            connection.transport.set_keepalive(5)
            _jumps[_key(jump)] = connection
        return connection


def channel_to(jump: SSHEndpoint, host: str, port: int, timeout: float | None = None):
    """A direct-tcpip channel to host:port, opened by the jump host: a socket-like paramiko Channel.

    A host that does not answer raises what paramiko raises (ChannelException), or socket.timeout
    after `timeout`, as a direct connection raises OSError: callers that wait for a booting node retry
    on it. paramiko gives up waiting on a channel but keeps it: one the jump host opens after the
    caller gave up would stay open, one per retry of a poller (the sshd there runs out of them during a
    long partition). Here the channel is opened in a thread that closes it if nobody waits any more.
    """
    transport = jump_connection(jump).transport
    opened: dict[str, Any] = {}
    done, abandoned = threading.Event(), threading.Event()

    def open_it() -> None:
        try:
            opened["channel"] = transport.open_channel("direct-tcpip", (host, int(port)), ("", 0),
                                                       timeout=CHANNEL_OPEN_LIMIT)
        except Exception as exc:  # noqa: BLE001 - handed to the caller as it is
            opened["error"] = exc
        done.set()
        if abandoned.is_set() and "channel" in opened:
            opened["channel"].close()

    threading.Thread(target=open_it, name=f"channel-{host}:{port}", daemon=True).start()
    wait = CHANNEL_OPEN_LIMIT if timeout is None else timeout
    if not done.wait(wait):
        abandoned.set()
        if "channel" in opened:  # it opened just now: closed here or by the thread (closing twice is harmless)
            opened["channel"].close()
        raise socket.timeout(f"the jump host {jump.host} did not connect {host}:{port} within {wait:g} s")
    if "error" in opened:
        raise opened["error"]
    return opened["channel"]


def _again_if_the_jump_dropped(open_connection: Callable, jump: SSHEndpoint) -> Callable:
    """Connection.open through the shared jump connection, once more on a new one if that one dropped
    during this handshake: every node's connection opening then fails at once (three nodes' SSH at a
    partition's start on three emulated VMs, 2026-12-03, sshd reset by lab's side; cause not found)."""
    errors = ssh_errors()

    def call(*args, **kwargs):
        transport = jump_connection(jump).transport
        try:
            return open_connection(*args, **kwargs)
        except errors:
            if transport.is_active():
                raise  # the node did not answer: the jump host is fine
            return open_connection(*args, **kwargs)  # channel_to opens a new jump connection

    return call


def _reaching_within(connection, timeout: float) -> Callable:
    """Connection.open with the TCP connection made here, within `timeout`. paramiko's one timeout bounds
    the TCP connect and the whole SSH negotiation after it: a short one (a booting node refuses, try
    again soon) failed nodes that are only slow to answer; a long one let a try hang on an address
    not up yet."""
    open_connection = connection.open

    def call(*args, **kwargs):
        if connection.is_connected:
            return open_connection(*args, **kwargs)
        connection.connect_kwargs["sock"] = socket.create_connection((connection.host, connection.port), timeout)
        try:
            return open_connection(*args, **kwargs)  # closes the socket if it fails (_closed_if_it_fails)
        finally:
            del connection.connect_kwargs["sock"]  # the next open (after a close) connects anew

    return call


def _closed_if_it_fails(connection) -> Callable:
    """Fabric's Connection.open, with what a failed open left behind closed at once. Fabric's close()
    closes only a connection that opened: paramiko's transport of a failed one went on (its channel
    through a jump host with it) and the node's sshd kept a connection that never logs in, until its
    LoginGraceTime; enough of those (MaxStartups) and sshd drops new ones unanswered."""
    open_connection = connection.open
    errors = ssh_errors()

    def call(*args, **kwargs):
        before = connection.client.get_transport()
        try:
            return open_connection(*args, **kwargs)
        except errors as exc:
            transport = connection.client.get_transport()
            # paramiko's negotiation can fail in its thread just as the caller's wait for it ends: the caller
            # then sees "No existing session", and the transport keeps what really happened.
            happened = (transport.get_exception() if transport is not None and transport is not before
                        and not transport.is_active() else None)
            if happened is None and str(exc) == "No existing session":  # and nothing failed: it was slow
                happened = socket.timeout(f"no SSH session within {connection.connect_timeout} s (the node "
                                          f"greeted, the key exchange did not finish)")
            connection.client.close()
            if happened is not None and happened is not exc:
                raise happened from None
            raise

    return call


def _guarded(method: Callable, endpoint: SSHEndpoint) -> Callable:
    errors = ssh_errors()

    def call(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except errors as exc:
            raise NodeUnreachable(endpoint, exc) from None

    return call


@dataclass
class NodeResult:
    node: str
    command: str
    exit_status: int | None
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


class _PrefixedWriter:
    """A stream Fabric writes to: each complete line goes out prefixed by the node name."""

    def __init__(self, prefix: str, target: TextIO, lock: threading.Lock) -> None:
        self.prefix, self.target, self.lock, self.buffer = prefix, target, lock, ""

    def write(self, data: str) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split("\n")
        if lines:
            with self.lock:
                for line in lines:
                    self.target.write(f"{self.prefix}{line}\n")
                self.target.flush()

    def flush(self) -> None:
        pass  # invoke flushes after every chunk; a partial line waits for its end

    def close(self) -> None:
        if self.buffer:
            self.write("\n")


def timed_out(exc: BaseException) -> bool:
    """Whether an exception from a Fabric `run` is invoke's CommandTimedOut (it carries the partial result).

    Matched by name so that importing this module does not import invoke.
    """
    return type(exc).__name__ == "CommandTimedOut"


def run(endpoint: SSHEndpoint, command: str, *, timeout: float | None = None,
        echo_prefix: str | None = None, check: bool = False, lock: threading.Lock | None = None) -> NodeResult:
    """Run one command on one node. Connection failures raise ProviderError."""
    streams = {}
    if echo_prefix is not None:
        lock = lock or threading.Lock()
        streams = {"out_stream": _PrefixedWriter(echo_prefix, sys.stdout, lock),
                   "err_stream": _PrefixedWriter(echo_prefix, sys.stderr, lock)}
    try:
        with connect(endpoint) as connection:
            result = connection.run(command, timeout=timeout, in_stream=False, **streams)
            status: int | None = result.exited
            out, err = result.stdout, result.stderr
    except ssh_errors() as exc:  # closing the connection can fail too
        raise NodeUnreachable(endpoint, exc) from None
    except Exception as exc:
        if not timed_out(exc):
            raise
        status, out, err = None, exc.result.stdout, exc.result.stderr
    finally:
        for stream in streams.values():
            stream.close()
    node_result = NodeResult(endpoint.node, command, status, out, err)
    if check and not node_result.ok:
        raise CommandError(command, where=endpoint.node, exit_status=status, output=out + err)
    return node_result


def run_with_input(endpoint: SSHEndpoint, command: str, source: BinaryIO, *, timeout: float,
                   chunk: int = 1024 * 1024, cancel: threading.Event | None = None) -> NodeResult:
    """Run `command` on the node with `source` streamed to its stdin (bytes, any size), then its end.

    Fabric's in_stream reads a character stream in small pieces; this sends the file through the
    session channel as it is read, so a gigabyte never sits in memory. `timeout` bounds every wait
    on the channel (a node that stops answering), not the whole transfer. Once `cancel` is set (Ctrl-C)
    the session is closed within a second and Cancelled raised: the node's side sees its input end early.
    """
    stop_if_cancelled(cancel, endpoint)
    try:
        with connect(endpoint) as connection:
            connection.open()
            transport = connection.client.get_transport()
            channel = transport.open_session(timeout=timeout)
            session = _Session(channel, endpoint, timeout, cancel)
            channel.exec_command(command)
            while data := source.read(chunk):
                if not session.send(data):
                    break  # it gave up (a refused slot, a full disk): its message says why
            if not channel.closed:
                channel.shutdown_write()
            out, err = session.read_to_exit()
            if not channel.exit_status_ready() and not transport.is_active():
                raise EOFError("the connection dropped before the command's end")
            status = channel.recv_exit_status()
    except ssh_errors() as exc:
        raise NodeUnreachable(endpoint, exc) from None
    return NodeResult(endpoint.node, command, status, out.decode(errors="replace"), err.decode(errors="replace"))


class Cancelled(ProviderError):
    """A node's session closed on the command's way out (Ctrl-C, or another node's failure)."""


def stop_if_cancelled(cancel: threading.Event | None, endpoint: SSHEndpoint) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"{endpoint.node}: stopped half-way (Ctrl-C, or another node failed)")


class _Session:
    """One command's channel, every wait on it in short steps: a cancel is heard within POLL seconds
    (while the node reads slowly at a low weight, or inflates and syncs), and `timeout` seconds without
    any progress is a node that stopped answering."""

    POLL = 0.5

    def __init__(self, channel, endpoint: SSHEndpoint, timeout: float, cancel: threading.Event | None) -> None:
        self.channel, self.endpoint, self.timeout, self.cancel = channel, endpoint, timeout, cancel
        channel.settimeout(self.POLL)
        self.progress_at = time.monotonic()

    def _unless_cancelled(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            # The transport, not the channel: closing a channel sends a message and may block on a
            # stalled socket; the node's side sees its input end either way.
            self.channel.get_transport().close()
            stop_if_cancelled(self.cancel, self.endpoint)

    def _waited(self) -> None:
        """Called after a wait that brought nothing."""
        self._unless_cancelled()
        if time.monotonic() - self.progress_at > self.timeout:
            raise TimeoutError(f"no progress for {self.timeout:.0f} s")

    def _progressed(self) -> None:
        self.progress_at = time.monotonic()

    def send(self, data: bytes) -> bool:
        """Send all of `data`; False when the command ended (or closed its input) before taking it."""
        view = memoryview(data)
        while view:
            self._unless_cancelled()
            if self.channel.exit_status_ready():
                return False
            try:
                sent = self.channel.send(view)
            except socket.timeout:  # its window is full: the node reads slowly
                self._waited()
                continue
            except OSError:
                if self.channel.closed or self.channel.exit_status_ready():
                    return False  # the same, noticed while sending: read what it said
                raise
            if sent == 0:  # the channel is closed
                return False
            view = view[sent:]
            self._progressed()
        return True

    def read_to_exit(self) -> tuple[bytearray, bytearray]:
        """What the node's side prints (a line or two), stdout and stderr, until it exits and closes."""
        out, err = bytearray(), bytearray()
        while True:
            # Looked at before the buffers are read: the end arrives after the last output, so once it
            # is seen, reading the buffers gets everything (looked at after, output could slip in between).
            ended = self.channel.closed or (self.channel.exit_status_ready() and self.channel.eof_received)
            got = False
            while self.channel.recv_ready():
                out += self.channel.recv(65536)
                got = True
            while self.channel.recv_stderr_ready():
                err += self.channel.recv_stderr(65536)
                got = True
            if ended:
                return out, err
            if got:
                self._progressed()
            else:
                self._waited()
                time.sleep(0.1)


# SSH sessions lab keeps open at once: each costs a key exchange (CPU on this host and the node's) and a
# thread; a 100-node lab set up 100 at a time only makes every handshake slower.
SSH_CONCURRENCY = 16


def parallel_map(function: Callable, items: Iterable, limit: int = SSH_CONCURRENCY,
                 stop: threading.Event | None = None) -> list:
    """function(item) for every item, at most `limit` at a time, results in order; the first error raises.

    No item starts after one has failed (or after Ctrl-C): staging the next node's slot or configuring the
    next node would only add work to undo. Items already running finish first; `stop`, set then, is how
    they can hear it and stop early (run_with_input's cancel). The error raised is the one that stopped
    the others, not what they raised on hearing it.
    """
    items = list(items)
    if not items:
        return []
    stop = stop or threading.Event()
    first_error: list[BaseException] = []
    lock = threading.Lock()

    def guarded(item):
        if stop.is_set():
            raise _NotStarted
        try:
            return function(item)
        except BaseException as exc:
            with lock:
                if not stop.is_set():
                    first_error.append(exc)
                stop.set()  # by the failing thread itself, before a free worker can take the next item
            raise

    with ThreadPoolExecutor(max_workers=min(limit, len(items))) as pool:
        futures = [pool.submit(guarded, item) for item in items]
        try:
            wait(futures)
        except BaseException:  # Ctrl-C: the running ones hear it through `stop`
            stop.set()
            raise
    if first_error:
        raise first_error[0]
    return [future.result() for future in futures]


class _NotStarted(Exception):
    """An item parallel_map skipped because an earlier one failed."""


def run_many(endpoints: list[SSHEndpoint], command: str, *, timeout: float | None = None,
             echo: bool = False) -> list[NodeResult]:
    """Run a command on several nodes in parallel; output prefixed by node name when echoed."""
    if not endpoints:
        return []
    lock = threading.Lock()
    width = max(len(ep.node) for ep in endpoints)
    with ThreadPoolExecutor(max_workers=min(SSH_CONCURRENCY, len(endpoints))) as pool:
        futures = [pool.submit(run, ep, command, timeout=timeout, lock=lock,
                               echo_prefix=f"{ep.node:<{width}} | " if echo else None)
                   for ep in endpoints]
        results = []
        for ep, future in zip(endpoints, futures):
            try:
                results.append(future.result())
            except ProviderError as exc:
                results.append(NodeResult(ep.node, command, None, "", exc.message))
    return results


# How long a node that accepted the connection has to greet and let lab in, per try. A booting node
# refuses fast (its connect fails in `timeout`); a loaded one is slow to fork and exec its sshd (CI,
# 2026-12-03: a host behind a jump host sent no greeting within 2 s for a minute of tries): every try
# given up is one more sshd started for nothing.
ANSWER_TIMEOUT = 15.0
CONSOLE_HINT = "look at the node's console log in the lab directory"


def wait_for_ssh(endpoint: SSHEndpoint, deadline: float, is_alive: Callable[[], bool] = lambda: True,
                 poll: float = 0.2, hint: str = CONSOLE_HINT) -> None:
    """Wait until the node runs a command over SSH, or the deadline passes (a try under way when it does
    finishes first: up to 2 s to reach the node, then ANSWER_TIMEOUT for each of its greeting, the login
    and `true`)."""
    import paramiko
    from invoke.exceptions import CommandTimedOut

    met: Counter[str] = Counter()  # what the tries met: a refusing, a silent and an overloaded sshd differ
    tries, started = 0, time.monotonic()
    while time.monotonic() < deadline:
        if not is_alive():
            raise ProviderError(f"{endpoint.node}: stopped while booting", hint=CONSOLE_HINT)
        tries += 1
        answer_timeout = max(2.0, min(ANSWER_TIMEOUT, deadline - time.monotonic()))
        try:
            with connect(endpoint, timeout=2.0, answer_timeout=answer_timeout) as connection:
                if connection.run("true", timeout=max(5.0, answer_timeout), in_stream=False).exited == 0:
                    return
        except (NodeUnreachable, CommandTimedOut, *ssh_errors()) as exc:
            cause = exc.cause if isinstance(exc, NodeUnreachable) else exc
            met[str(cause) or type(cause).__name__] += 1
            if isinstance(cause, paramiko.BadHostKeyException):
                raise ProviderError(f"{endpoint.node}: host key does not match the lab's known_hosts",
                                    hint="the node was replaced behind lab's back: `lab destroy` and `lab up`") from None
        time.sleep(poll)
    raise ProviderError(f"{endpoint.node}: did not answer SSH on {endpoint.host}:{endpoint.port} in time "
                        f"({tries} {'try' if tries == 1 else 'tries'} in {time.monotonic() - started:.0f} s: "
                        f"{', '.join(f'{count}x {error}' for error, count in met.most_common(3)) or 'no answer'})",
                        hint=hint)


INSTALL_HINTS = {
    "win32": {"ssh": "install Windows' OpenSSH client: Settings > System > Optional features > OpenSSH Client "
                     "(or, as administrator: `Add-WindowsCapability -Online -Name OpenSSH.Client~~~~0.0.1.0`)"},
    "darwin": {"ssh": "macOS ships ssh as /usr/bin/ssh: put /usr/bin on PATH"},
    "linux": {"ssh": "apt-get install openssh-client (dnf install openssh-clients on Fedora)"},
}


def find_program(name: str) -> str:
    """The path of `name` on PATH (with PATHEXT on Windows); a PrerequisiteError saying how to install it."""
    found = shutil.which(name)
    if found is None:
        hints = INSTALL_HINTS.get(sys.platform, INSTALL_HINTS["linux"])
        raise PrerequisiteError(f"{name} not found on PATH", hint=hints.get(name, f"install {name}"))
    return found


def exec_interactive(argv: list[str], env: dict[str, str] | None = None) -> int:
    """Hand the terminal to `argv` (ssh, mostly); its exit status, for the caller to exit with.

    On Linux and macOS this process becomes the program (exec): the terminal,
    signals and exit status are entirely its own, and this never returns.
    Windows has no exec: os.exec* there starts a new process and ends this
    one at once, so the shell's prompt would come back while ssh still reads
    the console. There the program runs as a child, waited for without a
    timeout (an interactive session ends when its user says so), with Ctrl-C
    left to it.
    """
    binary = find_program(argv[0])
    environment = dict(os.environ if env is None else env)
    if sys.platform != "win32":
        os.execve(binary, [argv[0], *argv[1:]], environment)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return subprocess.call([binary, *argv[1:]], env=environment)
    finally:
        signal.signal(signal.SIGINT, previous)
