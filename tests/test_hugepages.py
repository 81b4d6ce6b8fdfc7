"""Transparent huge pages for XLA:CPU's buffers: when the entry points re-execute, and that they do."""
import os
import subprocess
import sys

import pytest

from ge2mst_jax.io import hugepages as hp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC, THP = (2, 36), "madvise"   # a machine where huge pages are possible


def test_plan_of_the_re_execution():
  env, why = hp.plan("auto", {"PATH": "/bin"}, GLIBC, THP)
  assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"} and why == "an XLA:CPU run"
  # other tunables the user set are kept
  env, _ = hp.plan("auto", {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, (2, 39), "always")
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  # nothing to do: off or an unknown mode, already set (no exec loop), old glibc, no glibc, THP off or unknown
  for mode in ("auto", "on"):
    assert hp.plan(mode, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, THP)[0] is None
    assert hp.plan(mode, {}, (2, 34), "always") == (None, "needs glibc >= 2.35 (this is 2.34)")
    assert hp.plan(mode, {}, None, "always")[0] is None
    assert hp.plan(mode, {}, GLIBC, "never")[0] is None
    assert hp.plan(mode, {}, GLIBC, None)[0] is None
  assert hp.plan("off", {}, GLIBC, THP) == (None, "off")
  assert hp.plan(None, {}, GLIBC, THP)[0] is None
  # auto: XLA:CPU runs outside a debugger only; on: wherever it is possible
  assert hp.plan("auto", {}, GLIBC, THP, accelerator=True) == (None, "JAX will run on an accelerator")
  assert hp.plan("auto", {}, GLIBC, THP, debugger=True) == (None, "a debugger is attached")
  env, why = hp.plan("on", {}, GLIBC, THP, accelerator=True, debugger=True)
  assert env["GLIBC_TUNABLES"] == hp.TUNABLE and why == "asked for"


def test_mode_from_the_command_line_before_the_flag_parser():
  assert hp.requested_mode([], {}) == "auto"
  assert hp.requested_mode(["--workdir", "w", "--huge_pages=off"], {}) == "off"
  assert hp.requested_mode(["--huge_pages", "on"], {}) == "on"
  assert hp.requested_mode(["--huge_pages=ON"], {}) is None                       # as absl's enum: lower case
  assert hp.requested_mode(["-huge_pages=off"], {}) == "off"                       # absl's one-dash form
  assert hp.requested_mode(["--huge_pages=on", "--huge_pages=off"], {}) == "off"  # the last wins, as in absl
  assert hp.requested_mode(["--", "--huge_pages=off"], {}) == "auto"              # not a flag after --
  assert hp.requested_mode(["--huge_pages=maybe"], {}) is None                    # the parser reports it
  assert hp.requested_mode(["--huge_pagesx=off", "huge_pages=off"], {}) == "auto"
  # the environment sets the default (0/1 as off/on); the flag wins
  assert hp.requested_mode([], {hp.ENV: "0"}) == "off"
  assert hp.requested_mode([], {hp.ENV: "off"}) == "off"
  assert hp.requested_mode([], {hp.ENV: "1"}) == "auto"   # 1 meant "where it helps" before the flag
  assert hp.requested_mode([], {hp.ENV: "yes"}) is None and "is not one of auto, on, off" in hp.env_problem({hp.ENV: "yes"})
  assert hp.env_problem({hp.ENV: "off"}) is None and hp.env_problem({}) is None
  assert hp.requested_mode(["--huge_pages=auto"], {hp.ENV: "off"}) == "auto"


def test_only_cpu_runs_re_execute():
  none = lambda name: None
  tpu = lambda name: object() if name == "libtpu" else None
  assert not hp.accelerator_expected({}, none)
  assert hp.accelerator_expected({}, tpu)                                  # a plugin is installed: JAX picks it
  assert not hp.accelerator_expected({"JAX_PLATFORMS": "cpu"}, tpu)        # the user asked for the CPU
  assert hp.accelerator_expected({"JAX_PLATFORMS": "cuda,cpu"}, none)


def test_a_loaded_debugger_counts_as_attached():
  assert hp.debugger_attached({"bdb": None}) and hp.debugger_attached({"debugpy": None})
  assert hp.debugger_attached({}) == (sys.gettrace() is not None)


def test_kernel_mode_is_read_from_the_bracketed_word(tmp_path):
  f = tmp_path / "enabled"
  f.write_text("always [madvise] never\n")
  assert hp.thp_mode(str(f)) == "madvise"
  f.write_text("[always] madvise never\n")
  assert hp.thp_mode(str(f)) == "always"
  assert hp.thp_mode(str(tmp_path / "missing")) is None


PROBE = ("import os, sys; print('start', os.getpid(), flush=True); "
         "from ge2mst_jax.io.hugepages import reexec_with_huge_pages; reexec_with_huge_pages(); "
         "print('run', os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])")


def _probe(*args, **env):
  base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hp.ENV)}
  r = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=ROOT,
                     env={**base, "JAX_PLATFORMS": "cpu", **env}, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  lines = r.stdout.split("\n")
  starts = [line.split()[1] for line in lines if line.startswith("start")]
  run = next(line for line in lines if line.startswith("run")).split(" ", 3)
  return starts, run, r.stderr


@pytest.mark.skipif(hp.plan("auto", {}, hp.glibc_version(), hp.thp_mode())[0] is None,
                    reason="no glibc >= 2.35 with transparent huge pages on this machine")
@pytest.mark.slow
def test_entry_point_re_executes_itself_once_with_the_tunable():
  starts, run, err = _probe("--flag=1")
  assert len(starts) == 2 and starts[0] == starts[1] == run[1]          # one exec, the same process
  assert run[2] == "glibc.malloc.hugetlb=1" and run[3] == "['--flag=1']"  # arguments kept
  assert not err   # piped stderr: no announcement, so an error stays the only line
  # turned off by the flag (as a launcher or debugger would) or the environment: no exec, no tunable, silent
  for args, env in ((["--huge_pages=off"], {}), (["--huge_pages", "off"], {}), ([], {hp.ENV: "off"})):
    starts, run, err = _probe(*args, **env)
    assert len(starts) == 1 and run[2] == "None" and not err, (args, env, err)
  # --help only prints: no exec
  starts, run, err = _probe("--help")
  assert len(starts) == 1 and run[2] == "None"


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
@pytest.mark.slow
def test_help_of_the_entry_points_shows_the_flag(script):
  r = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True,
                     cwd=ROOT, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert "--huge_pages: <auto|on|off>" in r.stdout and "(default: 'auto')" in r.stdout
  assert "re-executing" not in r.stderr
