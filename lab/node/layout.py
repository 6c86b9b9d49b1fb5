"""Where things are on a node and in etcd: every path and key prefix the agents and the host share.

Copied to /var/lib/lab/ with the agents. The host imports these names too
(bootstrap writes the files, `lab unit` and `lab update` read the keys), so
each is spelled once. Standard library only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# ---------------------------------------------------------------- on the node

NODE_DIR = Path("/var/lib/lab")                 # the agents' code (this folder's files)
CONFIG_DIR = Path("/etc/lab")
AGENT_CONFIG = CONFIG_DIR / "agent.json"        # the scheduler agent's configuration
UPDATE_CONFIG = CONFIG_DIR / "update.json"      # the update agent's configuration
NODE_INFO = CONFIG_DIR / "node.json"            # who the node is, written by the provider
# The A/B slot to boot: {"slot": "a"|"b", "try": bool, "previous": ...}, read by the provider at boot.
BOOT_FILE = CONFIG_DIR / "boot.json"
BOOT_SLOTS = ("a", "b")                         # the only slots boot.json may name (the first is the default)
# On a Lab OS VM disk (lab/images/vmdisk.py, the node's side in bootslots.py): the MBR partition
# numbers of the boot partition and of each slot's /usr.
BOOT_PARTITION = 1
SLOT_PARTITIONS = {"a": 2, "b": 3}
MANAGED = NODE_DIR / "agent-units.json"         # the units the scheduler agent runs here
UNIT_DIR = Path("/etc/systemd/system")
CLIENT_PORT = 2379                              # etcd's client port, on the node's IP and on 127.0.0.1
NODE_PKI_DIR = "/etc/etcd/pki"                  # the node's etcd CA, certificate and key (with etcd.tls)
ETCD_PRESTART = "/etc/etcd/lab-prestart"        # a member's wait for its addresses before etcd starts
# Set by the update agent before a reboot: the scheduler agent stops its units
# and leaves the cluster so the engine moves them now, not when its lease runs out.
DRAIN_FLAG = Path("/run/lab/draining")
MACHINE_ID = Path("/etc/machine-id")             # the machine's id: its key in the scheduler's etcd prefixes

AGENT_SERVICE = "lab-agent"                     # systemd units running agent.py and updater.py
UPDATE_SERVICE = "lab-update"

# What lab needs on a machine it did not build (a generic Vagrant box, an existing host), by command,
# and the Debian/Ubuntu package that brings it: installed from the machine's own apt sources.
NODE_COMMANDS = {"python3": "python3", "nft": "nftables", "etcd": "etcd-server", "etcdctl": "etcd-client"}
DOCKER_COMMANDS = {"docker": "docker.io"}
# The directories lab writes into on such a machine. One that was there before lab keeps what else it
# holds when lab leaves (only lab's own files go); one lab made goes whole.
LAB_DIRS = (str(CONFIG_DIR), str(NODE_DIR), "/etc/etcd", "/run/lab")

# ---------------------------------------------------------------- in etcd

FLEET = "/lab/fleet"                            # the scheduler (layout in agent.py)
MACHINES = f"{FLEET}/machines/"                 # machines/ID: machine JSON, under its lease
UNITS = f"{FLEET}/units/"                       # units/NAME: {"name", "text", "desired"}
SCHEDULE = f"{FLEET}/schedule/"                 # schedule/NAME: machine id
PENDING = f"{FLEET}/pending/"                   # pending/NAME: why the unit has no machine
STATES = f"{FLEET}/states/"                     # states/NAME/ID: the unit's systemd state there
ENGINE = f"{FLEET}/engine"                      # id of the machine whose agent is the engine

UPDATE = "/lab/update"                          # rolling updates (layout in updater.py)
SEMAPHORE = f"{UPDATE}/semaphore"               # the reboot lock
HALTED = f"{UPDATE}/halted"                     # a failed update: no node starts another
STAGED = f"{UPDATE}/staged/"                    # staged/NODE: the version waiting in its passive slot
NODE_UPDATES = f"{UPDATE}/nodes/"               # nodes/NODE: the update agent's state


def boot_record(text: str | bytes) -> dict:
    """boot.json's content, checked: `slot` is a known slot (the first when absent, wrong or unreadable),
    and `previous`, kept only if it is a known slot too. Other keys pass as they are."""
    try:
        boot = json.loads(text)
    except (ValueError, RecursionError):
        boot = None
    if not isinstance(boot, dict) or boot.get("slot", BOOT_SLOTS[0]) not in BOOT_SLOTS:
        return {"slot": BOOT_SLOTS[0]}
    boot = {**boot, "slot": boot.get("slot", BOOT_SLOTS[0])}
    if "previous" in boot and boot["previous"] not in BOOT_SLOTS:
        del boot["previous"]
    return boot


def read_config(argv: list[str]) -> dict:
    """An agent's command line, `PROGRAM CONFIG.json`: the configuration (exits 2 on a wrong one)."""
    if len(argv) != 2:
        print(f"usage: {Path(argv[0]).name} CONFIG.json", file=sys.stderr)
        raise SystemExit(2)
    return json.loads(Path(argv[1]).read_text())


def machine_id() -> str:
    """This machine's id, as the scheduler knows it (machines/ID, states/NAME/ID)."""
    return MACHINE_ID.read_text().strip()
