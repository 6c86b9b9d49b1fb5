"""Render the lab's Vagrantfile from `Vagrantfile.j2`.

The template never sees a raw spec value: `_template_values` turns every value
into a Ruby literal first (strings through `ruby_str`, numbers and booleans
checked and written out), so nothing in lab.yaml can end a string early or
reach Ruby's `#{...}` interpolation. jinja2 runs with `StrictUndefined`: a name
the template uses but lab does not pass is an error, never an empty string.

Only one provider's block is rendered, and the Vagrantfile does not force
`VAGRANT_DEFAULT_PROVIDER`: lab passes `--provider` to `vagrant up`, and Vagrant
then remembers each machine's provider under `.vagrant/machines/NAME/`. Forcing
the provider inside the Vagrantfile would make every other command (`status`,
`validate`, `destroy`) fail outright on a host where that hypervisor is
missing, even for a lab that was never created there.
"""

from __future__ import annotations

import hashlib
import ipaddress
import posixpath
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any, Mapping

from lab.errors import ProviderError
from lab.host.paths import resource
from lab.host.files import write_atomic
from lab.images.recipes import host_arch, native_arch
from lab.images.vagrantbox import vagrant_box_name_for
from lab.model.catalog import VAGRANT_PROVIDERS

if TYPE_CHECKING:  # pragma: no cover
    from lab.providers.base import LabContext
    from lab.model.spec import LabSpec

TEMPLATE_NAME = "Vagrantfile.j2"
VAGRANTFILE = "Vagrantfile"
# Forwarded ports listen on the host's loopback only: a lab's etcd or SSH
# should never be reachable from the host's LAN by accident.
FORWARD_HOST_IP = "127.0.0.1"


def vagrant_box_name(spec: "LabSpec") -> str:
    """Name of the locally added Vagrant box for the spec's box, e.g. `lab-labos-1`.

    A box added from a file (`vagrant box add lab-labos-1 labos-1.box`) has no
    metadata and therefore no version of its own (Vagrant shows 0), so the
    version is part of the name. The name has no `/` on purpose: Vagrant takes
    `owner/name` for a Vagrant Cloud shorthand and, when the box is missing,
    would try to reach the cloud instead of failing at once. A box the user
    names with `box.vagrant` is taken as it is: lab checks it is added before
    `vagrant up` (lab_problem), so a missing one fails at once there too.
    """
    return spec.box.vagrant or vagrant_box_name_for(spec.box.name, spec.box.version, box_arch(spec))


# Firmware an arm64 guest boots under QEMU: edk2 built for QEMU's virt machine (Debian: qemu-efi-aarch64),
# given as its ROM (no NVRAM: edk2 then starts the removable-media loader, EFI/BOOT/BOOTAA64.EFI, each boot).
AARCH64_FIRMWARE = "/usr/share/qemu-efi-aarch64/QEMU_EFI.fd"


def box_arch(spec: "LabSpec") -> str:
    """The architecture of the lab's boxes: box.arch, or this machine's when auto (an arm64 host
    picks arm64 boxes by itself). A machine lab builds no boxes for is taken as amd64's emulator."""
    return native_arch() if spec.box.arch == "auto" else spec.box.arch


def machine_prefix(context: "LabContext") -> str:
    """What a lab's machine names start with on the hypervisor (names there are host-wide)."""
    return f"{context.spec.name}-{context.lab_id}-"


def libvirt_network_name(context: "LabContext") -> str:
    return f"lab-{context.lab_id}"


def private_mac(provider: str, lab_id: str, index: int) -> str:
    """The MAC of node `index`'s NIC on the lab's private network, as Vagrant's providers take it: 12 hex digits.

    lab chooses it so that adoption finds the NIC by it (Vagrant configures
    nothing in the guest). Locally administered and unicast, with the lab id
    in it, so two labs' nodes never share one; VMware takes static addresses
    only in 00:50:56:00:00:00-00:50:56:3F:FF:FF.
    """
    digest = hashlib.sha256(lab_id.encode()).digest()
    if provider == "vmware_desktop":
        prefix = bytes([0x00, 0x50, 0x56, digest[0] & 0x3F])
    else:
        prefix = bytes([0x0A, digest[0], digest[1], digest[2]])
    return (prefix + index.to_bytes(2, "big")).hex().upper()


