"""`lab box`: build and manage node OS images and the Vagrant boxes made of them."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Annotated, Callable, Iterator, Optional

import typer

from lab.cli.options import JsonOpt
from lab.cli.output import err, out, print_json, table
from lab.errors import UsageError

app = typer.Typer(help="Build and manage node OS images.", no_args_is_help=True, rich_markup_mode=None)

VersionOpt = Annotated[str, typer.Option(help="OS version to build.")]
RecipeOpt = Annotated[str, typer.Option("--name", help="Recipe under boxes/.")]
BoxFormatOpt = Annotated[str, typer.Option(
    "--format", help="container: the nspawn image; libvirt or virtualbox: a Vagrant box of the same OS.")]
ArchOpt = Annotated[str, typer.Option(
    "--arch", help="amd64 or arm64; another than this machine's is built under qemu-user-static (slow).")]


@contextmanager
def _spinner(title: str, prefix: str) -> Iterator[Callable[[str], None]]:
    """A spinner on stderr; the progress callback it yields shows a build's latest line beside PREFIX."""
    with err().status(title) as status:
        yield lambda line: status.update(f"{prefix}: {line.strip()[:100]}")


@app.command("build")
def box_build(version: VersionOpt = "1", box: RecipeOpt = "labos", fmt: BoxFormatOpt = "container",
              mirror: Annotated[Optional[str], typer.Option(
                  help="Debian mirror URL; default: the one this host's apt sources name.")] = None,
              force: Annotated[bool, typer.Option("--force", help="Rebuild even if cached.")] = False,
              arch: ArchOpt = "") -> None:
    """Build the node OS image or a Vagrant box of it (cached: a second build with the same recipe is instant).

    \b
    lab box build                        the image nspawn nodes boot (~1 min cold)
    lab box build --format libvirt       a qcow2 box for vagrant-libvirt (~2 min cold)
    lab box build --format virtualbox    an OVF/VMDK box for VirtualBox
    lab box add --format libvirt         then register it with Vagrant
    lab box build --arch arm64 --format libvirt
                                         an arm64 box (UEFI) for Apple silicon and ARM hosts,
                                         built here under qemu-user-static (~15 min)
    """
    import time

    from lab.images.build import build_image
    from lab.images.vagrantbox import BOX_FORMATS, box_options

    if fmt not in ("container", *BOX_FORMATS):
        raise UsageError(f"--format {fmt!r}: unknown format", hint=f"choose one of: container, {', '.join(BOX_FORMATS)}")
    arch = _arch(arch)
    start = time.monotonic()
    what = f"{box} {version} ({fmt}{'' if arch == 'amd64' else f', {arch}'})"
    with _spinner(f"building {what}", f"building {what}") as progress:
        if fmt == "container":
            image = build_image(box, version, mirror=mirror, progress=progress, force=force, arch=arch)
            out().print(f"{image.name} {image.version} ready at {image.rootfs} "
                        f"({image.size_bytes / 2**20:.0f} MiB, {time.monotonic() - start:.1f} s)")
            return
        from lab.images.vagrantbox import build_box

        built = build_box(box, version, fmt, mirror=mirror, progress=progress, force=force, arch=arch)
    out().print(f"{built.name} {built.version} {fmt} box ready at {built.path} "
                f"({built.size_bytes / 2**20:.0f} MiB, {time.monotonic() - start:.1f} s)\n"
                f"register it with Vagrant: lab box add --format {fmt}{box_options(box, version, arch)}")


def _arch(arch: str) -> str:
    """--arch as given, or this machine's architecture (amd64 where lab builds nothing for it)."""
    from lab.images.recipes import ARCHES, native_arch

    if not arch:
        return native_arch()
    if arch not in ARCHES:
        raise UsageError(f"--arch {arch!r}: unknown architecture", hint=f"choose one of: {', '.join(ARCHES)}")
    return arch


