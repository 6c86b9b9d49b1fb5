"""The update agent on every node: A/B slots and an etcd reboot lock, standard library only.

Copied with its siblings to /var/lib/lab/ and run by `lab-update.service`. It
does on each node what CoreOS's update_engine and locksmith did together:

  * lab stages a new OS version in the node's *passive* slot (the provider's
    job: on nspawn a slot is an image's /usr) and publishes it in etcd under
    /lab/update/staged/NODE;
  * the agent takes the reboot lock: a semaphore in etcd with at most
    `max_holders` holders, changed only by compare-and-swap on its revision
    (locksmith's design, in semaphore.py); with strategy `reboot` it takes no lock, with `off`
    it does nothing;
  * before rebooting it reads the semaphore again and acts only if it still
    holds it: etcd locks alone cannot guarantee mutual exclusion when a
    process pauses between acquiring and acting (Jepsen, 2020);
  * it drains the node (the scheduler agent stops and deregisters, so its
    units move) once every unit placed on another node runs there, so with
    one holder at a time a drain never takes a service's last running
    replica; it writes /etc/lab/boot.json {"slot": passive, "try": true}
    and reboots; the node comes up on the new slot with /etc and /var kept;
  * after boot, a health check (the etcd member healthy, the scheduler agent
    registered) either confirms the slot and releases the lock, or rolls
    back: boot.json points at the previous slot again, the failure is
    published under /lab/update/halted (no other node starts an update
    after that) and the node reboots into the version it had.

On a VM (a Lab OS A/B disk, bootslots.py) the boot loader, not the
provider, picks the slot: the agent asks SYSLINUX to boot the new slot once,
makes it SYSLINUX's default only after the health check, and a trial that
never came up (the boot loader fell back to the default) counts as a failed
health check.

Its state per node is published under /lab/update/nodes/NODE.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

try:  # in the lab package on the host; beside this file on a node
    from . import bootslots, layout
    from .etcd import Etcd
    from .semaphore import Semaphore
except ImportError:  # pragma: no cover - the node's way
    import bootslots  # type: ignore[no-redef]
    import layout  # type: ignore[no-redef]
    from etcd import Etcd  # type: ignore[no-redef]
    from semaphore import Semaphore  # type: ignore[no-redef]

HEALTH_TIMEOUT = 60.0
# How long a drain waits for units placed on other machines to run. A unit that never starts (a broken
# unit file, an image that cannot be pulled) must not stop the roll for ever: past this, drain anyway.
SETTLE_TIMEOUT = 60.0


def units_starting_elsewhere(units: dict[str, str], schedule: dict[str, str], states: dict[str, str],
                             machine: str) -> list[str]:
    """The launched units placed on another machine that do not run there yet, sorted.

    Keys as etcd holds them (UNITS+name, SCHEDULE+name, STATES+name/machine). A drain stops this machine's
    units so they move; if another replica of the same service is itself still starting (it moved here
    during the last node's reboot, its node's Docker is starting), nothing serves in between. Units
    with no machine (pending) are not waited for: no drain makes room for them.
    """
    starting = []
    for key, value in units.items():
        try:
            record = json.loads(value)
        except ValueError:
            continue
        name = key[len(layout.UNITS):]
        if not isinstance(record, dict) or record.get("desired") != "launched":
            continue
        placed_on = schedule.get(f"{layout.SCHEDULE}{name}")
        if placed_on is None or placed_on == machine:
            continue
        try:
            state = json.loads(states.get(f"{layout.STATES}{name}/{placed_on}", "{}"))
        except ValueError:
            state = {}
        if not isinstance(state, dict) or state.get("active") != "active":
            starting.append(name)
    return sorted(starting)


# ---------------------------------------------------------------- the node's side


def read_boot() -> dict:
    """boot.json, checked (layout.boot_record): a known slot, and `previous` only if it is one."""
    try:
        return layout.boot_record(layout.BOOT_FILE.read_bytes())
    except OSError:
        return {"slot": layout.BOOT_SLOTS[0]}


def write_boot(boot: dict) -> None:
    layout.BOOT_FILE.parent.mkdir(parents=True, exist_ok=True)
    tmp = layout.BOOT_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(boot, sort_keys=True) + "\n")
    with open(tmp) as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, layout.BOOT_FILE)


def os_version() -> str:
    for line in Path("/usr/lib/os-release").read_text().splitlines():
        if line.startswith("VERSION_ID="):
            return line.split("=", 1)[1].strip().strip('"')
    return "unknown"


class Updater:
    def __init__(self, config: dict) -> None:
        self.config = config
        self.node = config["name"]
        self.strategy = config.get("strategy", "etcd-lock")
        self.max_holders = int(config.get("max_holders", 1))
        self.etcd = Etcd(config["endpoints"], config.get("tls"))
        self.semaphore = Semaphore(self.etcd)
        # A VM booted from a Lab OS A/B disk: the boot loader picks the slot (on nspawn the provider does)
        self.ab_disk = bootslots.on_ab_disk()

    def log(self, message: str) -> None:
        print(message, flush=True)

    def publish(self, state: str, **extra) -> None:
        boot = read_boot()
        record = {"node": self.node, "state": state, "version": os_version(), "slot": boot["slot"],
                  "boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip(), "at": time.time(),
                  **extra}
        self.etcd.put(f"{layout.NODE_UPDATES}{self.node}", json.dumps(record, sort_keys=True))

    # -- after boot

    def settle_boot(self) -> None:
        """Confirm or roll back the slot this boot tried."""
        boot = read_boot()
        if not boot.get("try"):
            if boot.get("halt_pending"):  # rolled back with no etcd to tell (see below): tell it now
                self.halt(boot.get("rolled_back_from", "?"), boot.get("reason", "?"))
                write_boot({key: value for key, value in boot.items() if key != "halt_pending"})
            self.release_if_holding()
            self.publish("idle")
            return
        if self.ab_disk and bootslots.booted_slot() != boot["slot"]:
            # The trial boot never reached us: SYSLINUX's boot-once was spent by a boot that hung,
            # panicked or was reset, and this boot is the default (previous) slot's.
            booted = bootslots.booted_slot()
            reason = f"slot {boot['slot']} did not come up (the boot loader went back to slot {booted})"
            self.log(f"{reason}: halting the update")
            self.record_rollback({"slot": booted, "rolled_back_from": boot.get("target", "?"), "reason": reason,
                                  "rolled_back_staging": boot.get("staging")})
            self.publish("rolled-back", failed_version=boot.get("target", "?"), reason=reason)
            self.release_if_holding()
            return
        self.log(f"booted slot {boot['slot']} (version {os_version()}) on trial: health check")
        healthy, reason = self.health_check()
        if healthy:
            if self.ab_disk:
                bootslots.set_default(boot["slot"])  # from now on SYSLINUX boots it by itself
            write_boot({"slot": boot["slot"]})
            self.publish("updated")
            self.log(f"slot {boot['slot']} is good; releasing the reboot lock")
            self.release_if_holding()
            return
        failed_version = os_version()
        previous = boot.get("previous")
        if previous is None or previous == boot["slot"]:
            # Nothing to roll back to (a boot.json written by hand, or by an
            # older agent): stay on this slot, halt the roll, and never try again.
            self.log(f"health check failed ({reason}) and boot.json names no previous slot: "
                     f"staying on slot {boot['slot']}, halting the update")
            write_boot({"slot": boot["slot"], "rolled_back_staging": boot.get("staging")})
            self.halt(failed_version, f"{reason}; no previous slot to roll back to")
            self.publish("failed", failed_version=failed_version, reason=reason)
            self.release_if_holding()
            return
        self.log(f"health check failed ({reason}): rolling back to slot {previous}")
        if self.ab_disk:
            bootslots.set_default(previous)  # it is already, unless someone changed it: the next boot is its
        try:
            self.record_rollback({"slot": previous, "rolled_back_from": failed_version, "reason": reason,
                                  "rolled_back_staging": boot.get("staging")})
            self.publish("rolling-back", failed_version=failed_version, reason=reason)
        except ConnectionError as exc:
            # The broken part may be this very etcd, the lab's only member: the roll back must not
            # wait for it. The previous slot's boot publishes the halt (record_rollback's halt_pending).
            self.log(f"etcd unreachable ({exc}): going back first, the halt is published after the reboot")
        self.reboot()

    def record_rollback(self, boot: dict) -> None:
        """boot.json for the slot gone back to, and the halt published. Until it is, boot.json says
        halt_pending: etcd may not answer (a boot just begun, a one-member lab whose broken part is its
        etcd), and whichever settle_boot comes next publishes it."""
        write_boot({**boot, "halt_pending": True})
        self.halt(boot["rolled_back_from"], boot["reason"])
        write_boot(boot)

    def halt(self, version: str, reason: str) -> None:
        """Publish the failure: no node starts an update after it."""
        self.etcd.put(layout.HALTED, json.dumps({"node": self.node, "version": version, "reason": reason,
                                                 "at": time.time()}, sort_keys=True))

    def health_check(self) -> tuple[bool, str]:
        deadline = time.monotonic() + float(self.config.get("health_timeout", HEALTH_TIMEOUT))
        reason = "not checked"
        while time.monotonic() < deadline:
            etcd_ok = subprocess.run(["systemctl", "is-active", "--quiet", "etcd"]).returncode == 0
            agent_ok = subprocess.run(["systemctl", "is-active", "--quiet", layout.AGENT_SERVICE]).returncode == 0
            member_ok = etcd_ok and self.etcd.healthy(self.config["endpoints"][0])  # its own member: listed first
            registered = agent_ok and self._registered()
            if member_ok and registered:
                return True, "etcd member healthy, scheduler agent registered"
            reason = ("etcd is not running" if not etcd_ok else "the etcd member is not healthy" if not member_ok
                      else "the scheduler agent is not running" if not agent_ok
                      else "the scheduler agent did not register")
            if subprocess.run(["systemctl", "is-failed", "--quiet", "etcd"]).returncode == 0:
                return False, "etcd failed to start"
            time.sleep(1)
        return False, reason

    def _registered(self) -> bool:
        machine = layout.machine_id()
        try:
            return self.etcd.get(f"{layout.MACHINES}{machine}") is not None
        except ConnectionError:
            return False

    def release_if_holding(self) -> None:
        if self.strategy == "etcd-lock" and self.semaphore.holds(self.node, self.max_holders):
            self.semaphore.release(self.node, self.max_holders)

    # -- rolling forward

    def staged(self) -> dict | None:
        value = self.etcd.get(f"{layout.STAGED}{self.node}")
        return json.loads(value) if value else None

    def step(self) -> None:
        staged = self.staged()
        boot = read_boot()
        if not staged or staged["slot"] == boot["slot"] or self.strategy == "off":
            return
        if boot.get("rolled_back_staging") == staged.get("at"):
            return  # this node already failed this very staging (a new `lab update` stages anew)
        if self.etcd.get(layout.HALTED):
            # A halted roll goes no further: a lock taken before the halt is
            # given back, or no other update could ever start.
            self.release_if_holding()
            return
        if self.strategy == "etcd-lock" and not self.semaphore.acquire(self.node, self.max_holders):
            return
        self.wait_units_settled(layout.machine_id())
        if self.strategy == "etcd-lock":
            # Check the lock again right before acting: a pause between
            # acquiring and rebooting must not let two holders too many reboot.
            if not self.semaphore.holds(self.node, self.max_holders):
                return
            if self.etcd.get(layout.HALTED):
                self.release_if_holding()
                return
        self.log(f"rebooting into slot {staged['slot']} (version {staged['version']})")
        self.publish("rebooting", target=staged["version"])
        self.drain()
        write_boot({"slot": staged["slot"], "try": True, "previous": boot["slot"],
                    "staging": staged.get("at"), "target": staged["version"]})
        if self.ab_disk:
            try:
                bootslots.boot_once(staged["slot"])
            except bootslots.SlotError as exc:
                # No trial without the boot loader's part: stay, undo the drain, stop the roll.
                write_boot(boot)
                layout.DRAIN_FLAG.unlink(missing_ok=True)
                self.halt(staged["version"], f"could not set the boot loader's boot-once: {exc}")
                self.release_if_holding()
                return
        self.reboot()

    def wait_units_settled(self, machine: str) -> None:
        """Until every unit placed on another machine runs (see units_starting_elsewhere), at most
        SETTLE_TIMEOUT: a disruption budget of one node, so a drain never takes a service's last replica."""
        deadline = time.monotonic() + float(self.config.get("settle_timeout", SETTLE_TIMEOUT))
        logged = None
        while True:
            starting = units_starting_elsewhere(self.etcd.get_prefix(layout.UNITS),
                                                self.etcd.get_prefix(layout.SCHEDULE),
                                                self.etcd.get_prefix(layout.STATES), machine)
            if not starting or self.etcd.get(layout.HALTED):  # a halted roll: step() gives the lock back
                return
            if time.monotonic() > deadline:
                self.log(f"drain: {', '.join(starting)} still not running elsewhere; draining anyway")
                return
            if starting != logged:
                self.log(f"drain: waiting for {', '.join(starting)} to run on their machines first")
                logged = starting
            time.sleep(0.5)

    def drain(self) -> None:
        """Ask the scheduler agent to stop its units and deregister, so they move before we go."""
        layout.DRAIN_FLAG.parent.mkdir(parents=True, exist_ok=True)
        layout.DRAIN_FLAG.write_text(str(time.time()))
        machine = layout.machine_id()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.etcd.get(f"{layout.MACHINES}{machine}") is None:
                return
            time.sleep(0.2)
        self.log("drain: the scheduler agent did not deregister in 15 s; rebooting anyway")

    def reboot(self) -> None:
        # `systemctl reboot` can fail on its D-Bus call ("Connection reset by
        # peer") while the system is busy; then ask PID 1 directly.
        for command in (["systemctl", "reboot"], ["kill", "-s", "RTMIN+5", "1"], ["systemctl", "reboot", "-ff"]):
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                self.log(f"{' '.join(command)} failed: {result.stderr.strip()}")
            time.sleep(15)  # systemd stops us long before this when the reboot is under way
        time.sleep(60)

    def run_forever(self) -> None:
        while True:
            try:
                self.settle_boot()
                break
            except (ConnectionError, KeyError, ValueError, bootslots.SlotError) as exc:
                self.log(f"settling this boot failed, trying again: {type(exc).__name__}: {exc}")
                time.sleep(1)
        while True:
            try:
                self.step()
            except ConnectionError as exc:
                self.log(f"etcd unreachable: {exc}")
            except Exception as exc:  # noqa: BLE001 - keep rolling; systemd would give up on a crash loop
                self.log(f"step failed: {type(exc).__name__}: {exc}")
            time.sleep(float(self.config.get("interval", 1.0)))


def main(argv: list[str]) -> int:
    Updater(layout.read_config(argv)).run_forever()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv))
