"""A GCS JSON-API server on localhost for the tests: gcp-storage-emulator, in memory, plus request preconditions.

gcp-storage-emulator (2026.7.19) lacks two things of GCS that the project's clients rely on, added here:
  - request preconditions (https://cloud.google.com/storage/docs/request-preconditions): it ignores them, so an
    upload with ifGenerationMatch=0 of an object that exists overwrites it where GCS answers 412 Precondition
    Failed. The workdir lock (tinymim_jax.lock.GcsLock) and TensorStore's OCDBT manifest updates depend on
    them. ifGenerationMatch / ifGenerationNotMatch / ifMetagenerationMatch / ifMetagenerationNotMatch are
    checked on every object request (an upload's object named by its `name` query or metadata) before the
    emulator's handler runs: a failed one is 412, or 304 Not Modified for a read with a *NotMatch condition, as
    GCS answers. The server handles one request at a time, so the check and the write are atomic.
  - the x-goog-generation / x-goog-metageneration headers of a download, from which TensorStore takes the
    generation it conditions its next write on ("Malformed StorageGeneration" without them).

  python -m tests.helpers.gcs_emulator BUCKET   # prints 'port N' once it serves on 127.0.0.1:N (a free port);
                                                # stops when its standard input closes (its parent is gone)

start() runs it as a subprocess and returns the environment that points clients at it without credentials.
"""

import os
import subprocess
import sys
import threading
from http import HTTPStatus

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_CLOSED = "127.0.0.1:9"  # a closed local port: a client that looks for credentials on the metadata server fails here


def client_env(url: str) -> dict[str, str]:
  """The variables that point the clients at the server `url`, with no credentials and nothing leaving the host:
  Python clients (google-cloud-storage, gcsfs) by STORAGE_EMULATOR_HOST, TensorStore (Orbax's array data) by
  TENSORSTORE_GCS_HTTP_URL; etils epath through fsspec / gcsfs (EPATH_USE_TF=0: tf.io.gfile has no endpoint
  override); gcsfs anonymous and without its zonal-bucket probe (a gRPC API the emulator lacks); TensorStore
  with a fixed test token instead of a credentials search; the GCE metadata server (credentials) on a closed
  local port."""
  return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "EPATH_USE_TF": "0",
          "FSSPEC_GCS_TOKEN": "anon", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
          "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "NO_GCE_CHECK": "true", "GCE_METADATA_HOST": _CLOSED,
          "GCE_METADATA_IP": _CLOSED, "GCE_METADATA_ROOT": _CLOSED}


def start(bucket: str, log_path: str) -> tuple[subprocess.Popen, dict[str, str]]:
  """Starts the server with `bucket` (its log in log_path) -> (process, client_env)."""
  log = open(log_path, "w")
  proc = subprocess.Popen([sys.executable, "-m", "tests.helpers.gcs_emulator", bucket], cwd=ROOT,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT})
  log.close()
  line = proc.stdout.readline()
  if not line.startswith("port "):
    proc.kill()
    proc.wait()
    raise RuntimeError(f"the GCS emulator did not start: {line!r}; see {log_path}")
  return proc, client_env(f"http://127.0.0.1:{int(line.split()[1])}")


def stop(proc: subprocess.Popen) -> None:
  proc.stdin.close()  # the server exits on EOF
  try:
    proc.wait(timeout=10)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()


# ---------------------------------------------------------------------------------------------------------
# The server process.
# ---------------------------------------------------------------------------------------------------------
_CHECKS = (("ifGenerationMatch", "generation", True), ("ifGenerationNotMatch", "generation", False),
           ("ifMetagenerationMatch", "metageneration", True), ("ifMetagenerationNotMatch", "metageneration", False))


def _object_name(request):
  if request.params and request.params.get("object_id"):
    return request.params["object_id"]
  if "name" in request.query:
    return request.query["name"][0]
  data = request.data
  if isinstance(data, dict):  # a multipart upload's metadata, or a resumable upload's
    return (data.get("meta") or data).get("name")
  return None


def _with_preconditions(handler):
  from gcp_storage_emulator.exceptions import NotFound

  def checked(request, response, storage, *args, **kwargs):
    conditions = [(q, field, equal) for q, field, equal in _CHECKS if q in request.query]
    name = _object_name(request) if conditions else None
    if name is not None and "upload_id" not in request.query:  # a resumable upload's chunks: checked at its start
      try:
        obj = storage.get_file_obj(request.params["bucket_name"], name)
      except NotFound:
        obj = {"generation": "0", "metageneration": "0"}  # GCS: generation 0 matches only a missing object
      for q, field, equal in conditions:
        if (str(obj.get(field)) == request.query[q][0]) != equal:
          if request.method == "GET" and not equal:
            response.status = HTTPStatus.NOT_MODIFIED
            return None
          response.status = HTTPStatus.PRECONDITION_FAILED
          response.json({"error": {"code": 412, "message": f"At least one of the pre-conditions you specified did "
                                   f"not hold ({q}={request.query[q][0]}, {field} {obj.get(field)})",
                                   "errors": [{"reason": "conditionNotMet", "message": "Precondition Failed"}]}})
          return None
    return handler(request, response, storage, *args, **kwargs)

  return checked


def _with_generation_headers(download):
  def with_headers(request, response, storage, *args, **kwargs):
    out = download(request, response, storage, *args, **kwargs)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj["metageneration"])
    return out

  return with_headers


def _serve(bucket: str) -> None:
  from gcp_storage_emulator import server
  from gcp_storage_emulator.handlers import objects

  download = objects.download
  objects.download = _with_generation_headers(download)  # also what objects.get calls for ?alt=media
  for _, handlers in server.HANDLERS:
    for method, handler in list(handlers.items()):
      if getattr(handler, "__module__", "") == objects.__name__:
        handlers[method] = _with_preconditions(objects.download if handler is download else handler)
  objects.insert = _with_preconditions(objects.insert)  # the router's fallback for uploads without /upload/
  srv = server.create_server("127.0.0.1", 0, in_memory=True, default_bucket=bucket)
  srv.start()
  print(f"port {srv._api._httpd.server_address[1]}", flush=True)  # pylint: disable=protected-access
  done = threading.Event()
  threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
  done.wait()
  srv.stop()


if __name__ == "__main__":
  _serve(sys.argv[1])
