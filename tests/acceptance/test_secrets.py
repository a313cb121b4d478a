"""No credential reaches any output: every form each technology accepts, every command.

Each case configures all three stores with one credential form, on a port where nothing
listens (so errors, which name where a store is, are part of what is checked), then
runs the commands a user or a log collector sees and greps stdout and stderr.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from tests.acceptance.conftest import clean_env, run_omniq

SECRET = "s3cr3tPW" + uuid.uuid4().hex[:6]
# A NATS user seed and JWT of the shapes nsc writes (not real keys).
SEED = "SUA" + "K" * 53
JWT = "eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.eyJqdGkiOiJ" + SECRET + "In0.c2lnbmF0dXJl"
CREDS = f"""-----BEGIN NATS USER JWT-----
{JWT}
------END NATS USER JWT------

-----BEGIN USER NKEY SEED-----
{SEED}
------END USER NKEY SEED------
"""
DOWN = "127.0.0.1:1"  # nothing listens: connection refused at once


def stores(kind: str, **settings: object) -> str:
    """YAML giving all three stores the same settings."""
    body = json.dumps({"type": kind, **settings})
    return "\n".join(f"{role}: {body}" for role in ("task_queue", "result_storage",
                                                      "event_storage"))


FORMS = {
    "nats-token-in-url": stores("nats", url=f"nats://{SECRET}@{DOWN}"),
    "nats-user-password-in-url": stores("nats", url=f"nats://app:{SECRET}@{DOWN}"),
    "nats-servers-list": stores("nats", servers=[f"nats://{SECRET}@{DOWN}"]),
    "nats-password-key": stores("nats", url=f"nats://{DOWN}", username="app", password=SECRET),
    "nats-token-option": stores("nats", url=f"nats://{DOWN}", options={"token": SECRET}),
    "nats-creds-file": stores("nats", url=f"nats://{DOWN}",
                              options={"user_credentials": "CREDS_PATH"}),
    "nats-nkey-seed": stores("nats", url=f"nats://{DOWN}", options={"nkeys_seed_str": SEED}),
    "redis-password-in-url": stores("redis", url=f"redis://:{SECRET}@{DOWN}/0"),
    "redis-user-password-in-url": stores("redis", url=f"redis://app:{SECRET}@{DOWN}/0"),
    "redis-password-query": stores("redis", url=f"redis://{DOWN}/0?password={SECRET}"),
    "redis-password-key": stores("redis", host="127.0.0.1", port=1, password=SECRET),
    "postgres-url": stores("postgres", dsn=f"postgresql://app:{SECRET}@{DOWN}/db"),
    "postgres-key-value-dsn": stores(
        "postgres", dsn=f"host=127.0.0.1 port=1 user=app password={SECRET} dbname=db"
    ),
    "postgres-quoted-key-value": stores(
        "postgres", dsn=f"host=127.0.0.1 port=1 user=app password='{SECRET} x' dbname=db"
    ),
    "postgres-password-query": stores(
        "postgres", dsn=f"postgresql://app@{DOWN}/db?password={SECRET}"
    ),
    "postgres-password-key": stores(
        "postgres", dsn=f"postgresql://app@{DOWN}/db", password=SECRET
    ),
}

SOME_ID = "01a23000-0000-7000-8000-000000000000"
COMMANDS = [
    ("config", "show"),
    ("config", "show", "--json"),
    ("config", "check"),
    ("-v", "config", "check"),
    ("enqueue", "omniq.examples:add", "1", "2"),
    ("-v", "enqueue", "omniq.examples:add", "1", "2"),
    ("result", SOME_ID),
    ("events", SOME_ID),
    ("status", "--json"),
    ("worker", "--burst"),
    ("-v", "worker", "--burst", "--log-format", "json"),
    ("worker", "--systemd-unit"),
]


@pytest.mark.parametrize("form", sorted(FORMS))
def test_no_output_holds_a_credential(form: str, tmp_path: Path) -> None:
    creds = tmp_path / "user.creds"
    creds.write_text(CREDS)
    config = tmp_path / "omniq.yaml"
    config.write_text(FORMS[form].replace("CREDS_PATH", str(creds)) + "\n")
    env = clean_env(tmp_path / "home", OMNIQ_CONFIG=str(config), OMNIQ_LOG_LEVEL="DEBUG")
    leaks = []
    for args in COMMANDS:
        code, out, err = run_omniq(list(args), env, timeout=60)
        for secret in (SECRET, SEED, JWT):
            if secret in out or secret in err:
                leaks.append(f"omniq {' '.join(args)} (exit {code}) printed it:\n{out}{err}")
    assert not leaks, "\n\n".join(leaks)
