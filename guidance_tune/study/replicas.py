"""A data-parallel trial (``study.resources.workers`` > 1): its replicas live in the trial's own
placement group.

Tune reserves one bundle per worker (``study.resources.cpus``/``gpus`` each, placed as
``study.resources.placement`` says). The trial's process is replica 0, in bundle 0: it builds
and fits the run as a one-process trial does, and alone logs to MLflow and reports to Tune. Each
other bundle gets a :class:`Replica` actor that joins the trial's torch.distributed group (gloo
on CPU, NCCL on CUDA) at replica 0's node, builds the same run (from the same checkpoint on a
retry) and trains in step, reporting nothing.

The replicas are the trial's: when it ends, however it ends (finished, stopped by ASHA inside
``tune.report``, failed), they are killed before its process is reused or exits, and their
bundles go back with the placement group Tune made for the trial, so a stopped trial leaves
nothing behind for the next to wait on. A replica that dies (its node lost) breaks replica 0's
next collective, so the trial fails and Tune retries it, all replicas together, from its last
checkpoint. A node that vanishes without closing its connections (powered off, cut off the
network) breaks nothing: replica 0 would wait in its collective for the group's timeout (30
minutes). Ray declares such a node dead by its health checks (tens of seconds by default), and
with it the replicas there; the trial's watch (:class:`_Watch`) then ends the trial's process,
and Tune retries it the same way.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import ray
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from guidance_tune.config import RunConfig
from guidance_tune.study.config import ResourcesConfig
from guidance_tune.study.quiet import quiet_trial_process
from guidance_tune.training.checkpoint import Checkpoint
from guidance_tune.training.loop import fit_replica, resolve_device
from guidance_tune.training.parallel import (
    backend_for,
    join_group,
    leave_group,
    rendezvous,
    run_replica,
)

JOIN_SECONDS = 60.0  # for the other replicas to report the end of a trial that ended normally
WATCH_SECONDS = 2.0  # how often a trial looks for a replica that Ray has lost with its node
LEAVE_SECONDS = 10.0  # for the trial to fail by itself once a replica is lost, before it is ended


@ray.remote
class Replica:
    """Replica ``rank`` of a trial, in one bundle of the trial's placement group."""

    def where(self) -> str:
        """``pid@node_id``: where this replica runs."""
        return f"{os.getpid()}@{ray.get_runtime_context().get_node_id()}"

    def train(self, rank: int, count: int, address: str, config: RunConfig, checkpoint) -> None:
        quiet_trial_process()
        backend = backend_for(resolve_device(config.train.device))
        run_replica(rank, count, address, backend, fit_replica, (config, checkpoint))


class _Watch(threading.Thread):
    """Ends the trial's process when Ray has lost one of its replicas (``ActorDiedError``: its
    node died, or its process did) and the trial has not ended by itself within
    ``LEAVE_SECONDS``: it is waiting in a collective that nothing will end. A replica's own
    error is left to the trial, whose collectives fail with it and say why."""

    def __init__(self, done: list) -> None:
        super().__init__(name="guidance-tune-replica-watch", daemon=True)
        self.done, self.ended = done, threading.Event()

    def run(self) -> None:
        pending = list(self.done)
        while pending and not self.ended.is_set():
            ready, pending = ray.wait(pending, num_returns=1, timeout=WATCH_SECONDS)
            for task in ready:
                try:
                    ray.get(task)
                except ray.exceptions.ActorDiedError as error:
                    if not self.ended.wait(LEAVE_SECONDS):
                        print(
                            f"guidance-tune: a data-parallel replica of this trial is lost "
                            f"({error.__class__.__name__}: {str(error).splitlines()[0]}); ending "
                            "the trial's process so that Tune retries it from its checkpoint",
                            file=sys.stderr,
                            flush=True,
                        )
                        os._exit(1)
                    return
                except Exception:  # the replica's own error: the trial fails with it
                    pass


def placement_bundles(resources: ResourcesConfig) -> list[dict[str, float]]:
    """One bundle per worker: the first is the trial's own process."""
    bundle = {"CPU": resources.cpus, **({"GPU": resources.gpus} if resources.gpus else {})}
    return [dict(bundle) for _ in range(resources.workers)]


@contextmanager
def trial_replicas(
    config: RunConfig, checkpoint: Checkpoint | None, resources: ResourcesConfig
) -> Iterator[list[str]]:
    """Inside the block this process is replica 0 of ``config.train.workers``, the others
    running in the trial's other bundles, where the block is given (``pid@node_id`` each);
    nothing happens with 1 worker (an empty list)."""
    count = config.train.workers
    if count == 1:
        yield []
        return
    group = get_current_placement_group()
    address = rendezvous(ray.util.get_node_ip_address())  # replica 0's node
    others = [
        Replica.options(
            num_cpus=resources.cpus,
            num_gpus=resources.gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=rank
            ),
        ).remote()
        for rank in range(1, count)
    ]
    places = [replica.where.remote() for replica in others]  # an actor runs its calls in order
    shared = ray.put(checkpoint)
    done = [
        replica.train.remote(rank, count, address, config, shared)
        for rank, replica in enumerate(others, start=1)
    ]
    watch = _Watch(done)
    watch.start()
    try:
        join_group(0, count, address, backend_for(resolve_device(config.train.device)))
        try:
            yield ray.get(places)
        except BaseException:
            leave_group(finished=False)
            raise
        together = leave_group(finished=True)
        ray.get(done, timeout=JOIN_SECONDS)  # the run ended well here: a replica's error is its too
        if not together:
            raise RuntimeError("a data-parallel replica left the trial before its end")
    finally:
        watch.ended.set()  # before the kills, which it would take for losses
        for replica in others:
            ray.kill(replica)
