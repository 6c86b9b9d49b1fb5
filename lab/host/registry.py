"""The lab registry on the host: Docker Distribution (Debian's `docker-registry`).

One blob storage in the user's cache serves every lab, so images survive
labs. Each lab gets a *read-only* instance bound to its host address (nodes
are untrusted clients: none may write into storage other labs read), and
every write goes through a short-lived *writable* instance on loopback under
a file lock, so two `lab image` commands never write at once.

The registry never runs as root: `docker-registry` (the user the package
creates) owns the storage. That storage sits in root's cache, whose parents
(/root, a pytest tmp dir) are 0700, so the registry user could not even reach
it by path. Rather than open those directories to it, a tiny launcher runs
as root, opens the storage directory and the config file, drops to the
registry user and execs the registry with both as /proc/self/fd/N paths: the
kernel checks the inherited descriptors, not the 0700 parents.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from lab.errors import PrerequisiteError, ProviderError, StateError, UsageError
from lab.host.files import write_atomic
from lab.host.locks import holding
from lab.host.paths import cache_dir
from lab.host.run import run

REGISTRY_PORT = 5000
REGISTRY_USER = "docker-registry"
REGISTRY_BINARY = "/usr/bin/docker-registry"
INSTALL_HINT = "apt-get install docker-registry skopeo (or run tools/install.sh)"
# Writers queue behind each other; a push of a seeded image takes a second or two.
LOCK_WAIT = 600.0
REQUEST_TIMEOUT = 10.0
PUSH_TIMEOUT = 15 * 60
GC_TIMEOUT = 10 * 60

# Fixed descriptor numbers the launcher hands the registry (above stdio).
STORAGE_FD = 9
CONFIG_FD = 8
MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
INDEX_TYPES = MANIFEST_TYPES[2:]

# Runs as `python -I -S -c LAUNCHER STORAGE CONFIG UID GID REGISTRY ARGS...`. Nothing is imported
# after the privilege drop: the interpreter's own files may sit under root's home too.
LAUNCHER = f"""\
import os, sys
storage, config, uid, gid, binary, *args = sys.argv[1:]
os.dup2(os.open(storage, os.O_RDONLY | os.O_DIRECTORY), {STORAGE_FD})
os.dup2(os.open(config, os.O_RDONLY), {CONFIG_FD})
os.environ["REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY"] = "/proc/self/fd/{STORAGE_FD}"
os.setgroups([])
os.setgid(int(gid))
os.setuid(int(uid))
os.execv(binary, [binary, *args])
"""


@dataclass(frozen=True)
class ImageInfo:
    """One tag of an image in the registry, as `lab image list` shows it."""

    name: str                      # as a node's docker names it: `ubuntu`, not `library/ubuntu`
    tag: str
    digest: str
    size_bytes: int                # compressed layers + config, what a pull transfers
    created: str | None = None
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def reference(self) -> str:
        return f"{self.name}:{self.tag}"


def registry_account() -> tuple[int, int]:
    """uid and gid of the registry user; a PrerequisiteError if the package is missing."""
    if not Path(REGISTRY_BINARY).is_file():
        raise PrerequisiteError("docker-registry (Docker Distribution) is not installed: the lab registry needs it",
                                hint=INSTALL_HINT)
    import grp  # POSIX-only, like the registry itself: not imported where lab merely loads this module
    import pwd

    try:
        account = pwd.getpwnam(REGISTRY_USER)
        group = grp.getgrgid(account.pw_gid)
    except KeyError:
        raise PrerequisiteError(f"the system user {REGISTRY_USER!r} is missing (the docker-registry package "
                                f"creates it)", hint="apt-get install --reinstall docker-registry") from None
    return account.pw_uid, group.gr_gid


def storage_dir() -> Path:
    """The blob storage every lab shares, owned by the registry user."""
    uid, gid = registry_account()
    path = cache_dir() / "registry"
    path.mkdir(parents=True, exist_ok=True)
    info = path.lstat()
    if path.is_symlink() or not path.is_dir():
        raise StateError(f"{path} is not a directory lab made", hint=f"remove {path}; lab creates it again")
    if (info.st_uid, info.st_gid) != (uid, gid):
        os.chown(path, uid, gid)
        os.chmod(path, 0o750)
    return path


def serving_config(address: str, port: int = REGISTRY_PORT, upstream: str | None = None) -> str:
    """YAML for a lab's own instance: read-only, or a pull-through cache of `upstream` (a URL the user gave)."""
    if upstream is not None:
        # A proxy writes what it fetches into storage; Distribution refuses pushes in proxy mode.
        extra_storage, proxy = {}, {"proxy": {"remoteurl": upstream}}
    else:
        extra_storage, proxy = {"readonly": {"enabled": True}}, {}
    return _config_text(f"{address}:{port}", maintenance=extra_storage, delete=False, extra=proxy)


