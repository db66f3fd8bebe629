"""The rate budget in DynamoDB: a virtual schedule in one item of the state table, so that
the concurrent Lambda invocations of all stages share it (the interface, the margin and what
both budgets promise: `pipeline.budget`).

Why DynamoBudget claims what its threads will use, and no more
----------------------------------------------------------------
The item holds `tat`, the end of the schedule handed out so far: GCRA's virtual schedule,
one slot every (W + margin + LATE) / L, so that any L + 1 slots span more than W plus the
margin even if a thread starts its call up to LATE (15 ms) after its slot. A slot not used by
then is lost: spent later, it would crowd the slots after it. So every slot claimed and not
used is a call the vendor would have taken and nobody made; the budget is only as good as
its claims are sized.

The first version claimed a fixed quarter second of slots per write. Measured (bench.budget):
an invocation with one call to make still took 25 slots, so four upstream invocations with a
call every half second left the busy ones 0.41 of the limit; six invocations of 16 threads at
200 ms vendor latency can use 16 slots per 200 ms each, not 50, and got 0.47; at 400 ms a
thread comes back after its invocation's quarter second is over, 0.78.

So a claim is sized by what this invocation's own threads will take, and made when it is
needed:

- Size: the threads waiting in `acquire`, plus the threads now away on a vendor call that
  will be back by the time a slot of the claim comes, each counted again for every later slot
  it can reach (its time away is learned: mean plus two mean deviations of the time between
  its slot and its next `acquire`). The claim ends at the first slot no thread would be there
  for; at most CLAIM_SECONDS (half a second) of slots. A thread away for over two of its
  usual times away is not counted (it may be doing other work, or be done). A busy
  invocation with fast calls thus claims half a second of slots in one write; one with one
  call to make claims one slot; 16 threads at 200 ms claim 16. (Claims of up to 40 slots
  within a second at low limits were measured on 2026-12-03: at 50 calls/s the budget's
  requests per call fell from 0.052-0.070 to 0.036-0.051, utilization unchanged, but
  another invocation's 429 or hold then reaches this one up to 0.8 s of slots later
  instead of 0.5 s. One or two budget writes a second at 50 calls/s are no load worth that:
  not kept.)
- Where the claim will land: behind the schedule's end, which other invocations have moved
  since this one last saw it. The claim is sized for the backlog its recent claims found (less
  its usual variation) and made on the condition that the schedule does reach that far; if it
  does not, the failed write brings back where it ends and the claim is sized again. A
  schedule that has fallen behind the clock is restarted where the claim says; a little later
  than at once if threads due back then would make the claim much larger (a thread back alone
  would otherwise claim alone on every round, its fellows a moment later).
- Timing: waiting threads claim only once the schedule as this invocation last saw it is
  about to run out (less than a DynamoDB round trip left). Until then a claim could only land
  behind it anyway, and the longer the threads wait for it, the more of them share one write.
- One write: a claim is a single conditional UpdateItem. While the schedule runs ahead of the
  clock it is `SET tat = tat + :span` (no read first, and two invocations claiming at once
  both succeed, one after the other); when the schedule has fallen behind it is `SET tat =
  :end` on the condition that it still has. ReturnValues gives the new end (so the slots) and,
  on a failed condition, the item as it was (ReturnValuesOnConditionCheckFailure), so a wrong
  guess of which of the two applies costs one more request, never a read. Times in the item
  are whole multiples of 10 µs, which survive the trip between floats and DynamoDB's decimals.

Measured with bench.budget (four mixes of invocations, 8 ms per DynamoDB request): 0.95 to
0.98 of what the callers could use in every mix, against 0.39 to 0.97 before, and one
DynamoDB request per 13 to 40 calls. What it does not reach: invocations whose threads cannot
fill the limit wait a DynamoDB round trip per claim, two when another invocation claims at the
same moment, and because the schedule spaces every slot evenly, invocations whose threads
come back at the same moment queue behind each other where a sliding log would let them
through at once. On random such mixes at 40 to 80% of the limit they get 0.85 to 0.96 of
what their threads carry (tests/test_budget_properties.py); two invocations of 16 threads at
400 ms get 0.95 to 0.96.

Alternatives weighed: a log of recent claims in the item (runs of slots, a sliding log at
the granularity of claims) would let such bursts through, but a claim must then read the log,
place its run and write it back on a version, so concurrent claims conflict and retry; worth
it only if capacity-bound mixes matter more than they do here (a drain sizes its concurrency
to rate × latency, so its threads are rarely short). Per-sub-second counters need a sum over
the buckets of a window in the condition, which no condition expression can express. Giving
unused slots back only works on GCRA's tail, and only while nobody has claimed behind it: not
a design on its own, but it is used where a claim is most often wasted (below). Rate leases
per invocation must wait out a whole W before a share given up may be used elsewhere, and an
idle invocation's share is lost meanwhile.

An invocation's end: a claim is sized for the threads expected back, and a drain that stops
taking messages at its deadline leaves them nothing to come back for, so the slots it held
were lost to every invocation: 20-30 at each deadline, 176 of 10,521 calls' slots in an
AWS-mode run of 100 s (dips to 55-78 calls/s at 100/s). Past its deadline a drain now tells
the budget (`winding_down`: claims for the threads waiting only) and keeps taking messages
while it holds usable slots (`held`), for at most a second of its 30 s margin: 4 slots
lost in the same run.

A queue that runs dry: the same loss, without a deadline. A listing stage's drain claims half
a second of slots for its threads, takes the last messages of its queue, and its threads do
not come back (traced in an AWS-mode run: the warriors' drain claimed 100 slots at 200/s, 14
ms before its receive came back empty; the data drain's next claim landed behind them, 0.5 s
with no call). So a drain that finds its queue empty, and one that stops, gives back the
slots it holds beyond its messages in process (`give_back`): one conditional write moves the
schedule's end back to the first slot given up, if the schedule still ends where this
invocation's last claim left it. If someone has claimed behind, nothing changes (the slots
stay held, and are lost if unused, as before). Measured in the AWS-mode bench (`budget
slots` line; 1,000 and 3,000 calls at 200/s, four runs each way, alternating): 23 to 137
slots lost a run with it, 126 to 185 without.

A call that leaves late: the spacing lets a call leave up to LATE after its slot, and
leaves the margin to the network. A thread can lose the CPU for longer between taking its
slot and writing its request: a Lambda sandbox that has spent its CPU share is held until
the scheduler's next period, tens of ms (in the AWS-mode bench, at 1024 MB, sandboxes were
held in about 1% of their 100 ms periods, 26-28 ms each on average). Such a call can be
closer than W + margin to the L-th call after it, and a strict vendor refuses that one.
Each of the five 429s the AWS-mode bench drew in four runs of 35,000 calls had a vendor
window whose first calls came bunched (6 to 15 gaps under half the spacing): consistent
with late sends, though bunching inside the simulator's own process (its threads waiting
for the GIL or a core) would look the same and was not ruled out. So the client
tells the budget when the request was written (`arrived`, `sent_after`, timed on the
connection), and a call that left later than LATE makes room a window on: as many of the
next L slots as its excess spans go unused, this invocation's held ones first (no request),
else by pushing the schedule's end on (one UpdateItem). Measured: no 429 in five runs of
35,000 calls with it (6 in the six runs before it that day); in the two runs whose counters
were printed, 10 and 57 calls left late, and 10 and 50 slots went unused for them.

What one invocation learns is shared through the same item, and every claim is conditioned
on having seen it, so a claim that has not fails and brings the item back: a pause (a 429's
Retry-After, or the vendor reporting nothing remaining for a while) in `paused_until`; a
lower limit from X-RateLimit-Limit, for an hour; a margin widened by a 429, with when. The
invocation that learns it drops its claimed slots that it makes wrong; the others learn it at
their next claim, at most half a second of slots later, and meanwhile draw their own 429 if
any (and pause on it).
"""

