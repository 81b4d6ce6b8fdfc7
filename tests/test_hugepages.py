"""Transparent huge pages for XLA:CPU's buffers: when the entry points re-execute, and that they do."""
import os
import subprocess
import sys

import pytest

from ge2mst_jax.io import hugepages as hp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_environment_for_the_re_execution():
  env = hp.huge_page_environ({"PATH": "/bin"}, (2, 36), "madvise")
  assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  # other tunables the user set are kept
  env = hp.huge_page_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, (2, 39), "always")
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  # nothing to do: already set (no exec loop), opted out, old glibc, no glibc, THP off or unknown
  assert hp.huge_page_environ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36), "madvise") is None
  assert hp.huge_page_environ({"GE2MST_HUGE_PAGES": "0"}, (2, 36), "madvise") is None
  assert hp.huge_page_environ({}, (2, 34), "always") is None
  assert hp.huge_page_environ({}, None, "always") is None
  assert hp.huge_page_environ({}, (2, 36), "never") is None
  assert hp.huge_page_environ({}, (2, 36), None) is None
  assert hp.huge_page_environ({}, (2, 36), "madvise", accelerator=True) is None


def test_only_cpu_runs_re_execute():
  none = lambda name: None
  tpu = lambda name: object() if name == "libtpu" else None
  assert not hp.accelerator_expected({}, none)
  assert hp.accelerator_expected({}, tpu)                                  # a plugin is installed: JAX picks it
  assert not hp.accelerator_expected({"JAX_PLATFORMS": "cpu"}, tpu)        # the user asked for the CPU
  assert hp.accelerator_expected({"JAX_PLATFORMS": "cuda,cpu"}, none)


def test_kernel_mode_is_read_from_the_bracketed_word(tmp_path):
  f = tmp_path / "enabled"
  f.write_text("always [madvise] never\n")
  assert hp.thp_mode(str(f)) == "madvise"
  f.write_text("[always] madvise never\n")
  assert hp.thp_mode(str(f)) == "always"
  assert hp.thp_mode(str(tmp_path / "missing")) is None


@pytest.mark.skipif(hp.huge_page_environ({}, hp.glibc_version(), hp.thp_mode()) is None,
                    reason="no glibc >= 2.35 with transparent huge pages on this machine")
def test_entry_point_re_executes_itself_once_with_the_tunable():
  code = ("import os, sys; print('start', os.getpid(), flush=True); "
          "from ge2mst_jax.io.hugepages import reexec_with_huge_pages; reexec_with_huge_pages(); "
          "print('run', os.getpid(), os.environ['GLIBC_TUNABLES'], sys.argv[1:])")
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hp.OPT_OUT)}
  r = subprocess.run([sys.executable, "-c", code, "--flag=1"], capture_output=True, text=True, cwd=ROOT, env=env,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  lines = r.stdout.split("\n")
  starts = [line.split()[1] for line in lines if line.startswith("start")]
  run = next(line for line in lines if line.startswith("run")).split(" ", 3)
  assert len(starts) == 2 and starts[0] == starts[1] == run[1]          # one exec, the same process
  assert run[2] == "glibc.malloc.hugetlb=1" and run[3] == "['--flag=1']"  # arguments kept
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600,
                     env={**env, hp.OPT_OUT: "0"})
  assert r.stdout.count("start") == 1 and "KeyError" in r.stderr     # opted out: no exec, no tunable