def writable_config(port: int) -> str:
    return _config_text(f"127.0.0.1:{port}", maintenance={}, delete=True, extra={})


def _config_text(addr: str, *, maintenance: dict, delete: bool, extra: dict) -> str:
    import secrets

    import yaml

    config = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {
            # The launcher points the registry at the storage through an inherited descriptor
            # (REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY); the path here says which one.
            "filesystem": {"rootdirectory": str(cache_dir() / "registry")},
            "delete": {"enabled": delete},
            "cache": {"blobdescriptor": "inmemory"},
            # Uploads only ever happen in the short-lived writable instance, which
            # the lock guards: nothing half-uploaded outlives it worth sweeping.
            "maintenance": {"uploadpurging": {"enabled": False}, **maintenance},
        },
        # Uploads start and finish on the same instance; the secret only silences its warning.
        "http": {"addr": addr, "secret": secrets.token_hex(16)},
        "health": {"storagedriver": {"enabled": False}},
        **extra,
    }
    return yaml.safe_dump(config, sort_keys=False)


def registry_argv(config_file: Path, *args: str) -> list[str]:
    """argv that runs `docker-registry ARGS CONFIG` as the registry user on the shared storage.

    Start it as root (lab.host.daemons.start_daemon without `user=`): the launcher
    opens the storage and the config, then drops to REGISTRY_USER itself.
    """
    uid, gid = registry_account()
    return [sys.executable, "-I", "-S", "-c", LAUNCHER, str(storage_dir()), str(config_file), str(uid), str(gid),
            REGISTRY_BINARY, *args, f"/proc/self/fd/{CONFIG_FD}"]


def serving_argv(config_file: Path) -> list[str]:
    return registry_argv(config_file, "serve")


def answers(endpoint: str, timeout: float = 1.0) -> bool:
    """Whether a registry answers GET http://ENDPOINT/v2/ with 200."""
    import httpx

    try:
        return httpx.get(f"http://{endpoint}/v2/", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


# ---------------------------------------------------------------- the writable instance


def lock_file() -> Path:
    return cache_dir() / "registry.lock"


@contextmanager
def write_lock(wait: float = LOCK_WAIT, path: Path | None = None, what: str = "the lab registry") -> Iterator[None]:
    """The one writer of the storage: an flock on a file beside it, waited for at most `wait` seconds.

    `path` and `what` name another lock of the same kind (the seeded images' builds)."""
    path = path or lock_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with holding(path, f"pid {os.getpid()}: {' '.join(sys.argv[:3])}", wait, interval=0.2,
                 busy=lambda holder: StateError(f"{what} is busy: {holder} still holds {path} after {wait:.0f} s",
                                                hint="wait for that command to finish, then try again")):
        yield


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def writable() -> Iterator[str]:
    """A writable registry on 127.0.0.1:<free port> over the shared storage; yields "127.0.0.1:PORT".

    Held under the write lock and stopped on exit (Ctrl-C included).
    """
    from lab.host.daemons import start_daemon, stop_daemon

    logs = cache_dir() / "registry-logs"
    logs.mkdir(parents=True, exist_ok=True)
    with write_lock():
        port = free_loopback_port()
        endpoint = f"127.0.0.1:{port}"
        config = logs / "writable.yml"
        write_atomic(config, writable_config(port))
        started = []  # filled the moment it exists: a Ctrl-C while it starts up stops it too
        try:
            start_daemon(registry_argv(config, "serve"), log=logs / "writable.log", on_start=started.append,
                         what="the lab registry (writable, on loopback)", ready=lambda: answers(endpoint))
            yield endpoint
        finally:
            for daemon in started:
                stop_daemon(daemon.pid, daemon.start)


def garbage_collect() -> str:
    """Delete blobs no tag reaches any more. Call while holding the write lock (inside `writable()`)."""
    config = cache_dir() / "registry-logs" / "writable.yml"
    result = run(registry_argv(config, "garbage-collect", "--delete-untagged"), timeout=GC_TIMEOUT,
                 shown_as="docker-registry garbage-collect")
    return result.stdout


# ---------------------------------------------------------------- pushes and reads


def push(source: str, endpoint: str, name: str, tag: str) -> None:
    """Copy an image into the registry with skopeo; `source` is a skopeo reference (oci:DIR:REF, docker-archive:FILE)."""
    if shutil.which("skopeo") is None:
        raise PrerequisiteError("skopeo is not installed: lab copies images into its registry with it",
                                hint=INSTALL_HINT)
    run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--retry-times=0", source,
         f"docker://{endpoint}/{repository(name)}:{tag}"], timeout=PUSH_TIMEOUT,
        hint="the file may be damaged or not an image; see the message above")


