"""`gcp-storage-emulator` as the tests use it: `python -m tests.gcs_emulator PORT BUCKET`.

One gap of the emulator is filled here: GCS sends an object's generation in the
`x-goog-generation` header of a download, and tensorstore (orbax's storage layer) reads it to
version what it caches (OCDBT manifests); without it every checkpoint read fails with
"Malformed StorageGeneration". Everything else is the emulator as published.
"""
import sys

from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download_with_generation(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", 1))
  except Exception:  # not found: the emulator already answered 404
    pass


def main(port: int, bucket: str) -> None:
  objects.download = download_with_generation   # objects.get(alt=media) calls it by name
  for _, methods in server.HANDLERS:            # the routing table holds the function itself
    for method, handler in methods.items():
      if handler is _download:
        methods[method] = download_with_generation
  server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2])
