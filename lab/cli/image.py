"""`lab image`: the container images every node of every lab pulls from the lab registry."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lab.cli.options import DEFAULT_FILE, FileOpt, JsonOpt
from lab.cli.output import out, print_json, progress, table

app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="""\
Container images for the nodes, kept in the lab registry (no internet needed).

\b
Every node's docker pulls plain names through the lab registry, so after
`lab up` a `docker run ubuntu ...` on any node works offline. The registry
runs on the host, read-only for nodes; its storage is in your cache and
outlives labs. `lab up` seeds it with images built from the host's Debian
mirror:
  busybox:latest                   from Debian's busybox-static
  debian:bookworm, debian:latest   a minbase debootstrap
  ubuntu:latest                    a STAND-IN: the same Debian, labelled so;
                                   replace it with `lab image import`
\b
Add your own:
  lab image import ubuntu.tar --name ubuntu     a `docker save` archive, an
                                                OCI archive or a rootfs tarball
  lab image load myapp:1.0                      from this host's docker
  lab image build ./app --name myapp:1.0        a Dockerfile, built on a node
  lab image rm myapp:1.0
""")

ReferenceOpt = Annotated[Optional[str], typer.Option(
    "--name", help="NAME[:TAG] in the lab registry (default: the name the file gives, tag `latest`).",
    metavar="NAME[:TAG]")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an image of that name and tag.")]


@app.command("list")
def image_list(as_json: JsonOpt = False) -> None:
    """List the images in the lab registry: name, tag, size, and what each really is."""
    from lab.core.images import list_images, what_it_is

    images = list_images()
    if as_json:
        print_json([{"name": i.name, "tag": i.tag, "size_bytes": i.size_bytes, "digest": i.digest,
                     "created": i.created, "what": what_it_is(i), "labels": i.labels} for i in images])
        return
    if not images:
        out().print("the lab registry is empty; `lab up` seeds busybox, debian and ubuntu, "
                    "`lab image import FILE` adds one")
        return
    out().print(table(("NAME", "TAG", "SIZE", "CREATED", "WHAT IT IS"),
                      [(i.name, i.tag, f"{i.size_bytes / 2**20:.1f} MiB", (i.created or "-")[:10],
                        what_it_is(i, short=True)) for i in images], no_wrap=("NAME", "TAG", "SIZE")))


@app.command("import")
def image_import(file: Annotated[Path, typer.Argument(help="A `docker save` archive, an OCI archive, or a "
                                                           "root filesystem tarball (.tar, .tar.gz, .tar.xz).")],
                 reference: ReferenceOpt = None, force: ForceOpt = False) -> None:
    """Import an image file into the lab registry.

    \b
    lab image import ubuntu-22.04.tar            keeps the name `docker save` wrote
    lab image import rootfs.tar.gz --name mini   a rootfs becomes a one-layer image
    A real ubuntu replaces the seeded stand-in without --force.
    """
    from lab.core.images import import_image

    out().print(f"imported {import_image(file, reference, force=force, progress=progress)}")


@app.command("load")
def image_load(source: Annotated[str, typer.Argument(help="NAME[:TAG] in this host's docker.", metavar="NAME[:TAG]")],
               reference: ReferenceOpt = None, force: ForceOpt = False) -> None:
    """Copy an image from this host's docker daemon into the lab registry (like `kind load docker-image`)."""
    from lab.core.images import load_image

    out().print(f"loaded {load_image(source, reference, force=force, progress=progress)}")


@app.command("build")
def image_build(directory: Annotated[Path, typer.Argument(help="Directory holding the Dockerfile (the context).")],
                reference: Annotated[str, typer.Option("--name", help="NAME[:TAG] to push it as.",
                                                       metavar="NAME[:TAG]")],
                node: Annotated[Optional[str], typer.Option(help="Node to build on (default: the first).")] = None,
                force: ForceOpt = False, file: FileOpt = DEFAULT_FILE,
                lab_name: Annotated[Optional[str], typer.Option(
                    "--lab", help="Lab name (overrides `name:`; --name names the image here).")] = None) -> None:
    """Build a Dockerfile on a node of the lab and push the image into the lab registry.

    \b
    The build runs on a node (this host needs no docker): FROM lines resolve
    through the lab registry, so `FROM debian:bookworm` works offline.
    lab image build ./app --name myapp:1.0
    """
    from lab.cli.options import open_lab
    from lab.core.images import build_image

    lab = open_lab(file, lab_name)
    out().print(f"built {build_image(lab, directory, reference, node=node, force=force, progress=progress)}")


@app.command("rm")
def image_rm(reference: Annotated[str, typer.Argument(help="NAME or NAME:TAG (tag `latest` if none).",
                                                      metavar="NAME[:TAG]")]) -> None:
    """Remove an image tag from the lab registry and free the space nothing else uses."""
    from lab.core.images import remove_image

    out().print(f"removed {remove_image(reference, progress=progress)}")