from __future__ import annotations

import heapq
import math
import threading
import time
from collections import deque
from typing import Any

from aws_lambda_powertools import Logger

from pipeline.aws.expiry import DAY, expiring
from pipeline.budget import Clock, Margin, Sleep, paused_error
from pipeline.config import STATE_RETENTION_DAYS

logger = Logger(service="harvest", child=True)

# How long a vendor limit learned from X-RateLimit-Limit overrides the configured one.
LEARNED_LIMIT_SECONDS = 3600.0
# How late after its DynamoBudget slot a thread may still start its call (the schedule's
# spacing has room for it): waking from a sleep, getting a core back, a claim answered late.
LATE_FRACTION = 0.015
LATE_MIN_SECONDS = 0.015
# The most schedule one DynamoBudget claim takes.
CLAIM_SECONDS = 0.5
# A DynamoBudget waiting on another thread's claim looks again after at most this long.
CLAIM_POLL_SECONDS = 0.002
# "Nothing remaining" from the vendor pauses every invocation only if the wait is at least
# this share of W; a shorter one is the vendor's window filling at our own pace.
SHARED_RESET_FRACTION = 0.05
# Weight of each new sample in a DynamoBudget's running estimates.
ESTIMATE_WEIGHT = 0.2


def late_for(period: float) -> float:
    """How late after its DynamoBudget slot a call may still start."""
    return max(period * LATE_FRACTION, LATE_MIN_SECONDS)


