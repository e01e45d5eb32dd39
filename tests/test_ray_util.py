"""The one bounded work loop: window, dynamic dispatch to the least busy actor, retries, order."""
from __future__ import annotations

import time

import pytest

from pipeline.ray_util import RetryPolicy, run_bounded


@pytest.fixture(scope="module")
def remote(ray_local):
    ray = ray_local

    @ray.remote
    class Gauge:
        """Counts concurrent work and attempts per item."""

        def __init__(self):
            self.now, self.peak, self.attempts = 0, 0, {}

        def enter(self, item):
            self.now += 1
            self.peak = max(self.peak, self.now)
            self.attempts[item] = self.attempts.get(item, 0) + 1
            return self.attempts[item]

        def leave(self):
            self.now -= 1

        def stats(self):
            return self.peak, dict(self.attempts)

    @ray.remote(num_cpus=0)
    def work(item, gauge, fail_first=(), always_fail=()):
        attempt = ray.get(gauge.enter.remote(item))
        try:
            time.sleep(0.05)
            if item in always_fail:
                raise ValueError(f"bad item {item}")
            if item in fail_first and attempt == 1:
                raise OSError(f"transient failure of {item}")
            return item * 10
        finally:
            ray.get(gauge.leave.remote())

    @ray.remote(num_cpus=0)
    class Worker:
        def __init__(self, delay):
            self.delay, self.done = delay, []

        def run(self, item):
            time.sleep(self.delay)
            self.done.append(item)
            return item

        def count(self):
            return len(self.done)

    return ray, Gauge, work, Worker


def test_window_bounds_the_work_in_flight_and_results_arrive(remote):
    ray, Gauge, work, _ = remote
    gauge = Gauge.remote()
    got = {}
    stats = run_bounded(list(range(12)), lambda i, _a: work.remote(i, gauge), lambda i, r: got.__setitem__(i, r),
                        window=3)
    peak, _ = ray.get(gauge.stats.remote())
    assert got == {i: i * 10 for i in range(12)} and stats.done == 12
    assert 1 < peak <= 3


def test_ordered_delivery_and_a_window_that_grows(remote):
    ray, Gauge, work, _ = remote
    gauge = Gauge.remote()
    order = []
    run_bounded(list(range(10)), lambda i, _a: work.remote(i, gauge), lambda i, r: order.append(i),
                window=lambda: 1 if len(order) < 4 else 4, ordered=True)
    assert order == list(range(10))
    peak, _ = ray.get(gauge.stats.remote())
    assert peak > 1  # the window followed the callable once it grew


def test_retryable_failures_are_retried_and_others_reported(remote):
    ray, Gauge, work, _ = remote
    gauge = Gauge.remote()
    got, failed = {}, {}
    stats = run_bounded(list(range(6)), lambda i, _a: work.remote(i, gauge, (1, 4), (5,)),
                        lambda i, r: got.__setitem__(i, r), window=2,
                        retry=RetryPolicy(max_attempts=3, retry_on=(OSError,), backoff_s=0.01),
                        on_failure=lambda i, e: failed.__setitem__(i, str(e)))
    _, attempts = ray.get(gauge.stats.remote())
    assert got == {0: 0, 1: 10, 2: 20, 3: 30, 4: 40}
    assert attempts[1] == attempts[4] == 2 and attempts[5] == 1  # a ValueError is not retried
    assert list(failed) == [5] and "bad item 5" in failed[5] and stats.retried == 2 and stats.failed == 1
    with pytest.raises(ValueError, match="bad item 5"):  # without on_failure the loop raises
        run_bounded([5], lambda i, _a: work.remote(i, gauge, (), (5,)), lambda i, r: None, window=1)


def test_items_go_to_the_least_busy_actor(remote):
    ray, _, _, Worker = remote
    slow, fast = Worker.remote(0.6), Worker.remote(0.02)
    run_bounded(list(range(20)), lambda i, actor: actor.run.remote(i), lambda i, r: None, window=2,
                actors=[slow, fast])
    n_slow, n_fast = ray.get([slow.count.remote(), fast.count.remote()])
    assert n_slow + n_fast == 20 and n_fast >= 3 * n_slow  # round-robin would give 10 and 10