# ---------------------------------------------------------------- Ruby literals

_RUBY_ESCAPES = {"\\": "\\\\", '"': '\\"', "#": "\\#", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def ruby_str(value: Any) -> str:
    """A double-quoted Ruby string literal holding exactly `str(value)`.

    Every `#` is escaped, so `#{...}`, `#@x` and `#$x` interpolation cannot
    happen; control characters are written as `\\u{..}` escapes.
    """
    out = ['"']
    for char in str(value):
        escaped = _RUBY_ESCAPES.get(char)
        if escaped is None:
            code = ord(char)
            escaped = f"\\u{{{code:x}}}" if code < 0x20 or code == 0x7F else char
        out.append(escaped)
    out.append('"')
    return "".join(out)


def ruby_int(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProviderError(f"{TEMPLATE_NAME}: expected a whole number, got {value!r}")
    return str(value)


def ruby_bool(value: Any) -> str:
    if not isinstance(value, bool):
        raise ProviderError(f"{TEMPLATE_NAME}: expected true or false, got {value!r}")
    return "true" if value else "false"


# ---------------------------------------------------------------- rendering

def render_vagrantfile(context: "LabContext", provider: str) -> str:
    """The Vagrantfile text for `context`, with the block of `provider` only."""
    template = resource(TEMPLATE_NAME)
    try:
        source = template.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProviderError(f"{template}: cannot be read ({exc})",
                            hint="reinstall lab: the Vagrantfile template ships with it") from None
    return render_template(source, _template_values(context, provider))


def write_vagrantfile(context: "LabContext", provider: str) -> Path:
    """Render and atomically write `<lab_dir>/Vagrantfile`; returns its path."""
    path = context.lab_dir / VAGRANTFILE
    write_atomic(path, render_vagrantfile(context, provider))
    return path


def render_template(source: str, values: Mapping[str, Any], *, name: str = TEMPLATE_NAME) -> str:
    """Render template text with the settings every lab template uses.

    Public so tests can push a small broken template through the very same
    environment; errors become ProviderError naming the template and line.
    """
    import jinja2  # only `lab up` and friends pay for jinja2

    environment = jinja2.Environment(
        # FunctionLoader, unlike DictLoader, gives the template a file name, so
        # jinja2's rewritten traceback tells us the template line of an error.
        loader=jinja2.FunctionLoader(lambda wanted: (source, name, lambda: True) if wanted == name else None),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["ruby_str"] = ruby_str
    try:
        return environment.get_template(name).render(**values)
    except jinja2.UndefinedError as exc:
        line = _template_line(exc, name)
        where = f"{name}:{line}" if line else name
        raise ProviderError(f"{where}: undefined variable: {_undefined_name(str(exc))}",
                            hint="the template uses a value lab does not pass; fix the template") from None
    except jinja2.TemplateSyntaxError as exc:
        raise ProviderError(f"{name}:{exc.lineno}: {exc.message}",
                            hint="fix the template syntax at that line") from None


def _undefined_name(message: str) -> str:
    # jinja2 says "'x' is undefined" or "'dict object' has no attribute 'y'"
    if message.endswith(" is undefined") and message.startswith("'"):
        return message[1:-len(" is undefined") - 1]
    return message


def _template_line(exc: BaseException, name: str) -> int | None:
    # jinja2 rewrites tracebacks so template frames carry the template's name and line.
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == name:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _template_values(context: "LabContext", provider: str) -> dict[str, Any]:
    """Everything the template may use, each leaf already a Ruby literal.

    `provider_id` is the one raw value: it is checked against the fixed list of
    Vagrant providers, picks the provider block and appears only in a comment.
    """
    if provider not in VAGRANT_PROVIDERS:
        raise ProviderError(f"{TEMPLATE_NAME}: {provider!r} is not a Vagrant provider",
                            hint=f"choose one of: {', '.join(VAGRANT_PROVIDERS)}")
    spec = context.spec
    if not context.nodes:
        raise ProviderError(f"lab {spec.name!r} has no nodes to render")
    first = context.nodes[0].name
    try:
        netmask = str(ipaddress.IPv4Network(context.subnet).netmask)
    except ValueError as exc:
        raise ProviderError(f"lab subnet {context.subnet!r} is not an IPv4 network ({exc})") from None
    prefix = machine_prefix(context)
    nodes = []
    for node in context.nodes:
        try:
            ip = context.addresses[node.name]
        except KeyError:
            raise ProviderError(f"node {node.name!r} has no address on the lab subnet {context.subnet}") from None
        ports = [{"guest": ruby_int(p.guest), "host": ruby_int(p.host), "protocol": ruby_str(p.protocol),
                  "host_ip": ruby_str(FORWARD_HOST_IP)}
                 for p in spec.forwarded_ports if (p.node or first) == node.name]
        nodes.append({
            "name": ruby_str(node.name),
            "ip": ruby_str(ip),
            "cpus": ruby_int(node.cpus),
            "memory": ruby_int(node.memory),
            # vmx settings are strings in VMware's file format
            "memory_str": ruby_str(node.memory),
            "cpus_str": ruby_str(node.cpus),
            # VirtualBox, Hyper-V, VMware and Parallels names are global on the host:
            # the lab id keeps two labs with the same name apart.
            "vm_name": ruby_str(prefix + node.name),
            "mac": ruby_str(private_mac(provider, context.lab_id, node.index)),
            "forwarded_ports": ports,
        })
    project_dir = context.lab_dir.parent.parent
    folders = [{"host": ruby_str(vagrant_host_path(folder.host, project_dir, context.lab_dir)),
                "guest": ruby_str(folder.guest), "disabled": ruby_bool(folder.disabled)}
               for folder in spec.synced_folders]
    options = spec.providers
    arch = box_arch(spec)
    return {
        "provider_id": provider,
        # arm64 guests: each provider's settings for them (raw: one of ARCHES, checked by the spec)
        "arch": arch,
        # an arm64 guest on another machine's CPU is emulated: a named CPU model, not the host's
        "emulated": arch != host_arch(),
        "provider": ruby_str(provider),
        "box": ruby_str(vagrant_box_name(spec)),
        "netmask": ruby_str(netmask),
        "nodes": nodes,
        "synced_folders": folders,
        "libvirt": {
            "driver": ruby_str(options.libvirt.driver),
            "uri": ruby_str(options.libvirt.uri),
            "default_prefix": ruby_str(prefix),
            "network_name": ruby_str(libvirt_network_name(context)),
            "aarch64_firmware": ruby_str(AARCH64_FIRMWARE),
        },
        "virtualbox": {
            "linked_clone": ruby_bool(options.virtualbox.linked_clone),
            "gui": ruby_bool(options.virtualbox.gui),
        },
    }


def vagrant_host_path(host: str, project_dir: PurePath, lab_dir: PurePath) -> str:
    """A synced folder's host path as the Vagrantfile should name it, with forward slashes on every OS.

    lab.yaml names it relative to its own directory; Vagrant resolves relative
    host paths against the Vagrantfile's directory (the lab dir). Writing it
    relative to the lab dir keeps the Vagrantfile the same wherever the project
    lives. Absolute, drive (`C:\\src`), UNC and `~` paths are passed through.
    The path is read by the host's rules (a backslash separates on Windows,
    where `project_dir` is a Windows path) and written with `/`, which Vagrant
    and Ruby take on Windows too: no backslash reaches the Vagrantfile.
    """
    flavor = PureWindowsPath if isinstance(project_dir, PureWindowsPath) else PurePosixPath
    path = flavor(host)
    if host.startswith("~") or path.anchor:
        return path.as_posix()
    # The lab dir is PROJECT/.lab/NAME: one `..` per level up to the project.
    up = [".."] * len(lab_dir.relative_to(project_dir).parts)
    return posixpath.normpath(posixpath.join(*up, path.as_posix()))


def ruby_path(path: PurePath) -> str:
    """A host path as a Ruby string literal: forward slashes (`C:/Users/...` on Windows), escaped as ruby_str."""
    return ruby_str(path.as_posix())
