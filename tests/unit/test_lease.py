"""The run lease and the fencing of state.json on a real S3 server (moto on loopback): conditional
create, takeover and renewal, expiry by the store's clock, a stale driver's writes refused."""

from __future__ import annotations

import json
import os
import time

import pytest

from imm_ray.run import RunDir, layout
from imm_ray.storage import RunLockedError, conditional, exists, resolve
from imm_ray.storage.conditional import CLOCK_RESOLUTION_S, PreconditionFailed
from imm_ray.storage.fs import read_bytes, write_json
from imm_ray.storage.lease import Lease


def test_conditional_put_creates_once_and_replaces_only_the_version_read(s3_bucket):
    loc = resolve(s3_bucket) / "obj"
    first = conditional.put(loc, b"a", None)
    with pytest.raises(PreconditionFailed):
        conditional.put(loc, b"b", None)  # If-None-Match: * on an existing object
    second = conditional.put(loc, b"c", first)
    with pytest.raises(PreconditionFailed):
        conditional.put(loc, b"d", first)  # If-Match on a version that was replaced
    found = conditional.get(loc)
    assert found is not None and (found.data, found.etag) == (b"c", second)
    assert 0 <= found.age_s <= 2 * CLOCK_RESOLUTION_S + 5  # by the store's clock, just written
    assert conditional.get(loc.parent / "absent") is None


def test_lease_refuses_a_second_driver_and_expires_by_the_stores_clock(s3_bucket):
    root = s3_bucket + "/run"
    a = RunDir(root, lease_ttl_s=3.0)
    a.lock()
    time.sleep(4.5)  # longer than the ttl: the heartbeat keeps it alive
    b = RunDir(root, lease_ttl_s=3.0)
    with pytest.raises(RunLockedError, match=f"in use by driver pid {os.getpid()} on .* generation 1"):
        b.lock()
    a._lease._stop.set()  # as if SIGKILLed: no more heartbeats, no release
    a._lease._thread.join()
    time.sleep(3.0 + 2 * CLOCK_RESOLUTION_S + 0.5)
    b.lock()  # the lease expired: taken over
    lease = json.loads(read_bytes(resolve(root) / layout.LEASE))
    assert (lease["holder"], lease["generation"]) == (b._lease.holder, 2)
    b.unlock()
    assert not exists(resolve(root) / layout.LEASE)


def test_of_two_drivers_that_both_saw_no_lease_only_one_takes_it(s3_bucket):
    """The race a read-then-write lease loses: both read "no lease"; the create is conditional."""
    loc = resolve(s3_bucket) / "run" / layout.LEASE
    a, b = Lease(loc, ttl_s=30), Lease(loc, ttl_s=30)
    reads = [None]  # b's first read: before a wrote
    b_read = b.store.read
    b.store.read = lambda: reads.pop() if reads else b_read()
    a.acquire()
    with pytest.raises(RunLockedError, match=f"taken at the same moment by driver pid {os.getpid()} .*{a.holder}"):
        b.acquire()
    assert json.loads(read_bytes(loc))["holder"] == a.holder
    a.release()


def test_a_heartbeat_never_overwrites_a_new_holder(s3_bucket):
    root = s3_bucket + "/run"
    a = RunDir(root, lease_ttl_s=1.5)
    a.lock()
    broken = RunDir(root).force_unlock()
    assert broken and f"pid {os.getpid()}" in broken
    b = RunDir(root, lease_ttl_s=30)
    b.lock()
    a._lease._thread.join(timeout=10)  # a's next renewal is refused: it sees b's lease and gives up
    assert a._lease.lost
    with pytest.raises(RunLockedError, match="lost the lease"):
        a.mark_started("baseline/evaluate")
    a.unlock()
    lease = json.loads(read_bytes(resolve(root) / layout.LEASE))
    assert (lease["holder"], lease["generation"]) == (b._lease.holder, 2)  # a did not delete b's lease
    b.unlock()


def test_a_stale_driver_cannot_overwrite_the_new_ones_state(s3_bucket):
    """Fencing: a driver that has not noticed it lost the lease writes state.json; the store refuses."""
    root = s3_bucket + "/run"
    a = RunDir(root, lease_ttl_s=30)
    a.lock()
    a.mark_done("baseline/evaluate", 1.0, {})
    a._lease._stop.set()  # paused: it never learns that it lost the lease
    a._lease._thread.join()
    RunDir(root).force_unlock()
    b = RunDir(root, lease_ttl_s=30)
    b.lock()
    assert b.state["lease_generation"] == 2 and b.is_done("baseline/evaluate")
    with pytest.raises(RunLockedError, match="changed by another driver"):
        a.mark_started("imm/round-001/generate")
    b.mark_started("imm/round-001/generate")
    state = json.loads(read_bytes(resolve(root) / layout.STATE))
    assert state["lease_generation"] == 2 and state["stages"]["imm/round-001/generate"]["status"] == "started"
    b.unlock()


def test_an_unreadable_lease_is_taken_over_once_expired(s3_bucket):
    loc = resolve(s3_bucket) / "run" / layout.LEASE
    write_json(loc, ["not", "a", "lease"])
    lease = Lease(loc, ttl_s=30)
    lease.acquire()  # no ttl in it: expired at once
    assert json.loads(read_bytes(loc))["holder"] == lease.holder
    lease.release()