class _Estimate:
    """Running mean and mean deviation of a duration."""

    def __init__(self, mean: float | None = None) -> None:
        self.mean = mean
        self.deviation = 0.0

    def add(self, sample: float) -> None:
        if self.mean is None:
            self.mean = sample
            return
        error = sample - self.mean
        self.mean += ESTIMATE_WEIGHT * error
        self.deviation += ESTIMATE_WEIGHT * (abs(error) - self.deviation)

    def high(self) -> float:
        """Rarely exceeded: the mean plus two mean deviations (infinite before a sample)."""
        return math.inf if self.mean is None else self.mean + 2 * self.deviation

    def low(self) -> float:
        """Seldom undercut: the mean less a mean deviation, at least 0 (0 before a sample)."""
        return 0.0 if self.mean is None else max(0.0, self.mean - self.deviation)


def _number(item: dict[str, Any], name: str) -> float | None:
    value = item.get(name, {}).get("N")
    return None if value is None else float(value)


def _n(value: float) -> dict[str, str]:
    return {"N": repr(value)}


# Times go into the item as whole multiples of 10 µs: 15 significant digits, which a float
# carries exactly, so a time read back compares equal to the same time sent. (DynamoDB adds
# in decimal; a sum of two floats' full expansions would not read back as either.)
_GRAIN = 100_000


def _down(value: float) -> float:
    return math.floor(value * _GRAIN) / _GRAIN


def _up(value: float) -> float:
    return math.ceil(value * _GRAIN) / _GRAIN


# Every attribute of a claim by placeholder: reserved words need it, and one spelling is
# easier to read (DynamoDB refuses a placeholder the expressions do not use).
_CLAIM_NAMES = {
    "#tat": "tat",
    "#pause": "paused_until",
    "#limit": "vendor_limit",
    "#limit_expires": "limit_expires",
    "#margin_at": "margin_at",
}
# A claim stands only on what its holder has seen: no pause past its start, no lower limit
# in force, no wider margin than its own.
_SEEN_ALL = (
    "(attribute_not_exists(#pause) OR #pause <= :start)"
    " AND (attribute_not_exists(#limit) OR #limit >= :limit OR #limit_expires < :now)"
    " AND (attribute_not_exists(#margin_at) OR #margin_at <= :margin_at)"
)


