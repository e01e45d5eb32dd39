"""Ray: connecting, and the one bounded work loop every stage drives its tasks and actors with.

:func:`run_bounded` keeps at most ``window`` items in flight (so memory stays bounded whatever
the number of items), hands each item to whichever actor of a pool has the fewest items in
flight (a slow or restarting actor never holds up a fixed share), retries an item whose
attempt failed with a retryable error, and reports every result through ``on_result`` as it
arrives (or in item order with ``ordered=True``).
"""
from __future__ import annotations

import heapq
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Sequence, TypeVar

Item = TypeVar("Item")


def connect(address: str | None = None, **local_kwargs):
    """Join ``address`` (or RAY_ADDRESS); with neither, start a local Ray.

    Returns the ray module. Calling it twice in one process is harmless.
    """
    import ray

    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = {"ignore_reinit_error": True, "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(include_dashboard=False, **kwargs, **local_kwargs)
    return ray


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1))


def is_infrastructure(exc: BaseException) -> bool:
    """A failure of the machinery, not of the work: a lost worker, node or object, or a storage
    error that may pass (pipeline.storage.is_transient). Worth another attempt."""
    import ray

    system = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError,
              ray.exceptions.OwnerDiedError, ray.exceptions.NodeDiedError, ray.exceptions.RaySystemError)
    if isinstance(exc, system):
        return True
    from pipeline.storage import is_transient

    return is_transient(exc)


class CachedValue:
    """A value recomputed at most every ``ttl_s`` seconds (cluster size, asked of Ray's GCS)."""

    def __init__(self, compute: Callable[[], Any], ttl_s: float = 1.0):
        self.compute, self.ttl_s = compute, ttl_s
        self.value, self.at = None, 0.0

    def __call__(self) -> Any:
        if time.time() - self.at > self.ttl_s:
            self.value, self.at = self.compute(), time.time()
        return self.value


@dataclass
class RetryPolicy:
    """Which failed attempts of an item are tried again, how often, and how long to wait between."""

    #: attempts in all (1 = no retry)
    max_attempts: int = 1
    #: exception types worth another attempt (a lost worker, a transient storage error)
    retry_on: tuple[type[BaseException], ...] = ()
    #: or a predicate saying so (e.g. is_infrastructure)
    retry_if: Callable[[BaseException], bool] | None = None
    #: first wait; doubles with every attempt, capped at ``max_backoff_s``
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0

    def wait_before(self, attempt: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** max(0, attempt - 2))


@dataclass
class _Slot(Generic[Item]):
    index: int
    item: Item
    attempt: int
    actor: int | None


@dataclass
class LoopStats:
    done: int = 0
    failed: int = 0
    retried: int = 0
    failures: list[tuple[Any, BaseException]] = field(default_factory=list)
    #: attempts made per item index (1 = first try succeeded or failed for good)
    attempts: dict[int, int] = field(default_factory=dict)


def run_bounded(
    items: Sequence[Item],
    submit: Callable[[Item, Any], Any],
    on_result: Callable[[Item, Any], None],
    *,
    window: int | Callable[[], int],
    actors: Sequence[Any] | None = None,
    ordered: bool = False,
    retry: RetryPolicy | None = None,
    on_failure: Callable[[Item, BaseException], None] | None = None,
    poll_s: float = 1.0,
) -> LoopStats:
    """Run ``submit(item, actor)`` (which returns an ObjectRef) for every item, at most ``window`` at once.

    * ``window`` may be a callable: it is asked again whenever a slot frees, so the window
      follows a cluster that grows or shrinks.
    * With ``actors``, each item goes to the actor with the fewest items in flight (``actor``
      is None without a pool).
    * A failed attempt whose exception is one of ``retry.retry_on`` (or passes ``retry.retry_if``)
      is submitted again, after a backoff, up to ``retry.max_attempts``; other failures, and
      retryable ones that ran out of attempts, go to ``on_failure(item, exc)`` when given (the
      loop goes on; it may raise to stop the loop) or are raised.
    * ``on_result(item, result)`` runs in the driver as results arrive, or in item order when
      ``ordered``; an exception it raises stops the loop.
    * When the loop stops early, the work still in flight is cancelled.
    """
    loop = _BoundedLoop(items, submit, on_result, window, actors or [], ordered, retry or RetryPolicy(),
                        on_failure, poll_s)
    try:
        loop.run()
    finally:
        loop.cancel_in_flight()
    return loop.stats


