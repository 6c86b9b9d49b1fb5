"""The node supervisor: one per node, as host root, detached from `lab`.

Run as `python -I -S supervisor.py CONFIG` (CONFIG is JSON). It imports the
standard library only and nothing of lab, so it stays tiny (a few MB) and
keeps working even if lab is upgraded under a running lab.

It joins the node's cgroups (so the container it starts is in them too), runs
systemd-nspawn, and boots the node again when nspawn exits for a reboot (exit
133), as systemd-nspawn@.service does on a systemd host, which this host may
not be. SIGTERM passes on to nspawn, which asks the node to power off; the
supervisor then exits with nspawn's status.

CONFIG keys:
  argv       systemd-nspawn's command line; "{usr}" stands for the /usr to bind
  pidfile    where nspawn's pid is written at every boot
  cgroups    the cgroup.procs files to join
  slots_dir  the directory holding the slot-a / slot-b links to OS images
  slots      the slot names there ("a", "b"): boot.json may name no other
  slot       the slot the host last knew the node to boot (used when boot.json is unusable)
  upper      the node's upper layer, which its root user owns
  boot_file  boot.json's path in it (etc/lab/boot.json), naming the slot to boot
"""

import json
import os
import signal
import subprocess
import sys

try:  # imported by the provider, in the lab package
    from . import nodefs
except ImportError:  # run as a plain file: its one sibling it uses (standard library only)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import nodefs  # type: ignore[no-redef]

REBOOT_EXIT_STATUS = 133  # systemd-nspawn's exit status when the container asked to reboot


def log(message: str) -> None:
    print(f"lab supervisor: {message}", file=sys.stderr, flush=True)


def requested_slot(config: dict) -> str | None:
    """The slot the node asks for in its own boot.json: its first slot if there is no boot.json,
    None (and one line in the console log) if the file is unusable or names no known slot."""
    # The node chooses its boot slot itself, as a machine writes its
    # bootloader's config; but the host only ever reads that file through
    # nodefs (no symlink, FIFO or device followed, size-capped) and uses the
    # slot only if it is one of its own names, never as a path.
    try:
        boot = json.loads(nodefs.read_node_file(config["upper"], config["boot_file"]))
    except FileNotFoundError:
        return config["slots"][0]  # no boot.json yet: the image the node was created with
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deep
        log(f"{config['boot_file']} ignored: {exc}")
        return None
    slot = boot.get("slot", config["slots"][0]) if isinstance(boot, dict) else None
    if slot not in config["slots"]:
        log(f"{config['boot_file']} ignored: {str(slot)[:80]!r} is not a slot ({', '.join(config['slots'])})")
        return None
    return slot


def boot_slot(config: dict, fallback: str) -> str:
    """The slot to boot: the node's choice if its image is there, else `fallback` (the slot booted last)."""
    requested = requested_slot(config)
    if requested is not None and slot_image(config, requested):
        return requested
    if requested is not None:
        log(f"slot {requested} holds no image")
    chosen = fallback if slot_image(config, fallback) else config["slots"][0]
    log(f"booting slot {chosen}")
    return chosen


def slot_image(config: dict, slot: str) -> str | None:
    """The image directory a slot's link names, resolved, if it is an image of lab's cache; else None.

    The links live in the lab directory, which a checkout may have planted:
    a link to / would hand the host's /usr to the node.
    """
    # The same rule as lab.images.cache.is_cached_rootfs (this file may import only the standard library).
    target = os.path.realpath(os.path.join(config["slots_dir"], "slot-" + slot))
    entry = os.path.dirname(target)
    if (os.path.basename(target) != "rootfs" or os.path.basename(os.path.dirname(entry)) != "images"
            or not os.path.isdir(target) or not os.path.isfile(os.path.join(entry, "meta.json"))):
        return None
    return target


class Supervisor:
    def __init__(self, config: dict) -> None:
        self.config = config
        self.stopping = False
        self.child = None
        self.slot = config["slot"] if config["slot"] in config["slots"] else config["slots"][0]

    def stop(self, signum, frame) -> None:
        self.stopping = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)

    def join_cgroups(self) -> None:
        for procs in self.config["cgroups"]:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

    def write_pidfile(self, pid: int) -> None:
        pidfile = self.config["pidfile"]
        # O_NOFOLLOW: a link planted at the temporary name must not make root write elsewhere.
        fd = os.open(pidfile + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(str(pid))
        os.replace(pidfile + ".tmp", pidfile)

    def run(self) -> int:
        """Boot the node until it stops for another reason than a reboot; nspawn's exit status."""
        while True:
            self.slot = boot_slot(self.config, self.slot)
            image = slot_image(self.config, self.slot)
            if image is None:
                log(f"slot {self.slot} names no image of lab's cache: not booting")
                return 1
            usr = os.path.join(image, "usr")  # resolved once: a link swapped later changes nothing
            self.child = subprocess.Popen([a.replace("{usr}", usr) for a in self.config["argv"]],
                                          stdin=subprocess.DEVNULL)
            self.write_pidfile(self.child.pid)
            while True:
                try:
                    status = self.child.wait()
                    break
                except InterruptedError:
                    continue
            if status == REBOOT_EXIT_STATUS and not self.stopping:
                continue
            return status if status >= 0 else 128 - status


def main(argv: list) -> None:
    supervisor = Supervisor(json.loads(argv[0]))
    supervisor.join_cgroups()
    signal.signal(signal.SIGTERM, supervisor.stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    sys.exit(supervisor.run())


if __name__ == "__main__":
    main(sys.argv[1:])
