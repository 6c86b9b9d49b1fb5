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
  boot_file  the node's own /etc/lab/boot.json, naming the slot to boot
"""

import json
import os
import signal
import subprocess
import sys

REBOOT_EXIT_STATUS = 133  # systemd-nspawn's exit status when the container asked to reboot


def boot_usr(config: dict) -> str:
    """The /usr of the slot the node boots next."""
    # The node chooses its boot slot itself, as a machine writes its
    # bootloader's config: /etc/lab/boot.json in its own layer.
    try:
        with open(config["boot_file"]) as f:
            slot = json.load(f).get("slot", "a")
    except (OSError, ValueError, AttributeError):
        slot = "a"
    path = os.path.join(config["slots_dir"], "slot-" + str(slot))
    if not os.path.isdir(path):
        path = os.path.join(config["slots_dir"], "slot-a")
    return os.path.join(path, "usr")


class Supervisor:
    def __init__(self, config: dict) -> None:
        self.config = config
        self.stopping = False
        self.child = None

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
        with open(pidfile + ".tmp", "w") as f:
            f.write(str(pid))
        os.replace(pidfile + ".tmp", pidfile)

    def run(self) -> int:
        """Boot the node until it stops for another reason than a reboot; nspawn's exit status."""
        while True:
            usr = boot_usr(self.config)
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
