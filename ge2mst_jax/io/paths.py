"""Paths that may be local or in a bucket (`gs://...`), through `etils.epath`.

epath sends `gs://` to gcsfs (fsspec) and orbax sends it to tensorstore's GCS driver; both
honour an emulator endpoint (`STORAGE_EMULATOR_HOST`, `TENSORSTORE_GCS_HTTP_URL`). What
differs on a bucket is handled here: objects are written whole (no append, no rename of a
directory), and a write of one object is atomic.
"""
from __future__ import annotations

import os

from etils import epath


def is_remote(path) -> bool:
  return "://" in os.fspath(path)


def bucket(path) -> epath.Path | None:
  """`gs://name` of a `gs://name/...` path (None for a local one)."""
  if not is_remote(path):
    return None
  scheme, _, rest = os.fspath(path).partition("://")
  return epath.Path(f"{scheme}://{rest.split('/', 1)[0]}")


def describe(err: Exception) -> str:
  """An exception as one short line (storage clients put whole HTTP bodies in their messages)."""
  lines = [l.strip() for l in str(err).splitlines() if l.strip()]
  return f"{type(err).__name__}: {(lines[0] if lines else '')[:300]}"


def resolve(path) -> epath.Path:
  """An absolute epath for a local path, the path itself for a URL."""
  return epath.Path(path) if is_remote(path) else epath.Path(os.path.abspath(os.fspath(path)))


def write_text_atomic(path, text: str) -> None:
  """Writes `path` so that a reader sees the old or the new text, never a part."""
  path = epath.Path(path)
  if is_remote(path):  # an object upload replaces the object in one go
    path.write_text(text)
    return
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  tmp.write_text(text)
  tmp.replace(path)


def files(path) -> list[epath.Path]:
  """Every file below a directory (epath's walk() drops the gs:// scheme from what it yields)."""
  out = []
  for p in epath.Path(path).iterdir():
    out.extend(files(p) if p.is_dir() else [p])
  return out


def move_tree(src, dst) -> None:
  """Moves a directory. On a bucket, object by object (server-side copy, then delete)."""
  src, dst = epath.Path(src), epath.Path(dst)
  if not is_remote(src):
    src.rename(dst)
    return
  for f in files(src):
    target = dst / os.path.relpath(os.fspath(f), os.fspath(src))
    target.parent.mkdir(parents=True, exist_ok=True)
    f.copy(target)
  src.rmtree()