class DynamoBudget:
    """The schedule in one item of the state table, shared by every invocation.

    Threads of one invocation take the slots it claimed, earliest first; a claim is made
    when a thread finds none left and the schedule as last seen is about to run out, sized by
    what this invocation's threads will use (see the module docstring).
    """

    def __init__(
        self,
        client: Any,
        table: str,
        calls: int,
        period: float,
        *,
        name: str = "vendor",
        clock: Clock = time.time,
        sleep: Sleep = time.sleep,
        retention_days: float = STATE_RETENTION_DAYS,
    ) -> None:
        self._ddb = client
        self.table = table
        self.retention = retention_days * DAY
        self.calls = calls  # the configured limit, lowered by what the vendor reports
        self.period = period
        self._key = {"pk": {"S": f"budget#{name}"}, "sk": {"S": "schedule"}}
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._margin = Margin(period)
        self._late = late_for(period)
        # What this invocation last saw of the item.
        self._limit = calls  # the limit in force: ours or a lower one learned by anyone
        self._paused_until = 0.0
        self._tat_seen = 0.0
        # This invocation's own claims and threads.
        self._held: deque[float] = deque()  # slots claimed and not yet taken, in order
        self._claiming = False
        self._claim_done = 0.0  # when the claim in flight should be answered
        self._waiting = 0  # threads in acquire without a slot
        self._asleep: list[float] = []  # slots taken by threads still waiting for them
        self._away: dict[int, float] = {}  # thread -> the slot of its call in progress
        self._time_away = _Estimate()  # from a thread's slot to its next acquire
        self._round_trip = _Estimate(0.02)  # of a claim
        self._backlog = _Estimate()  # how far ahead of a claim the schedule was booked
        self._winding_down = False  # see winding_down()
        # The schedule's end as this invocation's last claim left it, and that claim's first
        # slot: while the item still says so, the claim is the schedule's tail (give_back).
        self._tail: tuple[float, float] | None = None
        self._voids = 0  # how often the held slots were voided (_void)
        # Slots claimed, used for a call and given back; claims written, and refused by the
        # item's condition (each refusal costs a request and sizes the claim again); calls
        # that left later than LATE after their slot, the slots not used (held ones dropped,
        # or the schedule's end pushed) to make room for them, and those whose window the
        # schedule was booked past already (`arrived`); slots whose call was not sent, found
        # late before its request was written (`missed`).
        self.slots = dict.fromkeys(
            (
                "claimed",
                "used",
                "given back",
                "claims",
                "refused",
                "late",
                "made room",
                "no room",
                "not sent",
            ),
            0,
        )
        self._handed = threading.local()  # (slot, how late after it) of this thread's call
        self._room: list[float] = []  # where room was made lately (slot times)

    # -- handing out slots -------------------------------------------------------------------

    def acquire(self, max_pause: float = math.inf) -> float:
        me = threading.get_ident()
        with self._lock:
            left = self._away.pop(me, None)
            if left is not None:
                self._time_away.add(self._clock() - left)
            self._waiting += 1
        waiting = True
        try:
            while True:
                slot = self._take(max_pause)
                waiting = False
                delay = slot - self._clock()
                if delay > 0:
                    self._sleep(delay)
                with self._lock:
                    self._asleep.remove(slot)
                    late = self._clock() - slot
                    if slot >= self._paused_until and late <= self._late:
                        self._away[me] = slot
                        self.slots["used"] += 1
                        self._handed.call = (slot, late)
                        return slot
                    # Voided by a pause that came meanwhile, or woke too late to use it.
                    self._waiting += 1
                    waiting = True
        finally:
            if waiting:
                with self._lock:
                    self._waiting -= 1

    def _take(self, max_pause: float) -> float:
        """The earliest slot held for this invocation, claiming more first if none is."""
        while True:
            with self._lock:
                now = self._clock()
                if self._paused_until - now > max_pause:
                    raise paused_error(self._paused_until - now, max_pause)
                self._drop_stale(now)
                if self._held:
                    slot = self._held.popleft()
                    self._waiting -= 1
                    self._asleep.append(slot)
                    return slot
                if self._claiming:
                    wait = max(self._claim_done - now, CLAIM_POLL_SECONDS)
                else:
                    # Until the schedule seen runs out, a claim would land behind it anyway;
                    # waiting lets the threads that come back meanwhile share its write.
                    wait = self._tat_seen - self._round_trip.high() - now
                    if wait <= 0:
                        self._claiming = True
                        self._claim_done = now + (self._round_trip.mean or 0.0)
            if wait > 0:
                self._sleep(wait)
                continue
            try:
                self._claim(max_pause)
            finally:
                with self._lock:
                    self._claiming = False

    def _usable_from(self, now: float) -> float:
        """The earliest held slot a call may still start at: not paused, not past LATE."""
        return max(now - self._late, self._paused_until)

    def _drop_stale(self, now: float) -> None:
        """Drop the held slots nobody was there for in time (lost). The caller holds the lock."""
        usable = self._usable_from(now)
        while self._held and self._held[0] < usable:
            self._held.popleft()

    def _interval(self, now: float) -> float:
        return (self.period + self._margin.at(now) + self._late) / self._limit

    def _lead(self) -> float:
        """How far ahead of its request a claim's first slot is: about when the answer is
        back, less half of LATE (a slot may be taken up to LATE after its time)."""
        return max(0.0, (self._round_trip.mean or 0.0) - self._late / 2)

    def _ready(self, now: float) -> tuple[list[float], float]:
        """When each thread of this invocation can take a slot (the waiting ones now, the
        others when they are expected back), and how long a thread is away between calls."""
        away = self._time_away.high()
        if not math.isfinite(away) or self._winding_down:
            return [now] * self._waiting, math.inf
        ready = [now] * self._waiting + [slot + away for slot in self._asleep]
        for thread, left in list(self._away.items()):
            if left + 2 * away < now:
                del self._away[thread]  # gone elsewhere, or done: its return is no sample
            else:
                ready.append(max(now, left + away))
        return ready, away

    def _fill(self, ready: list[float], away: float, start: float, interval: float) -> int:
        """How many consecutive slots from `start` the threads ready at `ready` will take,
        each again `away` after its slot; at most CLAIM_SECONDS of them, at least one."""
        most = max(1, math.ceil(CLAIM_SECONDS * self._limit / self.period))
        queue = list(ready)
        heapq.heapify(queue)
        count = 0
        while count < most and queue and queue[0] <= start + count * interval:
            heapq.heapreplace(queue, start + count * interval + away)
            count += 1
        return max(1, count)

    def _restart_at(self, now: float, soonest: float, interval: float) -> tuple[float, int]:
        """Where to begin a claim on a schedule that has fallen behind, and its size.

        At once, unless threads due back a little later would make the claim much larger.
        Threads that a claim splits in two (another invocation's run came between) would
        otherwise claim in two parts on every round; waiting for the rest costs the threads
        of the first part the wait once (counted double, as calls lost, against the slots
        gained), and saves a request a round from then on.
        """
        ready, away = self._ready(now)
        at_once = self._fill(ready, away, soonest, interval)
        best, size, score = soonest, at_once, float(at_once)
        if not math.isfinite(away):
            return best, size
        for later in sorted({r for r in ready if soonest < r <= soonest + away / 2})[:16]:
            at = _up(later)
            count = self._fill(ready, away, at, interval)
            value = count - 2 * at_once * (at - soonest) / away
            if value > score:
                best, size, score = at, count, value
        return best, size

    # -- the shared item -----------------------------------------------------------------------

    def _update(self, **update: Any) -> Any:
        """UpdateItem, the item's expires_at set `retention` from now (pipeline.aws.expiry)."""
        return self._ddb.update_item(**expiring(update, self._clock() + self.retention))

    def _claim(self, max_pause: float) -> None:
        """Reserve consecutive slots of the shared schedule, as many as this invocation's
        threads will use, and hold them."""
        assume_backlog = True
        while True:
            with self._lock:
                now = self._clock()
                if self._paused_until - now > max_pause:
                    raise paused_error(self._paused_until - now, max_pause)
                interval = self._interval(now)
                soonest = _up(max(now + self._lead(), self._paused_until))
                # Where the schedule ends is known after a failed claim; before, guess from
                # how far ahead of the clock claims have found it lately.
                lately = self._backlog.mean or 0.0
                extend = self._tat_seen >= soonest or (assume_backlog and lately > soonest - now)
                if extend:
                    start = max(soonest, _down(self._tat_seen))
                    if assume_backlog:
                        # Others have likely claimed since we looked, as much as lately: size
                        # for that, on the condition that it is so.
                        start = max(start, _down(now + self._backlog.low()))
                    ready, away = self._ready(now)
                    count = self._fill(ready, away, start, interval)
                else:
                    # Past the end seen by a grain, whatever digits it was read back with.
                    soonest = max(soonest, _up(self._tat_seen) + 1 / _GRAIN)
                    start, count = self._restart_at(now, soonest, interval)
                span = _up(count * interval)
                values = {
                    ":start": _n(start),
                    ":now": _n(_down(now)),
                    ":limit": _n(self._limit),
                    ":margin_at": _n(max(0.0, self._margin.since)),
                }
            if extend:
                # The schedule runs ahead of the clock: append to it, whatever its end is.
                update, condition = "SET #tat = #tat + :span", "#tat >= :start"
                values[":span"] = _n(span)
            else:
                update = "SET #tat = :end"
                condition = "(attribute_not_exists(#tat) OR #tat <= :start)"
                values[":end"] = _n(round(start + span, 5))
            sent = self._clock()
            try:
                item = self._update(
                    TableName=self.table,
                    Key=self._key,
                    UpdateExpression=update,
                    ConditionExpression=f"{condition} AND {_SEEN_ALL}",
                    ExpressionAttributeNames=_CLAIM_NAMES,
                    ExpressionAttributeValues=values,
                    ReturnValues="ALL_NEW",
                    ReturnValuesOnConditionCheckFailure="ALL_OLD",
                )["Attributes"]
            except self._ddb.exceptions.ConditionalCheckFailedException as failed:
                # The item says otherwise (where the schedule ends, a pause, a lower limit, a
                # wider margin): learn it and size again for what it says.
                with self._lock:
                    done = self._clock()
                    self._round_trip.add(done - sent)
                    self._learn(failed.response.get("Item", {}), done)
                    if extend and self._tat_seen < start:
                        self._backlog = _Estimate(max(0.0, self._tat_seen - done))
                    self.slots["refused"] += 1
                assume_backlog = False
                continue
            with self._lock:
                done = self._clock()
                self._round_trip.add(done - sent)
                self._learn(item, done)
                first = float(item["tat"]["N"]) - span if extend else start
                self._backlog.add(max(0.0, first - sent))
                self._held.extend(first + i * span / count for i in range(count))
                self._tail = (float(item["tat"]["N"]), first)
                self.slots["claimed"] += count
                self.slots["claims"] += 1
            return

    def _void(self) -> None:
        """Drop every slot held: spaced for a higher limit or a narrower margin than now
        holds. The caller holds the lock."""
        self._held.clear()
        self._tail = None
        self._voids += 1

    def _learn(self, item: dict[str, Any], now: float) -> None:
        """Take in the shared item as read; the caller holds the lock."""
        tat = _number(item, "tat")
        self._tat_seen = 0.0 if tat is None else tat
        if self._tail is not None and self._tat_seen != self._tail[0]:
            self._tail = None  # someone has claimed behind this invocation's last claim
        self._paused_until = max(self._paused_until, _number(item, "paused_until") or 0.0)
        limit = self.calls
        shared = _number(item, "vendor_limit")
        if shared is not None and (_number(item, "limit_expires") or 0.0) >= now:
            limit = min(limit, int(shared))
        if limit < self._limit:
            self._void()  # spaced for a higher limit than the vendor's
        self._limit = limit
        wide, since = _number(item, "margin"), _number(item, "margin_at")
        if wide is not None and since is not None and since > self._margin.since:
            self._margin.adopt(wide, since)
            self._void()  # spaced with a margin that drew a 429

    def send_by(self) -> float | None:
        """The latest time (time.perf_counter) the request of this thread's slot may start
        being written: LATE after the slot. A thread held between its slot and its write
        (its sandbox out of CPU share) would otherwise leave late, and a late call can only
        be made room for while the schedule is not yet booked past its window (`arrived`):
        a call found late before a byte is written is not sent (`missed`)."""
        handed = getattr(self._handed, "call", None)
        if handed is None:
            return None
        slot: float = handed[0]
        return time.perf_counter() + (slot + self._late - self._clock())

    def missed(self, stamp: float) -> None:
        me = threading.get_ident()
        with self._lock:
            handed = getattr(self._handed, "call", None)
            if handed is None or handed[0] != stamp:
                return
            self._handed.call = None
            # Not a call: no time away to learn from, and the slot is lost, not used.
            self._away.pop(me, None)
            self.slots["used"] -= 1
            self.slots["not sent"] += 1

    def arrived(self, stamp: float, at: float, sent_after: float | None = None) -> None:
        """A call that left later than LATE after its slot: make room for it a window on.

        Slots are spaced so that any L + 1 of them span W + margin + LATE: calls that leave
        up to LATE late still arrive spread over more than W, with the margin left for the
        network. A call that leaves more than LATE after its slot (its thread lost the CPU
        between taking the slot and writing the request: a Lambda sandbox out of its CPU
        share is held for the rest of the scheduler's period, tens of ms) can be closer than
        that to the L-th call after it. So as many slots as the excess spans are left unused
        among those L: this invocation's own held slots within them first (no request), else
        the schedule's end is pushed on by the rest (one UpdateItem, on the condition that
        the schedule does not yet reach past the window; on one that has fallen behind the
        clock, the idle time already covers any gap that would not show). Room made, or
        being made, for one late call counts for the next (the threads of one held sandbox
        come back late together).

        What it cannot do: make room when the schedule is already booked past the window
        (W shorter than the call's round trip plus the schedule booked ahead): counted as
        "no room"; the margin's widening after a 429 remains for that. `at` is not used: it
        bounds the vendor's latency as much as the send, and would make room after every
        slow answer.
        """
        if sent_after is None:
            return
        handed = getattr(self._handed, "call", None)
        self._handed.call = None
        # How late the slot was handed out is known for the thread's own call (always, from
        # the vendor client); otherwise only the send is counted.
        late = (handed[1] if handed is not None and handed[0] == stamp else 0.0) + sent_after
        if late <= self._late:
            return
        with self._lock:
            self.slots["late"] += 1
            interval = self._interval(self._clock())
            end = stamp + self._limit * interval  # the L-th slot after the late call's
            self._room = [at_slot for at_slot in self._room if at_slot > stamp]
            need = math.ceil((late - self._late) / interval - 1e-9)
            need -= sum(1 for at_slot in self._room if at_slot <= end)
            if need <= 0:
                return
            inside = [slot for slot in self._held if stamp < slot <= end]
            dropped = set(inside[len(inside) - min(need, len(inside)) :])
            if dropped:
                self._held = deque(slot for slot in self._held if slot not in dropped)
                self._room.extend(dropped)
                self.slots["made room"] += len(dropped)
                need -= len(dropped)
                if self._tail is not None and max(dropped) >= self._tail[1]:
                    # Giving the claim's tail back would hand the dropped slots out again.
                    self._tail = None
            if need <= 0:
                return
            if self._tat_seen > end:
                self.slots["no room"] += 1  # booked past the window: pushing cannot help
                return
            gap = _up(need * interval)
            # Counted at once, so that a call held with this one does not push again.
            reserved = [max(self._tat_seen, stamp + interval)] * need
            self._room.extend(reserved)
        pushed: float | None = None
        try:
            item = self._update(
                TableName=self.table,
                Key=self._key,
                UpdateExpression="SET #tat = #tat + :gap",
                ConditionExpression="attribute_exists(#tat) AND #tat <= :end",
                ExpressionAttributeNames={"#tat": "tat"},
                ExpressionAttributeValues={":gap": _n(gap), ":end": _n(_down(end))},
                ReturnValues="UPDATED_NEW",
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )["Attributes"]
            pushed = float(item["tat"]["N"])
        except self._ddb.exceptions.ConditionalCheckFailedException as failed:
            # No schedule yet (nothing after the late call to crowd), or one booked past
            # the window already (pushing its end could not help).
            booked = _number(failed.response.get("Item", {}), "tat")
            with self._lock:
                if booked is not None:
                    self._tat_seen = max(self._tat_seen, booked)
                    self.slots["no room"] += 1
        except Exception as exc:
            logger.warning("could not make room after a late call", extra={"error": repr(exc)})
        with self._lock:
            for at_slot in reserved:
                self._room.remove(at_slot)
            if pushed is not None:
                self._tat_seen = max(self._tat_seen, pushed)
                self._tail = None  # the schedule no longer ends where our last claim left it
                self._room.extend([pushed - gap] * need)
                self.slots["made room"] += need

    def pause(self, seconds: float) -> None:
        """A 429: pause every invocation, and widen the margin (once per pause) for all."""
        self._pause(seconds, widen=True)

    def hold(self, seconds: float) -> None:
        """Pause every invocation; the margin stays."""
        self._pause(seconds, widen=False)

    def _pause(self, seconds: float, *, widen: bool, share: bool = True) -> None:
        now = _down(self._clock())
        until = _up(now + max(0.0, seconds))
        with self._lock:
            self._paused_until = max(self._paused_until, until)
            widened = widen and self._margin.widen(now, seconds)
            if widened:
                self._void()
            else:
                self._held = deque(slot for slot in self._held if slot >= until)
            margin, since = self._margin.wide, self._margin.since
        if share:
            try:
                self._update(
                    TableName=self.table,
                    Key=self._key,
                    UpdateExpression="SET #pause = :p",
                    ConditionExpression="attribute_not_exists(#pause) OR #pause < :p",
                    ExpressionAttributeNames={"#pause": "paused_until"},
                    ExpressionAttributeValues={":p": _n(until)},
                )
            except self._ddb.exceptions.ConditionalCheckFailedException:
                pass  # someone paused longer already
        if widened:
            self._share_margin(margin, since, seconds)

    def _share_margin(self, margin: float, since: float, seconds: float) -> None:
        try:
            self._update(
                TableName=self.table,
                Key=self._key,
                UpdateExpression="SET #margin = :m, #margin_at = :at",
                # Another invocation's widening for the same overflow counts for this one.
                ConditionExpression="attribute_not_exists(#margin_at) OR #margin_at < :recent",
                ExpressionAttributeNames={"#margin": "margin", "#margin_at": "margin_at"},
                ExpressionAttributeValues={
                    ":m": _n(margin),
                    ":at": _n(since),
                    ":recent": _n(_down(since - max(self.period, seconds))),
                },
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except self._ddb.exceptions.ConditionalCheckFailedException as failed:
            # Another invocation widened it for the same overflow: one margin for all, the
            # wider of the two.
            item = failed.response.get("Item", {})
            theirs, at = _number(item, "margin"), _number(item, "margin_at")
            if theirs is not None and at is not None:
                with self._lock:
                    now = self._clock()
                    if self._margin.value(theirs, at, now) >= self._margin.at(now):
                        self._margin.adopt(theirs, at, seconds)

    def winding_down(self, yes: bool) -> None:
        """From now on claim only for the threads waiting, not for those expected back: a
        drain past its deadline takes messages only for the slots it holds (`held`), so its
        threads will not come back for more."""
        with self._lock:
            self._winding_down = yes

    def give_back(self, keep: int) -> int:
        """Return the slots held beyond `keep` to the shared schedule, if they are its tail.

        A claim is sized for threads expected back; when the drain's queue runs dry they do
        not come, and the rest of the claim (up to half a second of the limit) was lost to
        every invocation. Only the end of the schedule can be handed back: one conditional
        write moves it back to the first slot given up, on the condition that it still ends
        where this invocation's last claim left it (nobody has claimed behind). One attempt
        per claim; on failure the slots stay held. How many were given back.
        """
        with self._lock:
            if self._claiming or self._tail is None:
                return 0
            end, first = self._tail
            self._tail = None
            self._drop_stale(self._clock())
            # Only the last claim's slots are the schedule's tail.
            ours = sum(1 for slot in self._held if slot >= first)
            count = min(len(self._held) - max(0, keep), ours)
            if count <= 0:
                return 0
            returned = [self._held.pop() for _ in range(count)][::-1]
            new_end = _up(returned[0])
            voids = self._voids
            self._claiming = True  # no claim of this invocation meanwhile
        try:
            try:
                self._update(
                    TableName=self.table,
                    Key=self._key,
                    UpdateExpression="SET #tat = :end",
                    ConditionExpression="#tat = :mine",
                    ExpressionAttributeNames={"#tat": "tat"},
                    ExpressionAttributeValues={":end": _n(new_end), ":mine": _n(end)},
                    ReturnValuesOnConditionCheckFailure="ALL_OLD",
                )
            except self._ddb.exceptions.ConditionalCheckFailedException as failed:
                with self._lock:
                    if self._voids == voids:
                        # Still this invocation's (someone claimed behind them), unless what
                        # the item says voids them.
                        self._held.extend(returned)
                    self._learn(failed.response.get("Item", {}), self._clock())
                return 0
            except Exception as exc:
                # Whether it was applied is unknown: the slots are dropped (used by nobody,
                # as if kept and not used), never used twice.
                logger.warning("could not give budget slots back", extra={"error": repr(exc)})
                return 0
            with self._lock:
                self._tat_seen = new_end
                self.slots["given back"] += count
            return count
        finally:
            with self._lock:
                self._claiming = False

    def held(self) -> int:
        with self._lock:
            usable = self._usable_from(self._clock())
            return sum(1 for slot in self._held if slot >= usable)

    def paused_for(self) -> float:
        """This invocation's pauses and the shared ones learned at its last claim."""
        return max(0.0, self._paused_until - self._clock())

    def observe(self, limit: int | None, remaining: int | None, reset: float | None) -> None:
        if limit is not None and 0 < limit < self.calls:
            now = self._clock()
            with self._lock:
                self.calls = limit
                if limit < self._limit:
                    self._limit = limit
                    self._void()
            try:
                self._update(
                    TableName=self.table,
                    Key=self._key,
                    UpdateExpression="SET #limit = :l, #limit_expires = :x",
                    ConditionExpression="attribute_not_exists(#limit) OR #limit > :l"
                    " OR #limit_expires < :now",
                    ExpressionAttributeNames={
                        "#limit": "vendor_limit",
                        "#limit_expires": "limit_expires",
                    },
                    ExpressionAttributeValues={
                        ":l": _n(limit),
                        ":x": _n(_down(now + LEARNED_LIMIT_SECONDS)),
                        ":now": _n(_down(now)),
                    },
                )
            except self._ddb.exceptions.ConditionalCheckFailedException:
                pass  # a limit as low or lower is in force
        if remaining == 0 and reset is not None and reset > 0:
            # Not a 429, so the margin stays; only a wait longer than our own pace makes
            # (someone else on the token) is worth a write for every invocation.
            self._pause(reset, widen=False, share=reset >= self.period * SHARED_RESET_FRACTION)
