"""Header names of the NATS queue's entries and messages, and the task states: task-state
entries carry their identity and state in headers, so scans read them headers-only; task
messages and failure records carry the identity too (no payload decoded to route one)."""

from __future__ import annotations

# On task-state entries (and, the identity ones, on task messages and failure records).
H_STATE = "Omniq-State"
H_QUEUE = "Omniq-Queue"
H_ATTEMPTS = "Omniq-Attempts"
H_READY = "Omniq-Ready"
H_LEASE = "Omniq-Lease"
H_UNIQUE = "Omniq-Unique"
H_UNTIL = "Omniq-Until"
H_ID = "Omniq-Id"
H_PRIORITY = "Omniq-Priority"
H_UNIQUE_TTL = "Omniq-Unique-Ttl"
H_CLAIM = "Omniq-Claim"  # the token of the lease holder that wrote the entry
H_INDEXED = "Omniq-Indexed"  # a dead letter whose failure record was written with it
# On task messages.
H_REV = "Omniq-Rev"
H_ETA = "Omniq-Eta"
# On failure records moved from a store of an older omniq: when the task failed (us).
H_FAILED_AT = "Omniq-Failed-At"

WAITING, RUNNING, FAILED, CANCELLED = "waiting", "running", "failed", "cancelled"
