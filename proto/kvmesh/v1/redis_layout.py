"""The Redis key layout of discovery backend "redis", version 1 (hand-written, not generated).

Workers write, routers read; both import this module so the layout has one
definition, like the protos beside it. ``prefix`` (default ``kvmesh``)
separates clusters sharing one Redis.

=====================================  ======  ==============================================
key                                    type    content
=====================================  ======  ==============================================
``{prefix}:workers``                   SET     ids of registered workers (join: SADD, leave: SREM)
``{prefix}:worker:{worker_id}``        STRING  ``kvmesh.v1.WorkerRecord`` bytes, rewritten every
                                               heartbeat with a TTL of ``missed x interval``:
                                               the key vanishing is a missed-heartbeat failure
``{prefix}:kv:{worker_id}:{epoch}``    STREAM  one entry per ``kvmesh.v1.KvEventBatch`` (field
                                               ``b``), entry id ``{last event id}-0``, trimmed
                                               to the worker's event buffer; expires with the
                                               worker key's TTL when its writer stops
=====================================  ======  ==============================================

A worker that leaves cleanly deletes its worker key and SREMs its id; one
whose key expired while its id is still in the set died (routers fail its
streams and any router may SREM it). Entry ids carry the event ids, so a
router that knows the last event it applied (``L``) resumes with
``XREAD ... {L}-0`` and gets exactly the batches holding events after ``L``.
"""

from __future__ import annotations

DEFAULT_PREFIX = "kvmesh"
BATCH_FIELD = b"b"
"""The stream entry field holding one serialized ``KvEventBatch``."""


def workers_key(prefix: str) -> str:
    return f"{prefix}:workers"


def worker_key(prefix: str, worker_id: str) -> str:
    return f"{prefix}:worker:{worker_id}"


def kv_stream_key(prefix: str, worker_id: str, epoch: str) -> str:
    return f"{prefix}:kv:{worker_id}:{epoch}"


def entry_id(last_event_id: int) -> str:
    """The stream entry id of a batch whose last event is ``last_event_id``."""
    return f"{last_event_id}-0"


def last_event_id_of(entry: bytes | str) -> int:
    """Inverse of ``entry_id``."""
    text = entry.decode() if isinstance(entry, bytes) else entry
    return int(text.split("-", 1)[0])
