"""The kickoff: list the first level's entities (the troops) and fan each out as a message
on the first stage's queue."""

from __future__ import annotations

from dataclasses import dataclass

from aws_lambda_powertools import Logger

from pipeline.envelope import Envelope, listed
from pipeline.ledger import Ledger, State
from pipeline.profile import Profile
from pipeline.profile import load as load_profile
from pipeline.queues import RELISTED, Outgoing, Queue
from pipeline.vendor_api.client import VendorClient
from pipeline.window import Window

logger = Logger(service="harvest", child=True)


@dataclass(frozen=True)
class KickoffReport:
    run_id: str
    troops: int
    window_from: str
    window_to: str
    # Drain invocations started with it (Runtime.start_drains), not waiting for the schedule.
    drains_started: int = 0
    # Troops sent on the queue: fewer than listed when a second kickoff of the window finds
    # some already finished, or when a troop's id is rejected.
    sent: int = 0


def kickoff(
    window: Window,
    *,
    client: VendorClient,
    queue: Queue,
    ledger: Ledger,
    profile: Profile | None = None,
) -> KickoffReport:
    """Start (or restart) the run of `window`; rerunning it is harmless, entities count once.

    The entities are the first level of `profile` (the default profile if None).
    """
    profile = profile if profile is not None else load_profile()
    first = profile.levels[0]
    first_stage = first.name
    run_id = window.run_id
    # Whether this window was started before: one read of the run list, not the run's counts.
    started_before = run_id in ledger.runs()
    ledger.start_run(run_id, window.from_text, window.to_text)
    found = listed(
        client.items(profile.root),
        lambda entity_id: Envelope(run_id, first_stage, (entity_id,), window),
        f"{first_stage} (kickoff)",
        first,
    )
    troops = found.children
    ledger.enqueued(
        run_id,
        first_stage,
        [(t.key, t.path) for t in troops] + [(k, path) for k, path, _ in found.rejected],
    )
    if found.rejected:
        # Troops whose id no envelope accepts: recorded dead with the reason, never sent.
        ledger.finish_many(
            run_id, first_stage, [(k, State.DEAD, why) for k, _, why in found.rejected]
        )
        logger.warning("troops rejected", extra={"run_id": run_id, "rejected": len(found.rejected)})
    # A second kickoff of the window (by hand, or a schedule delivered twice) resends only
    # the troops not yet listed: a finished troop's subtree is not harvested again.
    # Those sent again are marked: their subtrees are checked the same way (see the drain).
    finished = ledger.finished(run_id, first_stage, [t.key for t in troops])
    # (A run recorded before: kicked off, or a kickoff that failed after sending.)
    again = RELISTED if started_before else {}
    outgoing = [Outgoing(t.to_json(), again) for t in troops if t.key not in finished]
    queue.send(outgoing)
    ledger.kicked_off(run_id)
    logger.info("run kicked off", extra={"run_id": run_id, "troops": len(troops)})
    return KickoffReport(run_id, len(troops), window.from_text, window.to_text, sent=len(outgoing))
