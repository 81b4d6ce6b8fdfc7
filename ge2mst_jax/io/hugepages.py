"""Transparent huge pages for XLA:CPU's buffers, by re-executing an entry point with a glibc tunable.

XLA:CPU allocates a step's temporaries and outputs with malloc. Buffers above glibc's mmap
threshold come fresh from the kernel at every call, and first touching them costs a page
fault per 4 KiB: on the benchmark machine that was most of the time of the memory-bound
work (writing a fresh 32 MiB array: 8.6 ms with 4 KiB pages, 1.0 ms without the faults).
With `glibc.malloc.hugetlb=1` (glibc >= 2.35) malloc asks for transparent huge pages, 512x
fewer faults: the `ge2mst_small` train step went from 2.58 s to 1.36-1.52 s. glibc reads its
tunables only when a process starts, so `train.py`, `eval.py` and the benchmarks call
`reexec_with_huge_pages()` before they start JAX. `GE2MST_HUGE_PAGES=0` opts out. Only for
CPU runs: with a GPU or TPU the host allocator is not on the step's path, so a machine where
JAX will pick an accelerator is left as it is.
"""
from __future__ import annotations

import importlib.util
import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "GE2MST_HUGE_PAGES"
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu", "jax_rocm7_plugin")


def accelerator_expected(environ, find_spec=importlib.util.find_spec) -> bool:
  """Whether JAX will run on an accelerator, decided before it starts: JAX_PLATFORMS when set,
  else whether a GPU/TPU plugin is installed (JAX prefers it over the CPU)."""
  platforms = environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip().lower() != "cpu"
  return any(find_spec(name) is not None for name in ACCELERATOR_PLUGINS)


def huge_page_environ(environ, glibc_version: tuple | None, thp_mode: str | None,
                      accelerator: bool = False) -> dict | None:
  """The environment to re-execute with, or None: an accelerator run, opted out, no glibc >= 2.35,
  transparent huge pages off in the kernel, or the tunable already set (by us before the exec,
  or by the user)."""
  if accelerator or environ.get(OPT_OUT, "1") == "0" or glibc_version is None or glibc_version < (2, 35):
    return None
  if thp_mode not in ("always", "madvise"):
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" in tunables:
    return None
  return {**environ, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}" if tunables else TUNABLE}


def glibc_version() -> tuple | None:
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    return tuple(int(p) for p in version.split(".")[:2]) if name == "glibc" else None
  except (AttributeError, OSError, ValueError):
    return None


def thp_mode(path: str = "/sys/kernel/mm/transparent_hugepage/enabled") -> str | None:
  """The kernel's transparent-huge-page mode, the bracketed word of e.g. 'always [madvise] never'."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def reexec_with_huge_pages() -> None:
  """Replaces this process by the same command with the tunable set (same PID), where it helps."""
  if not sys.platform.startswith("linux"):
    return
  env = huge_page_environ(os.environ, glibc_version(), thp_mode(), accelerator_expected(os.environ))
  if env is None:
    return
  sys.stdout.flush(), sys.stderr.flush()
  try:
    os.execve(sys.executable, sys.orig_argv, env)
  except OSError:
    pass  # runs on with the default allocator
