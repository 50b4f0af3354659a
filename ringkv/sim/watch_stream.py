"""Judging a watch stream and a lease's keys against what was committed (pure).

``check_stream``: what a watcher received (across its reconnects) against
the writes the clients committed. Every write carries a value no other write
has, so a delivered event names the write it reports. The stream must be in
strictly increasing (version, key) order (nothing twice, nothing swapped);
each event must be a write that was acknowledged at that very version, or
one whose outcome the client never learned (it may appear, at most once);
and every acknowledged write in the span the stream covers must be there.

``check_lease_keys``: when a lease's keys were deleted (the versions of the
delete events), against the lease's last renewal: never before its deadline
(commit timestamp of the last renewal + TTL), all at one version, and within
the bound after it (ε + a sweep past the deadline) once its owner stopped renewing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from ringkv.txn.watch import Change

Write = tuple[bytes, bytes]  # (key, value): the value is unique to one write


def check_stream(delivered: Sequence[Change], acked: Mapping[Write, int],
                 unknown: Iterable[Write], *, start_us: int, resolved_us: int) -> list[str]:
    """The problems with ``delivered`` (empty: none). ``acked``: write -> its commit
    version; ``unknown``: writes that may or may not have committed; the stream
    covers versions in (start_us, resolved_us]."""
    problems: list[str] = []
    maybe = set(unknown)
    seen: set[Write] = set()
    last: tuple[int, bytes] | None = None
    for i, change in enumerate(delivered):
        at = (change.version_us, change.key)
        if last is not None and at <= last:
            what = "twice" if at == last else "out of order"
            problems.append(f"event {i} {at} delivered {what} (after {last})")
        last = at if last is None else max(last, at)
        if not start_us < change.version_us <= resolved_us:
            problems.append(f"event {i} {at} outside the watched span ({start_us}, {resolved_us}]")
        if change.value is None:
            problems.append(f"event {i} {at}: a delete nobody committed")
            continue
        write = (change.key, change.value)
        if write in seen:
            problems.append(f"event {i} {at}: write {write!r} delivered again")
            continue
        seen.add(write)
        version = acked.get(write)
        if version is None and write not in maybe:
            problems.append(f"event {i} {at}: write {write!r} was never committed")
        elif version is not None and version != change.version_us:
            problems.append(f"event {i} {at}: write {write!r} committed at {version}")
    for write, version in sorted(acked.items(), key=lambda item: (item[1], item[0])):
        if start_us < version <= resolved_us and write not in seen:
            problems.append(f"acknowledged write {write!r} at {version} never delivered")
    return problems


def check_lease_keys(deletes: Sequence[Change], keys: Iterable[bytes], *,
                     deadline_us: int, bound_s: float | None) -> list[str]:
    """The problems with how ``keys`` went, attached to a lease whose deadline (its
    last renewal's commit version + TTL) is ``deadline_us``: ``deletes`` are the
    events the watcher saw of them. ``bound_s`` None: the owner still renews, so
    nothing may be deleted; else all go at one version, past the deadline by at
    most ``bound_s`` (ε and a sweep)."""
    problems: list[str] = []
    wanted = set(keys)
    gone = [d for d in deletes if d.key in wanted and d.value is None]
    if bound_s is None:
        return [f"{d.key!r} deleted at {d.version_us} while its lease was kept alive"
                for d in gone]
    versions = {d.version_us for d in gone}
    if {d.key for d in gone} != wanted:
        problems.append(f"keys never deleted: {sorted(wanted - {d.key for d in gone})}")
    if len(versions) > 1:
        problems.append(f"the lease's keys went at several versions: {sorted(versions)}")
    for version in sorted(versions):
        if version <= deadline_us:
            problems.append(f"deleted at {version}, before the deadline {deadline_us}")
        elif version > deadline_us + round(bound_s * 1_000_000):
            problems.append(f"deleted at {version}, {(version - deadline_us) / 1e6:.3f} s after "
                            f"the deadline (bound {bound_s} s)")
    return problems
