"""A Google Cloud Storage emulator on localhost for the tests, and the pytest fixtures that start it.

The emulator is gcp-storage-emulator (PyPI), run in its own process:
    python tests/gcs_emulator.py [--bucket BUCKET]    # prints "port N" once it serves
The `gcs_emulator` fixture starts it once per test session and points every library in the chain
at it through the environment (inherited by subprocesses):
    STORAGE_EMULATOR_HOST            gcsfs (etils.epath's gs:// backend), google-cloud-storage
    TENSORSTORE_GCS_HTTP_URL         tensorstore's gcs driver (Orbax's array writes)
    GOOGLE_AUTH_TOKEN_FOR_TESTING    tensorstore: a fixed token instead of Google credentials
    CLOUD_STORAGE_EMULATOR_ENDPOINT  google-cloud-cpp, inside array_record's reader
    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false  gcsfs: no bucket-layout lookup (Google's control
                                     API, which the emulator lacks; it only logs a warning)

One addition to the emulator: GCS sends an object's generation in the `x-goog-generation`
header of every media download; gcp-storage-emulator 2026.7.19 does not, and tensorstore then
reads generation 0 and refuses its next conditional write of that object ("Malformed
StorageGeneration"; OCDBT rereads its manifest and hits this now and then). The server started
here adds the header. It also honours ifGenerationMatch on uploads and deletes, which the
emulator ignores (412 Precondition Failed when the object's generation differs, 0 meaning "does
not exist"), as the workdir lease relies on it to let only one of two racing runs in; and it
cancels a resumable upload on DELETE, as GCS does (storage.copy_file discards a failed copy so).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import types
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "segguided-test"
MODULES = {"gcsfs": "gcsfs", "gcp_storage_emulator": "gcp-storage-emulator"}


# ---------------------------------------------------------------------------------------------
# The server (runs in its own process)

def _die_with_parent(parent_pid: int) -> None:
    # The emulator must not outlive a killed test run: SIGTERM when the parent dies (Linux),
    # and exit at once if it died before this line.
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        sys.exit(0)


def _serve(bucket: str, parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    import http.server
    from http import HTTPStatus

    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    plain_download = objects.download

    def download(request, response, storage, *args, **kwargs):
        plain_download(request, response, storage, *args, **kwargs)
        if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj["metageneration"])

    objects.download = download  # objects.get calls it for ?alt=media

    # ifGenerationMatch: the handler notes the request's precondition; the storage checks it when it
    # creates or deletes the object (the one place that knows the object's name for every upload
    # type). The server handles one request at a time.
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.storage import Storage

    class PreconditionFailed(Exception):
        pass

    wanted = {}

    def holds(store, bucket_name, object_id):
        if wanted.get("generation") is None:
            return True
        try:
            have = str(store.get_file_obj(bucket_name, object_id)["generation"])
        except NotFound:
            have = "0"
        return have == wanted["generation"]

    plain_create, plain_delete_file = Storage.create_file, Storage.delete_file

    def create_file(self, bucket_name, file_name, *args, **kwargs):
        if not holds(self, bucket_name, file_name):
            raise PreconditionFailed
        return plain_create(self, bucket_name, file_name, *args, **kwargs)

    def delete_file(self, bucket_name, file_name, *args, **kwargs):
        if not holds(self, bucket_name, file_name):
            raise PreconditionFailed
        return plain_delete_file(self, bucket_name, file_name, *args, **kwargs)

    Storage.create_file, Storage.delete_file = create_file, delete_file

    def conditional(handler):
        def handle(request, response, storage, *args, **kwargs):
            wanted["generation"] = (request.query.get("ifGenerationMatch") or [None])[0]
            try:
                return handler(request, response, storage, *args, **kwargs)
            except PreconditionFailed:
                response.status = HTTPStatus.PRECONDITION_FAILED
                error = {"code": 412, "message": "At least one of the pre-conditions you specified did not hold.",
                         "errors": [{"reason": "conditionNotMet", "domain": "global",
                                     "message": "At least one of the pre-conditions you specified did not hold."}]}
                response.json({"error": error})
            finally:
                wanted["generation"] = None
        return handle

    # Cancelling a resumable upload (DELETE on its session URI, what gcsfs's discard() sends):
    # GCS answers 499 and the object is never created; the emulator has no such route (501).
    def cancel_upload(request, response, storage, *args, **kwargs):
        try:
            storage.delete_resumable_file_obj(request.query["upload_id"][0])
        except (KeyError, NotFound):
            response.status = HTTPStatus.NOT_FOUND
            return
        response.status = types.SimpleNamespace(value=499, phrase="Client Closed Request")  # not in HTTPStatus

    for _, handlers in server.HANDLERS:
        if handlers.get(server.PUT) is objects.upload_partial:
            handlers[server.DELETE] = cancel_upload

    replaced = {plain_download: download, objects.insert: conditional(objects.insert),
                objects.delete: conditional(objects.delete)}
    objects.insert = replaced[objects.insert]  # the server's fallback for uploads without /upload
    for _, handlers in server.HANDLERS:
        for method, handler in handlers.items():
            if handler in replaced:
                handlers[method] = replaced[handler]
    # tensorstore opens many connections at once; the default backlog of 5 drops some.
    http.server.HTTPServer.request_queue_size = 128

    emulator = server.create_server("127.0.0.1", 0, in_memory=True, default_bucket=bucket)
    emulator.start()
    print(f"port {emulator._api._httpd.server_address[1]}", flush=True)
    while True:  # until SIGTERM (default action: exit; the data lived in memory only)
        signal.pause()


# ---------------------------------------------------------------------------------------------
# The fixtures

def _ensure_installed() -> None:
    """Installs the test extra's emulator packages if they are missing (launch/env.sh installs
    them with the test extra; this covers a venv set up by hand)."""
    missing = [pkg for mod, pkg in MODULES.items() if importlib.util.find_spec(mod) is None]
    if not missing:
        return
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extra = tomllib.load(f)["project"]["optional-dependencies"]["test"]
    wanted = [r for r in extra if any(r.startswith(pkg) for pkg in missing)]
    out = subprocess.run([sys.executable, "-m", "pip", "install", *wanted], capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        pytest.fail(f"could not install {wanted} for the storage emulator tests:\n{out.stdout[-2000:]}"
                    f"{out.stderr[-2000:]}")
    importlib.invalidate_caches()


class Emulator:
    def __init__(self, url: str, bucket: str):
        self.url, self.bucket = url, bucket
        self.env = {
            "STORAGE_EMULATOR_HOST": url,
            "TENSORSTORE_GCS_HTTP_URL": url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }

    def new_prefix(self, name: str = "t") -> str:
        """A fresh gs:// folder in the bucket."""
        return f"gs://{self.bucket}/{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def gcs_emulator():
    """The emulator, serving BUCKET on a free localhost port, with os.environ pointing the
    storage libraries at it for the rest of the session."""
    _ensure_installed()
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--bucket", BUCKET,
                             "--parent-pid", str(os.getpid())],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()  # blocks until the server listens (or dies)
        if not line.startswith("port "):
            pytest.fail(f"the storage emulator did not start (exit status {proc.wait(timeout=10)})")
        emulator = Emulator(f"http://127.0.0.1:{int(line.split()[1])}", BUCKET)
        saved = {k: os.environ.get(k) for k in emulator.env}
        os.environ.update(emulator.env)
        try:
            yield emulator
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture()
def gcs_dir(gcs_emulator):
    """A fresh, empty gs:// folder on the emulator, for one test."""
    return gcs_emulator.new_prefix()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bucket", default=BUCKET)
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process exits")
    args = parser.parse_args()
    _serve(args.bucket, args.parent_pid if args.parent_pid is not None else os.getppid())