class _BoundedLoop:
    def __init__(self, items, submit, on_result, window, actors, ordered, retry, on_failure, poll_s):
        self.submit, self.on_result, self.window, self.actors = submit, on_result, window, actors
        self.ordered, self.retry, self.on_failure, self.poll_s = ordered, retry, on_failure, poll_s
        self.stats = LoopStats()
        self.fresh = deque(_Slot(i, it, 1, None) for i, it in enumerate(items))
        self.retries: list[tuple[float, int, _Slot]] = []  # heap by the time the retry may start
        self.running: dict[Any, _Slot] = {}
        self.load = [0] * len(actors)
        self.buffered: dict[int, tuple[Any, Any] | None] = {}
        self.next_index = 0

    def limit(self) -> int:
        return max(1, int(self.window() if callable(self.window) else self.window))

    def release(self, index: int, entry: tuple[Any, Any] | None) -> None:
        """Hand results on; in ordered mode, as soon as every earlier item is settled."""
        if not self.ordered:
            if entry is not None:
                self.on_result(*entry)
            return
        self.buffered[index] = entry
        while self.next_index in self.buffered:
            settled = self.buffered.pop(self.next_index)
            self.next_index += 1
            if settled is not None:
                self.on_result(*settled)

    def next_slot(self) -> _Slot | None:
        if self.retries and self.retries[0][0] <= time.time():
            return heapq.heappop(self.retries)[2]
        return self.fresh.popleft() if self.fresh else None

    def fill(self) -> None:
        while len(self.running) < self.limit():
            slot = self.next_slot()
            if slot is None:
                return
            actor = None
            if self.actors:
                slot.actor = min(range(len(self.actors)), key=lambda a: (self.load[a], a))
                self.load[slot.actor] += 1
                actor = self.actors[slot.actor]
            self.running[self.submit(slot.item, actor)] = slot

    def settle(self, ref: Any) -> None:
        import ray

        slot = self.running.pop(ref)
        self.stats.attempts[slot.index] = slot.attempt
        if slot.actor is not None:
            self.load[slot.actor] -= 1
        try:
            result = ray.get(ref)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - sorted into retry / failure below
            retry = self.retry
            retryable = isinstance(exc, retry.retry_on) or (retry.retry_if is not None and retry.retry_if(exc))
            if retryable and slot.attempt < retry.max_attempts:
                self.stats.retried += 1
                again = _Slot(slot.index, slot.item, slot.attempt + 1, None)
                heapq.heappush(self.retries, (time.time() + retry.wait_before(again.attempt), slot.index, again))
                return
            self.stats.failed += 1
            self.stats.failures.append((slot.item, exc))
            if self.on_failure is None:
                raise
            self.on_failure(slot.item, exc)
            self.release(slot.index, None)
            return
        self.stats.done += 1
        self.release(slot.index, (slot.item, result))

    def run(self) -> None:
        import ray

        while self.fresh or self.retries or self.running:
            self.fill()
            if not self.running:
                time.sleep(max(0.0, self.retries[0][0] - time.time()))
                continue
            done, _ = ray.wait(list(self.running), num_returns=1, timeout=self.poll_s)
            for ref in done:
                self.settle(ref)

    def cancel_in_flight(self) -> None:
        import ray

        for ref in list(self.running):
            try:
                ray.cancel(ref)
            except Exception:  # noqa: BLE001 - already finished, or an actor task that cannot be cancelled
                pass
        self.running.clear()


def task_error_message(exc: BaseException) -> str:
    """The last meaningful line of a (Ray-wrapped) exception: what to show a user."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:500]
