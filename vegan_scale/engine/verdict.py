"""What every rank does with the flags the agreement raised: stop on a request, or end the run on an error.

Each check, every rank adds its own stop request to the flags it raised (a loss gone non-finite, a loader failure,
data that stopped coming), and all ranks agree on the union (:class:`vegan_scale.distributed.agreement.Agreement`).
Every rank then takes the same decision from the same flags, so that all raise the same error at the same step.
"""

from __future__ import annotations

import torch
from accelerate.utils import gather_object

from vegan_scale.distributed.agreement import Agreement, Flag
from vegan_scale.engine.feed import DataFeed
from vegan_scale.engine.run import Run
from vegan_scale.errors import DataError, DataStallError, InterruptedRunError, NonFiniteLossError, PreemptedError
from vegan_scale.stops import Stop, StopRequests

NONFINITE_TERMS = {
    Flag.NONFINITE_RECON: "train/recon",
    Flag.NONFINITE_PENALTY: "train/penalty",
    Flag.NONFINITE_CRITIC: "train/critic_loss",
    Flag.NONFINITE_PARAMS: "the parameters",  # checked before each checkpoint, not per step (no key in the terms)
}
STOPS = (Flag.INTERRUPT, Flag.PREEMPT)


def agree(run: Run, agreement: Agreement, stops: StopRequests, feed: DataFeed, step: int) -> Flag | None:
    """Collective: add this process's stop request to its flags, agree with every rank, act together on errors;
    returns the stop every rank agreed on, if any (the caller records the step's metrics before it stops)."""
    requested = stops.poll()
    if requested is not None:
        flag = Flag.INTERRUPT if requested == Stop.INTERRUPT else Flag.PREEMPT
        agreement.raise_if(flag, torch.ones((), dtype=torch.bool, device=run.accelerator.device), step)
    run.where.at(step, "agreement check")
    raised = agreement.check()
    run.where.heartbeat()
    _raise_errors(run, raised, feed)
    return next((flag for flag in STOPS if flag in raised), None)


def kept(run: Run) -> str:
    """What a run that stops on an error leaves to resume from, for its message."""
    saved = run.dir.newest_checkpoint()
    return f"the last complete checkpoint, {saved}, is intact" if saved else "no checkpoint was written yet"


def _raise_errors(run: Run, raised: dict[Flag, int], feed: DataFeed) -> None:
    """Collective: every rank calls it at the same step and raises the same error. Data that stopped coming while a
    stop was asked for is that stop, without a checkpoint (the steps since the last one trained on no new data):
    the run ends at once as a stopped one, to be continued, rather than wait out data.stall_timeout_s."""
    if Flag.DATA_ERROR in raised or Flag.DATA_STALL in raised:
        messages = gather_object([f"process {run.accelerator.process_index}: {feed.error}" if feed.error else ""])
        text = "; ".join(m for m in messages if m)
        stop = next((flag for flag in STOPS if flag in raised), None)
        if Flag.DATA_STALL in raised and stop is not None:
            error = InterruptedRunError if stop == Flag.INTERRUPT else PreemptedError
            raise error(f"stopped on a stop request while the data did not come ({text}); {kept(run)}")
        if Flag.DATA_STALL in raised:
            raise DataStallError(f"{text}; {kept(run)}")
        skip = " (data.on_error=skip would skip bad samples)" if run.cfg.data.on_error == "raise" else ""
        raise DataError(f"{text}{skip}")
    nonfinite = {flag: raised[flag] for flag in NONFINITE_TERMS if flag in raised}
    if nonfinite:
        first = min(nonfinite.values())
        terms = ", ".join(NONFINITE_TERMS[f] for f, s in nonfinite.items() if s == first)
        raise NonFiniteLossError(
            f"{terms} became NaN or infinite at step {first}; {kept(run)}. Try a lower optim.lr or "
            "penalty.weight, or train.mixed_precision=no; check values set far from their defaults (prior.scale, "
            "cost.scale, model.init_std, penalty.adversarial.init_std, penalty.sliced.p)"
        )
