"""The linearizability checker: do a history's registers behave like single registers?

`check_linearizable` answers, for the read/write/cas operations of a
workload's history (lab.scenarios.history): is there one total order of
them, consistent with real time, in which each key behaves like a single
register? No I/O: the history is a list of `Op`.

How the linearizability search works
------------------------------------
Keys are checked one by one: a history is linearizable iff its restriction to
every key is (P-compositionality, Herlihy & Wing), which turns one huge search
into a few small ones.

Per key this is Wing & Gong's search with Lowe's just-in-time linearization
and memoization, laid out as Porcupine does it: every known operation becomes
a call event and a return event, sorted by time into a doubly linked list.
A configuration is (the set of operations linearized so far, the register's
value). From a configuration the search may linearize any operation whose
call comes before the first remaining return (it could have taken effect
before anything still pending had to); it "lifts" that operation's two events
out of the list and goes on, and backtracks when the first remaining return
belongs to an operation that cannot be linearized in this state. Visited
configurations are cached, so each is explored at most once.

* Ties: at equal timestamps calls sort before returns, so operations that
  merely touch (one completes at the instant the other is invoked) count as
  concurrent. The clock is read before sending and after receiving, so
  touching intervals cannot be ordered with confidence; treating them as
  concurrent can only accept more histories, never reject a correct one.
* `fail` operations are dropped: they surely did not happen. Reads with
  status `unknown` are dropped as well: no effect, no information.
* `unknown` writes and CAS may take effect at any instant after their invoke,
  or never. Their return is at +infinity, so they never bound the search and
  never have to be linearized: the search succeeds as soon as every *known*
  operation is linearized (an unknown one left over is one that never took
  effect, or took effect after everything else, which nobody observed).
  They are kept out of the event list and offered only where some operation
  that may go next would observe them (a read of their value, a CAS
  expecting it, a refused CAS that needs the value to change): in any valid
  order an unknown operation not directly followed by such an observer can
  be dropped (a write follows) or moved later (a read that did not need it
  follows), so no linearization is lost. For the same reason an unknown
  blind write is never offered right after another unknown operation, nor
  an unknown CAS whose expected value is not there (a no-op).
* The cache prunes by domination, not just equality: a configuration that
  has used up a superset of the unknown operations of one already entered,
  with the same known operations and register value, can do nothing the
  entered one could not (an unknown operation never *has* to be used).
* Values that no remaining operation compares the register with are dead:
  which dead value the register holds changes nothing, so the cache counts
  them as one value and unknown writes of dead values as interchangeable.
* Reads, and CAS that reported false, do not change the register. When one
  of them can be linearized right now, it is, without branching: moving such
  an operation to the front of any valid completion keeps it valid, so this
  choice loses nothing, and concurrent reads no longer explode into every
  permutation.
* The order in which moves are tried does not change the answer, only how
  fast a linearizable history is found: first the operation whose return
  is next, then whatever gives it the value it needs, then the others by
  earliest return, so that operations pending for a long time are placed
  only when something needs them.

These rules are checked against a brute-force search over every order on
thousands of small random histories (tests/unit/test_checker.py).

When the search fails it reports the deepest point it reached: the return
event R that no configuration got past, though some got past every earlier
one. So every operation that completed before R fits some linearization,
and the history up to R (operations still pending then may or may not have
taken effect) fits none: it is the smallest failing prefix.
The explanation (lab.scenarios.explain) lists the operation of R, the
values the register could hold when it had to take effect, the operations
that wrote those values, and what ran around it.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

from lab.scenarios.explain import explain
from lab.scenarios.history import REGISTER_KINDS, HistoryError, Op, problem_of


# A search that has stored this many configurations is stopped as
# inconclusive, like a timeout: memory is the other budget (~0.13 kB each,
# so about 1 GB).
MAX_CONFIGURATIONS = 8_000_000


@dataclass
class RegisterResult:
    key: str
    linearizable: bool
    ops: int  # operations that took part in the search (fail ops and unknown reads are not counted)
    explanation: str


@dataclass
class LinearizabilityReport:
    ok: bool
    registers: list[RegisterResult]
    elapsed_s: float
    timed_out: bool


def check_linearizable(ops: list[Op], initial: dict[str, Any] | None = None,
                       timeout_s: float = 60.0) -> LinearizabilityReport:
    """Check every key's read/write/cas operations as an independent register.

    `initial` gives registers that do not start absent (None). Past
    `timeout_s` the report says timed_out and not ok: an unfinished search
    proves nothing either way.
    """
    started = time.perf_counter()
    deadline = started + timeout_s
    initial = initial or {}
    by_key: dict[str, list[Op]] = {}
    seen: set[int] = set()
    for op in ops:
        problem = problem_of(op)
        if problem:
            raise HistoryError(f"op {op.id}: {problem}")
        if op.id in seen:
            raise HistoryError(f"op {op.id}: the id is used twice", hint="ids name operations in explanations")
        seen.add(op.id)
        if op.kind in REGISTER_KINDS:
            by_key.setdefault(op.key, [])
            if op.status == "ok" or (op.status == "unknown" and op.kind != "read"):
                by_key[op.key].append(op)

    registers: list[RegisterResult] = []
    timed_out = False
    for key in sorted(by_key):
        key_ops = by_key[key]
        if timed_out:
            registers.append(RegisterResult(key, False, len(key_ops),
                                            f"key {key!r}: not checked: the time budget of {timeout_s:g} s "
                                            f"ran out on earlier keys; the answer is unknown"))
            continue
        result, timed_out = _check_register(key, key_ops, initial.get(key), deadline)
        registers.append(result)
    ok = not timed_out and all(r.linearizable for r in registers)
    return LinearizabilityReport(ok, registers, time.perf_counter() - started, timed_out)


# Known operations, by what they need from the register and do to it.
_READ, _WRITE, _CAS_APPLIED, _CAS_REFUSED = 0, 1, 2, 3
_NOTHING = object()  # no particular value; also "a value nobody will look at" in cache keys


class _Inconclusive(Exception):
    def __init__(self, reason: str, configurations: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.configurations = configurations


def _check_register(key: str, ops: list[Op], init: Any, deadline: float) -> tuple[RegisterResult, bool]:
    """The register's result, and whether its search was cut short."""
    known = [op for op in ops if op.status == "ok"]
    unknown = sorted((op for op in ops if op.status == "unknown"), key=lambda op: op.invoke)
    search = _RegisterSearch(known, unknown, init)
    try:
        found = search.run(deadline)
    except _Inconclusive as exc:
        return RegisterResult(key, False, len(ops),
                              f"key {key!r}: inconclusive: the search {exc.reason} after exploring "
                              f"{exc.configurations} configurations of {len(ops)} operations, so whether "
                              f"this register is linearizable is unknown (not claimed either way); "
                              f"rerun the check with a larger timeout_s"), True
    if found:
        return RegisterResult(key, True, len(ops), f"key {key!r}: linearizable ({len(ops)} operations)"), False
    return RegisterResult(key, False, len(ops),
                          explain(key, known, unknown, init, search.deepest_op, search.deepest_states)), False