def repository(name: str) -> str:
    """The registry's repository for a name as docker writes it: plain names live under library/."""
    return name if "/" in name else f"library/{name}"


def shown_name(repo: str) -> str:
    return repo.removeprefix("library/")


def catalog(endpoint: str) -> list[ImageInfo]:
    """Every tag of every repository, with its size, labels and creation time."""
    with _client(endpoint) as client:
        found = []
        for repo in _repositories(client):
            tags = _get_json(client, f"/v2/{repo}/tags/list").get("tags") or []
            for tag in sorted(tags):
                found.append(_describe(client, repo, tag))
    return sorted(found, key=lambda i: (i.name, i.tag))


def _repositories(client) -> list[str]:
    """Every repository, a page at a time (Distribution answers at most 1000 per request)."""
    names: list[str] = []
    while True:
        page = _get_json(client, "/v2/_catalog", params={"n": 1000, **({"last": names[-1]} if names else {})})
        batch = page.get("repositories") or []
        names += batch
        if len(batch) < 1000:
            return names


def describe(endpoint: str, name: str, tag: str) -> ImageInfo | None:
    """NAME:TAG as `catalog` shows it, or None if the registry has no such tag."""
    with _client(endpoint) as client:
        if client.head(f"/v2/{repository(name)}/manifests/{tag}").status_code == 404:
            return None
        return _describe(client, repository(name), tag)


def remove(endpoint: str, name: str, tag: str) -> None:
    """Untag NAME:TAG. Distribution deletes by digest, which drops every tag of that manifest:
    the other tags sharing it (debian:bookworm beside debian:latest) are put back at once."""
    repo = repository(name)
    with _client(endpoint) as client:
        response = client.get(f"/v2/{repo}/manifests/{tag}")
        if response.status_code == 404:
            raise UsageError(f"no image {name}:{tag} in the lab registry", hint="see `lab image list`")
        _check(response)
        digest = response.headers["Docker-Content-Digest"]
        media_type = response.headers.get("Content-Type", MANIFEST_TYPES[0])
        body = response.content
        siblings = [other for other in _get_json(client, f"/v2/{repo}/tags/list").get("tags") or []
                    if other != tag and _digest_of(client, repo, other) == digest]
        _check(client.delete(f"/v2/{repo}/manifests/{digest}"))
        for other in siblings:
            _check(client.put(f"/v2/{repo}/manifests/{other}", content=body, headers={"Content-Type": media_type}))


def _client(endpoint: str):
    import httpx

    return httpx.Client(base_url=f"http://{endpoint}", timeout=REQUEST_TIMEOUT,
                        headers={"Accept": ", ".join(MANIFEST_TYPES)})


def _check(response) -> None:
    if response.status_code >= 300:
        raise ProviderError(f"the lab registry answered {response.status_code} to {response.request.method} "
                            f"{response.request.url.path}: {response.text[:300]}",
                            hint=f"its log is {cache_dir() / 'registry-logs' / 'writable.log'}")


def _get_json(client, path: str, params: dict | None = None) -> dict:
    response = client.get(path, params=params)
    _check(response)
    return response.json()


def _digest_of(client, repo: str, tag: str) -> str | None:
    return client.head(f"/v2/{repo}/manifests/{tag}").headers.get("Docker-Content-Digest")


def _describe(client, repo: str, tag: str) -> ImageInfo:
    response = client.get(f"/v2/{repo}/manifests/{tag}")
    _check(response)
    digest = response.headers.get("Docker-Content-Digest", "")
    manifest = response.json()
    if manifest.get("mediaType") in INDEX_TYPES or "manifests" in manifest:
        # A multi-platform image: describe its first platform, which is what lab imported.
        entries = manifest.get("manifests") or []
        if not entries:
            return ImageInfo(shown_name(repo), tag, digest, 0)
        manifest = _get_json(client, f"/v2/{repo}/manifests/{entries[0]['digest']}")
    size = sum(int(part.get("size", 0)) for part in [manifest.get("config", {}), *manifest.get("layers", [])])
    config = {}
    if manifest.get("config", {}).get("digest"):
        blob = client.get(f"/v2/{repo}/blobs/{manifest['config']['digest']}", follow_redirects=True)
        if blob.status_code == 200:
            try:
                config = json.loads(blob.content)
            except ValueError:
                config = {}
    labels = (config.get("config") or {}).get("Labels") or {}
    return ImageInfo(shown_name(repo), tag, digest, size, config.get("created"), dict(labels))


def stored_tags(name: str) -> set[str]:
    """Tags the storage holds for NAME, read from its files (no registry needed: a cheap check for seeding)."""
    tags = storage_dir() / "docker/registry/v2/repositories" / repository(name) / "_manifests/tags"
    try:
        return {entry.name for entry in tags.iterdir() if (entry / "current/link").is_file()}
    except OSError:
        return set()
