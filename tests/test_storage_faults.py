"""A bucket that fails for a while, through a fault-injecting proxy in front of the emulator
(tests/fault_proxy.py): storage operations (here a metrics.jsonl upload and read through gcsfs)
ride out 429s, resets, a stall and 503s, each met by the upload; Orbax's array writes (tensorstore)
ride out 429s and resets, and array_record's shard reads resets, each met by that client (a stall
and 503s meet the shard reads of a whole run in tests/test_gcs_runs.py). A bucket that stays down
stops the operation within the retry bound with an error naming it and the URI."""
import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

from segguided_jax.io import storage
from tests.fault_proxy import FaultProxy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# In a fresh process (the storage clients read the endpoint when imported): uploads metrics.jsonl
# with two rows, reads it back, prints the seconds it took.
UPLOAD = """
import sys, time
from segguided_jax.io import runlog, storage
storage.set_retry_secs(float(sys.argv[2]))
t0 = time.monotonic()
f = runlog.MetricsFile(sys.argv[1])
f.append({"step": 1, "loss": 0.5})
f.append({"step": 2, "loss": 0.25})
f.flush()
assert [r["step"] for r in runlog.MetricsFile(sys.argv[1]).rows()] == [1, 2]
print(f"took {time.monotonic() - t0:.1f}")
"""

# In a fresh process: saves checkpoint 1 of a small state into the bucket (Orbax writes the arrays
# through tensorstore) and restores it, then reads every case of the train part of a data folder in
# the bucket (array_record's reader); prints a digest of the cases.
CLIENTS = """
import sys
import jax, jax.numpy as jnp, ml_collections
from segguided_jax.training.checkpointing import Checkpointer
from segguided_jax.data.records import CaseSource
from tests.test_storage_faults import digest
state = {"w": jnp.arange(6.0)}
ckpt = Checkpointer(sys.argv[1], ml_collections.ConfigDict({"every_steps": 1, "keep": 1, "async_save": False}))
ckpt.save(1, state, {"iterators": [1]}, {"seed": 0})
restored, data_state, _ = ckpt.restore(1, jax.eval_shape(lambda: state))
ckpt.close()
assert restored["w"].tolist() == list(range(6)) and data_state == {"iterators": [1]}
print("cases", digest(CaseSource(sys.argv[2], "train")))
"""


def digest(source) -> str:
    """sha256 of every case of a CaseSource: id, image and label bytes."""
    h = hashlib.sha256()
    for i in range(len(source)):
        case = source[i]
        h.update(case["case_id"].encode())
        h.update(case["image"].tobytes())
        h.update(case["label"].tobytes())
    return h.hexdigest()


@pytest.fixture()
def proxy(gcs_emulator):
    p = FaultProxy(gcs_emulator.url)
    yield p
    p.close()


def _upload(proxy, uri, retry_secs):
    env = dict(os.environ, PYTHONPATH=ROOT, STORAGE_EMULATOR_HOST=proxy.url)
    return subprocess.run([sys.executable, "-c", UPLOAD, uri, str(retry_secs)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


# What one upload meets, one fault after another (the proxy starts each at the first request after
# the one before has ended, so each is met by at least the request that starts it): 429s, reset
# connections and a stall, each shorter than the gcsfs retry of that request (which sleeps 1-2 s,
# then 2-3 s, ...), so gcsfs rides them out by itself; then 45 s of 503s, which outlast gcsfs's
# retries of one request (6 tries over about 31 s), so the storage layer's retry is what carries
# the upload through. A stall is waited out, not timed out: gcsfs sets no request timeout
# (requests_timeout=None), so a slow answer is a slow answer; the proxy forwards the request after
# it. A stall of 2 s shows that; a longer one would only add waiting.
FAULTS = [("429", 1.0, 0.0), ("reset", 1.0, 0.0), ("stall", 0.5, 2.0), ("503", 45.0, 0.0)]


def test_an_upload_rides_out_a_failing_bucket(proxy, gcs_dir):
    uri = storage.join(gcs_dir, "metrics.jsonl")
    for kind, secs, stall_secs in FAULTS:
        proxy.fail(kind, secs, match=r"metrics\.jsonl|/o$|/o\?", stall_secs=stall_secs)
    out = _upload(proxy, uri, retry_secs=600)
    assert out.returncode == 0, out.stderr[-3000:]
    met = proxy.met_by()
    print(f"{out.stdout.strip()}; faults met (kind, requests): {[(kind, len(hits)) for kind, _, hits in met]}")
    for kind, _, hits in met:  # each fault did meet the upload, through gcsfs, its one client
        assert hits and {client for client, _, _ in hits} == {"gcsfs"}, (kind, hits)
    # The 503s outlasted gcsfs's own retries of a request: the storage layer retried the operation.
    assert "retrying in" in out.stderr and "503" in out.stderr, out.stderr[-3000:]
    assert [json.loads(line)["step"] for line in storage.read_text(uri).splitlines()] == [1, 2]


def test_checkpoint_writes_and_shard_reads_ride_out_a_failing_bucket(proxy, gcs_dir, data_dir):
    """Each fault starts at a request of the client it is for (the proxy tells clients apart by
    their User-Agent) and is as short as can be: met by that request, and by the client's retry
    when it comes within the window."""
    from segguided_jax.data.records import CaseSource

    data = storage.join(gcs_dir, "data")
    for name in os.listdir(data_dir):
        storage.copy_file(os.path.join(data_dir, name), storage.join(data, name))
    faults = [("429", r"^POST .*checkpoints/1/", "tensorstore"), ("reset", r"^POST .*checkpoints/1/", "tensorstore"),
              ("reset", r"^GET .*\.array_record\b", "array_record")]
    for kind, match, client in faults:
        proxy.fail(kind, 1.0, match=match, client=client)
    env = dict(os.environ, PYTHONPATH=ROOT, STORAGE_EMULATOR_HOST=proxy.url, TENSORSTORE_GCS_HTTP_URL=proxy.url,
               CLOUD_STORAGE_EMULATOR_ENDPOINT=proxy.url, JAX_PLATFORMS="cpu")
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", CLIENTS, storage.join(gcs_dir, "run"), data], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    took = time.monotonic() - t0
    assert out.returncode == 0, out.stderr[-3000:]
    met = [(kind, sorted({(c, m) for c, m, _ in hits})) for kind, _, hits in proxy.met_by()]
    print(f"faults met (kind, [(client, method)]): {met}; took {took:.1f} s")
    for (kind, clients), (_, _, client) in zip(met, faults):
        assert (client, "POST" if client == "tensorstore" else "GET") in clients, (kind, client, met)
    assert f"cases {digest(CaseSource(data_dir, 'train'))}" in out.stdout


def test_a_bucket_that_stays_down_stops_within_the_bound_naming_the_operation(proxy, gcs_dir):
    uri = storage.join(gcs_dir, "metrics.jsonl")
    proxy.fail("503", 3600)
    t0 = time.monotonic()
    out = _upload(proxy, uri, retry_secs=5)
    took = time.monotonic() - t0
    assert out.returncode != 0
    # The first operation of the upload, reading the file it appends to, is the one that gives up.
    assert f"StorageUnavailable: read {uri}: object storage kept failing for" in out.stderr, out.stderr[-3000:]
    assert "storage.retry_secs = 5" in out.stderr and "the same command resumes" in out.stderr
    # The bound plus one attempt, which gcsfs itself retries for about 31 s, plus the start-up.
    print(f"stopped after {took:.0f} s")
    assert took < 5 + 45 + 20
    assert not storage.exists(uri)