class _RegisterSearch:
    """Wing-Gong/Lowe/Porcupine search over one register (see the module docstring).

    Known ops are numbered by their index in `known`, unknown ops by their
    index in `unknown`, which is sorted by invoke (bit j of `ubits`; a move
    of unknown op j is written -1-j).
    """

    def __init__(self, known: list[Op], unknown: list[Op], init: Any) -> None:
        self.known, self.unknown, self.init = known, unknown, init
        n_known, n_unknown = len(known), len(unknown)
        events = []
        for i, op in enumerate(known):
            events.append((op.invoke, 0, i))
            events.append((op.complete, 1, i))
        for j, op in enumerate(unknown):
            events.append((op.invoke, 0, n_known + j))
        events.sort(key=lambda ev: (ev[0], ev[1]))  # stable: calls first at equal times

        # The call and return events of known ops, linked both ways through
        # nxt/prv so that an op's two events are lifted out and put back in
        # O(1) (put back in reverse order of lifting, as dancing links do).
        size = len(events)
        self.head = head = size
        tail = size + 1
        self.nxt = nxt = [tail] * (size + 2)
        self.prv = prv = [head] * (size + 2)
        self.is_return = is_return = [False] * (size + 2)
        is_return[tail] = True  # never reached while a known op is left; stops a walk regardless
        self.ev_op = ev_op = [-1] * (size + 2)
        self.return_of = return_of = [-1] * (size + 2)  # call event -> its return event
        call_at = [0] * n_known
        # An unknown op's call position: it may go before any later return.
        self.unknown_call = unknown_call = [0] * n_unknown
        last = head
        for pos, (_, is_ret, idx) in enumerate(events):
            if idx >= n_known:
                unknown_call[idx - n_known] = pos  # unknown ops have no place in the list
                continue
            ev_op[pos] = idx
            if is_ret:
                is_return[pos] = True
                return_of[call_at[idx]] = pos
            else:
                call_at[idx] = pos
            nxt[last], prv[pos] = pos, last
            last = pos
        nxt[last], prv[tail] = tail, last

        self.code = code = []
        self.value = [op.value for op in known]
        self.expected = expected = [op.expected for op in known]
        self.output = output = [op.output for op in known]
        for op in known:
            if op.kind == "read":
                code.append(_READ)
            elif op.kind == "write":
                code.append(_WRITE)
            else:
                code.append(_CAS_APPLIED if op.output else _CAS_REFUSED)
        self.u_is_write = u_is_write = [op.kind == "write" for op in unknown]
        self.u_value = [op.value for op in unknown]
        self.u_expected = [op.expected for op in unknown]
        self.u_cas = [j for j in range(n_unknown) if not u_is_write[j]]

        # Values that some op not yet linearized compares the register with
        # are "live". A dead value is never looked at again on this path, so
        # which dead value the register holds makes no difference: the cache
        # counts them as one, and unknown writes of dead values are
        # interchangeable. `watchers[v]` counts the known ops left that
        # compare with value number v; unknown CAS keep their expected value
        # live for good (so liveness depends on the known ops alone).
        self.value_id: dict[Any, int] = {}
        self.observes = [-1] * n_known  # known op -> number of the value it compares with
        for i in range(n_known):
            if code[i] != _WRITE:
                v = output[i] if code[i] == _READ else expected[i]
                self.observes[i] = self.value_id.setdefault(v, len(self.value_id))
        for j in self.u_cas:
            self.value_id.setdefault(self.u_expected[j], len(self.value_id))
        self.watchers = [0] * len(self.value_id)
        for vid in self.observes:
            if vid >= 0:
                self.watchers[vid] += 1
        for j in self.u_cas:
            self.watchers[self.value_id[self.u_expected[j]]] += 1 << 40  # never reaches zero
        self.u_setting: dict[Any, list[int]] = {}  # value -> unknown ops that would set it
        for j, op in enumerate(unknown):
            self.u_setting.setdefault(op.value, []).append(j)
        # known read / applied CAS -> the unknown ops that would set the value it needs
        self.u_for = [self.u_setting.get(output[i] if code[i] == _READ else expected[i], ())
                      if code[i] in (_READ, _CAS_APPLIED) else () for i in range(n_known)]

        self.deepest = -1  # the deepest first-remaining-return any configuration reached
        self.deepest_states: set = set()

    @property
    def deepest_op(self) -> Op | None:
        return self.known[self.ev_op[self.deepest]] if self.deepest >= 0 else None

    def live(self, state: Any) -> bool:
        vid = self.value_id.get(state)
        return vid is not None and self.watchers[vid] > 0

    def run(self, deadline: float) -> bool:
        """True when a linearization exists, False when none does; raises _Inconclusive."""
        head, nxt, prv, is_return = self.head, self.nxt, self.prv, self.is_return
        ev_op, return_of, code = self.ev_op, self.return_of, self.code
        value, expected, output, u_value = self.value, self.expected, self.output, self.u_value
        observes, watchers, value_id = self.observes, self.watchers, self.value_id
        # The set of known ops linearized is identified by a 128-bit Zobrist
        # hash (the XOR of a random number per op), updated in O(1) per move.
        # Keeping the bitset itself cost a big-int operation per move and
        # ~1 kB per cached configuration on a 10,000-op key. Two different
        # sets sharing a hash (odds below 1e-20 at millions of configurations)
        # could only prune a branch: it can make a linearizable history look
        # non-linearizable, never the reverse.
        zobrist_source = random.Random(len(code))
        zobrist = [zobrist_source.getrandbits(128) for _ in code]

        # Cache: (known-set hash, value or _NOTHING when dead) -> the bitsets
        # of unknown ops used by the configurations entered with it (an int,
        # or a list of them once there are several). A new one is pruned
        # when an entered one used a subset of its unknown ops: that one had
        # at least as many options.
        cache: dict[tuple[int, Any], Any] = {}

        def enter(khash: int, state: Any, ubits: int) -> bool:
            vid = value_id.get(state)
            key = (khash, state if vid is not None and watchers[vid] > 0 else _NOTHING)
            seen = cache.get(key)
            if seen is None:
                cache[key] = ubits
                return True
            if seen.__class__ is int:
                if not seen & ~ubits:
                    return False
                cache[key] = [seen, ubits]
                return True
            for other in seen:
                if not other & ~ubits:
                    return False
            seen.append(ubits)
            return True

        state = self.init
        ubits = khash = 0
        left = len(code)
        # Moves made: (call event, or -1-j for unknown op j; state before;
        # forced; the candidate list of the configuration it left; its index).
        stack: list[tuple[int, Any, bool, list[int], int]] = []
        steps = 0
        enter(0, state, 0)
        candidates: list[int] = []
        index = 0
        backtrack = False
        while True:
            if backtrack:
                # Undo moves until one whose configuration has choices left.
                while True:
                    if not stack:
                        return False
                    top, state, forced, candidates, index = stack.pop()
                    if top >= 0:
                        r = return_of[top]
                        nxt[prv[r]] = r; prv[nxt[r]] = r  # noqa: E702 - unlift in reverse order
                        nxt[prv[top]] = top; prv[nxt[top]] = top  # noqa: E702
                        i = ev_op[top]
                        khash ^= zobrist[i]
                        if observes[i] >= 0:
                            watchers[observes[i]] += 1
                        left += 1
                    else:
                        ubits ^= 1 << (-1 - top)
                    if not forced:
                        break
                index += 1
                backtrack = False
            else:
                # A new configuration.
                if left == 0:
                    return True
                steps += 1
                if not steps & 1023:
                    if time.perf_counter() > deadline:
                        raise _Inconclusive("ran out of time", steps)
                    if steps > MAX_CONFIGURATIONS:
                        raise _Inconclusive(f"reached its limit of {MAX_CONFIGURATIONS} stored configurations",
                                            steps)
                # A read or refused CAS that fits now is taken without
                # branching; on the way, collect the writes and CAS that could go.
                e = nxt[head]
                movable = []
                while not is_return[e]:
                    i = ev_op[e]
                    c = code[i]
                    if c == _WRITE or (c == _CAS_APPLIED and expected[i] == state):
                        movable.append(e)
                    elif (c == _READ and output[i] == state) or (c == _CAS_REFUSED and expected[i] != state):
                        break
                    e = nxt[e]
                if not is_return[e]:
                    nh = khash ^ zobrist[i]
                    watchers[observes[i]] -= 1
                    if not enter(nh, state, ubits):
                        watchers[observes[i]] += 1
                        backtrack = True  # the forced move is a dead end, so this configuration is one
                        continue
                    stack.append((e, state, True, candidates, index))
                    r = return_of[e]
                    nxt[prv[e]] = nxt[e]; prv[nxt[e]] = prv[e]  # noqa: E702 - lift the call...
                    nxt[prv[r]] = nxt[r]; prv[nxt[r]] = prv[r]  # noqa: E702 - ...and its return
                    khash = nh
                    left -= 1
                    continue
                candidates = self.candidates(e, state, movable, stack, ubits)
                index = 0
                if e > self.deepest:
                    self.deepest, self.deepest_states = e, {state}
                elif e == self.deepest:
                    self.deepest_states.add(state)

            # Try the configuration's candidates from `index` on.
            while index < len(candidates):
                e = candidates[index]
                if e >= 0:
                    i = ev_op[e]
                    new_state = value[i]
                    nh = khash ^ zobrist[i]
                    vid = observes[i]
                    if vid >= 0:
                        watchers[vid] -= 1
                    if enter(nh, new_state, ubits):
                        stack.append((e, state, False, candidates, index))
                        r = return_of[e]
                        nxt[prv[e]] = nxt[e]; prv[nxt[e]] = prv[e]  # noqa: E702
                        nxt[prv[r]] = nxt[r]; prv[nxt[r]] = prv[r]  # noqa: E702
                        khash = nh
                        left -= 1
                        state = new_state
                        break
                    if vid >= 0:
                        watchers[vid] += 1
                else:
                    j = -1 - e
                    bit = 1 << j
                    if enter(khash, u_value[j], ubits | bit):
                        stack.append((e, state, False, candidates, index))
                        ubits |= bit
                        state = u_value[j]
                        break
                index += 1
            else:
                backtrack = True

    def candidates(self, frontier: int, state: Any, movable: list[int], stack: list, ubits: int) -> list[int]:
        """The moves worth trying from a configuration with no free move, best first.

        `frontier` is the first remaining return, of op x, which must be
        linearized before it. Any order is complete; this one finds a
        linearizable history fast: x itself, then what would give x the value
        it needs, then the other known ops by earliest return (long-pending
        ops are placed only once something needs them), then unknown ops.

        Unknown ops are offered only when an op that may go now (call before
        the frontier) would observe them next: a read of their value, a CAS
        expecting it, or a refused CAS (blocked now, so anything but the
        current value would do). In a completion, an unknown op not directly
        followed by such an observer can be dropped (a write follows) or slid
        later (a read or refused CAS that did not need it follows), so none
        is lost. An unknown blind write straight after an unknown move is not
        offered: the pair equals the second alone, which the configuration
        before tries itself. Of unknown writes of dead values (see __init__)
        only the first still unused is offered: the others would do the same.
        """
        ev_op, code, value, return_of = self.ev_op, self.code, self.value, self.return_of
        x = ev_op[frontier]
        c = code[x]
        needed = self.output[x] if c == _READ else self.expected[x] if c == _CAS_APPLIED else _NOTHING
        movable.sort(key=return_of.__getitem__)  # x, when movable, comes first: it has the first return
        first = [m for m in movable if ev_op[m] == x or value[ev_op[m]] == needed]
        rest = [m for m in movable if m not in first] if first else movable
        unknown_call = self.unknown_call
        if not unknown_call or unknown_call[0] >= frontier:
            return first + rest if first else movable

        # Which unknown ops an op that may go now would observe next.
        pool: list[int] = []
        refused_blocked = False
        nxt, u_for = self.nxt, self.u_for
        e = nxt[self.head]
        while e != frontier:
            i = ev_op[e]
            if code[i] == _CAS_REFUSED:
                refused_blocked = True
                break
            if u_for[i]:
                pool.extend(u_for[i])
            e = nxt[e]
        u_is_write, u_value, u_expected = self.u_is_write, self.u_value, self.u_expected
        if refused_blocked:
            pool = range(len(u_value))
        else:
            for j in self.u_cas:
                if unknown_call[j] < frontier and not ubits >> j & 1:
                    pool.extend(self.u_setting.get(u_expected[j], ()))
            if not pool:
                return first + rest if first else movable
            pool = sorted(set(pool))
        after_unknown = bool(stack) and stack[-1][0] < 0
        helpers, others = [], []
        dead_write_offered = False
        for j in pool:
            if unknown_call[j] >= frontier:
                if refused_blocked:
                    break  # pool is in invoke order
                continue
            if ubits >> j & 1 or u_value[j] == state:
                continue
            if u_is_write[j]:
                if after_unknown:
                    continue
                if not self.live(u_value[j]):
                    if dead_write_offered:
                        continue
                    dead_write_offered = True
            elif u_expected[j] != state:
                continue
            (helpers if u_value[j] == needed else others).append(-1 - j)
        return first + helpers + rest + others