@app.command("add")
def box_add(version: Annotated[str, typer.Option(help="OS version of the box.")] = "1",
            box: RecipeOpt = "labos",
            fmt: Annotated[str, typer.Option("--format", help="libvirt or virtualbox.")] = "libvirt",
            build: Annotated[bool, typer.Option("--build/--no-build",
                                                help="Build the box first if it is not built yet.")] = True,
            arch: ArchOpt = "") -> None:
    """Register a built box with Vagrant under the name lab's Vagrantfiles use.

    That name is lab-NAME-VERSION: lab-labos-1 for the default box (lab-labos-1-arm64 for arm64's).
    """
    from lab.images.vagrantbox import add_box, box_options, build_box, find_box

    arch = _arch(arch)
    found = find_box(box, version, fmt, arch)
    if found is None and not build:
        raise UsageError(f"the {fmt} box of {box} {version} is not built",
                         hint=f"lab box build --format {fmt}{box_options(box, version, arch)}")
    what = f"{box} {version} ({fmt})"
    with _spinner(f"adding {what}", what) as progress:
        found = found or build_box(box, version, fmt, progress=progress, arch=arch)
        name = add_box(found, progress=progress)
    out().print(f"Vagrant box {name} ({fmt}) added from {found.path}")


@app.command("list")
def box_list(as_json: JsonOpt = False) -> None:
    """List built node OS images and Vagrant box files."""
    from lab.images.cache import list_images
    from lab.images.vagrantbox import list_boxes

    images, boxes = list_images(), list_boxes()
    if as_json:
        print_json([{"name": i.name, "version": i.version, "key": i.key, "format": i.flavor,
                     "size_bytes": i.size_bytes, "built_at": i.built_at, "path": str(i.path)} for i in images]
                   + [{"name": b.name, "version": b.version, "key": b.key, "format": f"{b.format} box",
                       "size_bytes": b.size_bytes, "path": str(b.path)} for b in boxes])
        return
    rows = [(i.name, i.version, "image" if i.flavor == "container" else "vm image", i.key,
             f"{i.size_bytes / 2**20:.0f} MiB", i.built_at) for i in images]
    rows += [(b.name, b.version, f"{b.format} box", b.key, f"{b.size_bytes / 2**20:.0f} MiB", "") for b in boxes]
    shown = table(("NAME", "VERSION", "FORMAT", "KEY", "SIZE", "BUILT"), rows)
    out().print(shown if images or boxes else "no images built yet; build one with `lab box build`")


@app.command("rm")
def box_rm(box: Annotated[str, typer.Argument(help="Image name, e.g. labos.")],
           version: Annotated[Optional[str], typer.Option(help="Only this version.")] = None,
           vagrant: Annotated[bool, typer.Option(
               "--vagrant", help="Also remove the boxes added to Vagrant (lab-NAME-VERSION) and the copies "
                                 "libvirt keeps of them in its storage pool, unless a VM still uses one.")] = False,
           ) -> None:
    """Remove built images and box files; with --vagrant, what `lab box add` registered too."""
    from lab.core.lab import images_in_use
    from lab.images.cache import matching_images, refuse_if_in_use, remove_images
    from lab.images.vagrantbox import remove_boxes, remove_from_vagrant

    # The labs of this host (running, halted, or with an update staged) keep
    # their images: checked before anything, Vagrant's boxes included, goes.
    users = images_in_use()
    for image in matching_images(box, version):
        refuse_if_in_use(image.path, users)
    # Vagrant first: if it fails, the files it was added from are still there.
    registered = remove_from_vagrant(box, version) if vagrant else []
    removed = remove_images(box, version, users)
    files = remove_boxes(box, version)
    if not removed and not files and not registered:
        raise UsageError(f"no built image {box}{' ' + version if version else ''}",
                         hint="see `lab box list`" + ("" if vagrant else "; `--vagrant` for boxes added to Vagrant"))
    for line in ([f"removed {what}" for what in registered]
                 + [f"removed {i.name} {i.version} {i.flavor} image ({i.key})" for i in removed]
                 + [f"removed {b.path}" for b in files]):
        out().print(line)
