"""A bucket that fails for a while: storage operations (here a metrics.jsonl upload and read) ride
out 503s, 429s, resets and stalls from a fault-injecting proxy in front of the emulator
(tests/fault_proxy.py), and a bucket that stays down stops the operation within the retry bound
with an error naming it and the URI."""
import json
import os
import subprocess
import sys
import time

import pytest

from segguided_jax import storage
from tests.fault_proxy import FaultProxy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# In a fresh process (the storage clients read the endpoint when imported): uploads metrics.jsonl
# with two rows, reads it back, prints the seconds it took.
UPLOAD = """
import sys, time
from segguided_jax import storage
storage.set_retry_secs(float(sys.argv[2]))
t0 = time.monotonic()
f = storage.MetricsFile(sys.argv[1])
f.append({"step": 1, "loss": 0.5})
f.append({"step": 2, "loss": 0.25})
f.flush()
assert [r["step"] for r in storage.MetricsFile(sys.argv[1]).rows()] == [1, 2]
print(f"took {time.monotonic() - t0:.1f}")
"""


@pytest.fixture()
def proxy(gcs_emulator):
    p = FaultProxy(gcs_emulator.url)
    yield p
    p.close()


def _upload(proxy, uri, retry_secs):
    env = dict(os.environ, PYTHONPATH=ROOT, STORAGE_EMULATOR_HOST=proxy.url)
    return subprocess.run([sys.executable, "-c", UPLOAD, uri, str(retry_secs)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


# 45 s of 503s outlast gcsfs's own retries of one request (6 tries over about 31 s), so the storage
# layer's retry is what carries the upload through. (Shorter 429s, resets and stalls, which gcsfs
# rides out by itself, meet a whole run in tests/test_gcs_runs.py.)
@pytest.mark.parametrize("kind,secs", [("503", 45)])
def test_an_upload_rides_out_a_failing_bucket(proxy, gcs_dir, kind, secs):
    uri = storage.join(gcs_dir, "metrics.jsonl")
    proxy.fail(kind, secs, match=r"metrics\.jsonl|/o$|/o\?", stall_secs=3)
    out = _upload(proxy, uri, retry_secs=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert proxy.met()[0][2] > 0  # the fault did meet the upload
    assert [json.loads(line)["step"] for line in storage.read_text(uri).splitlines()] == [1, 2]
    print(f"{kind} for {secs} s: {out.stdout.strip()}")


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
