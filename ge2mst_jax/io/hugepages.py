"""Transparent huge pages for XLA:CPU's buffers, by re-executing an entry point with a glibc tunable.

XLA:CPU allocates a step's temporaries and outputs with malloc. Buffers above glibc's mmap
threshold come fresh from the kernel at every call, and first touching them costs a page fault
per 4 KiB, which dominates memory-bound work: writing a fresh 32 MiB array takes about 8x as
long with those faults as without. With `glibc.malloc.hugetlb=1` (glibc >= 2.35) malloc asks
for transparent huge pages, 512x fewer faults, and the `ge2mst_small` train step on XLA:CPU
takes about half the time (docs/training.md, "Compilation cache and huge pages";
`benchmarks/train_step.py` runs with them).
With a GPU or TPU the host allocator is not on the step's path, so nothing is gained there.

glibc reads its tunables only when a process starts, so `train.py`, `eval.py` and the
benchmarks re-execute themselves once, first thing, with the tunable set: same PID, same
arguments, one line on stderr saying so when stderr is a terminal. `--huge_pages` decides, read
from the command line before absl or argparse parse it (they define the same flag, so `--help`
lists it):

  auto  (default) only where it was measured to help: an XLA:CPU run (JAX_PLATFORMS=cpu, or
        no GPU/TPU plugin installed) that is not under a debugger;
  on    wherever glibc and the kernel support it;
  off   never: the process stays as it was started (a debugger, a profiler, a launcher that
        tracks its child).

`GE2MST_HUGE_PAGES=auto|on|off` in the environment sets the same choice where a launcher cannot
change the command line; the flag wins. A `GLIBC_TUNABLES` that already names
`glibc.malloc.hugetlb` (the re-executed process, or the user's own choice) is left alone.
"""
from __future__ import annotations

import importlib.util
import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
FLAG = "huge_pages"
MODES = ("auto", "on", "off")
ENV = "GE2MST_HUGE_PAGES"
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu", "jax_rocm7_plugin")
HELP_ARGS = ("-h", "-?", "--help", "-help", "--helpshort", "--helpfull", "--helpxml")
HELP = ("Re-execute once at start with glibc's transparent huge pages for malloc "
        f"(GLIBC_TUNABLES={TUNABLE}), which speeds up XLA:CPU's memory-bound steps: 'auto' on CPU "
        "runs not under a debugger, 'on' wherever glibc >= 2.35 and the kernel allow, 'off' never "
        f"(the process stays as started). Read before anything else starts; {ENV} sets the default.")


def accelerator_expected(environ, find_spec=importlib.util.find_spec) -> bool:
  """Whether JAX will run on an accelerator, decided before it starts: JAX_PLATFORMS when set,
  else whether a GPU/TPU plugin is installed (JAX prefers it over the CPU)."""
  platforms = environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip().lower() != "cpu"
  return any(find_spec(name) is not None for name in ACCELERATOR_PLUGINS)


DEBUGGER_MODULES = ("bdb", "pydevd", "debugpy")  # pdb and IPython's debugger, PyCharm / VS Code


def debugger_attached(modules=None) -> bool:
  """A debugger (pdb, debugpy, an IDE's, IPython) runs this process: re-executing it would drop
  the debugger and its breakpoints. Its module is loaded even while it traces nothing (pdb after
  `continue` with no breakpoint); an entry point imports none of these itself before this runs."""
  if any(m in (sys.modules if modules is None else modules) for m in DEBUGGER_MODULES):
    return True
  if sys.gettrace() is not None:
    return True
  monitoring = getattr(sys, "monitoring", None)  # Python >= 3.12 debuggers
  return monitoring is not None and monitoring.get_tool(monitoring.DEBUGGER_ID) is not None


def requested_mode(argv, environ) -> str | None:
  """The mode asked for: the last `--huge_pages=MODE` / `--huge_pages MODE` (one dash or two, up
  to a `--`), else $GE2MST_HUGE_PAGES (`0`/`1` read as off/auto, the variable's meaning before the
  flag), else 'auto'. None for a value that is not a mode (the modes are lower case, as the flag
  parsers take them): the flag parser reports a bad flag, `env_problem` a bad variable, and
  nothing is re-executed meanwhile."""
  mode = {"0": "off", "1": "auto"}.get(environ.get(ENV, ""), environ.get(ENV, "") or "auto")
  args = list(argv)
  for i, arg in enumerate(args):
    if arg == "--":
      break
    name, eq, value = arg.lstrip("-").partition("=")
    if not arg.startswith("-") or name != FLAG:
      continue
    mode = value if eq else (args[i + 1] if i + 1 < len(args) else "")
  return mode if mode in MODES else None


def env_problem(environ) -> str | None:
  """A one-line note when $GE2MST_HUGE_PAGES holds something that is not a mode."""
  value = environ.get(ENV, "")
  if value and value not in MODES + ("0", "1"):
    return f"{ENV}={value!r} is not one of {', '.join(MODES)} (or 0/1): huge pages stay off."
  return None


def plan(mode: str | None, environ, glibc_version: tuple | None, thp_mode: str | None,
         accelerator: bool = False, debugger: bool = False) -> tuple[dict | None, str]:
  """`(environment to re-execute with or None, why)`."""
  if mode is None or mode == "off":
    return None, "off"
  if "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", ""):
    return None, "GLIBC_TUNABLES already sets glibc.malloc.hugetlb"
  if glibc_version is None or glibc_version < (2, 35):
    return None, f"needs glibc >= 2.35 (this is {'.'.join(map(str, glibc_version)) if glibc_version else 'not glibc'})"
  if thp_mode not in ("always", "madvise"):
    return None, f"the kernel's transparent huge pages are {thp_mode or 'unavailable'}"
  if mode == "auto" and accelerator:
    return None, "JAX will run on an accelerator"
  if mode == "auto" and debugger:
    return None, "a debugger is attached"
  tunables = environ.get("GLIBC_TUNABLES", "")
  env = {**environ, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}" if tunables else TUNABLE}
  return env, "an XLA:CPU run" if mode == "auto" else "asked for"


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
  """Replaces this process by the same command with the tunable set (same PID), as `--huge_pages`
  decides. Says so on a terminal's stderr when it re-executes, and on any stderr when an explicit
  `on` cannot be honoured."""
  if not sys.platform.startswith("linux") or any(a in HELP_ARGS for a in sys.argv[1:]):
    return
  mode = requested_mode(sys.argv[1:], os.environ)
  if (problem := env_problem(os.environ)) and f"--{FLAG}" not in " ".join(sys.argv[1:]):
    print(f"{os.path.basename(sys.argv[0]) or 'python'}: huge pages: {problem}", file=sys.stderr, flush=True)
  env, why = plan(mode, os.environ, glibc_version(), thp_mode(), accelerator_expected(os.environ),
                  debugger_attached())
  prog = os.path.basename(sys.argv[0]) or "python"
  if env is None:
    if mode == "on" and "GLIBC_TUNABLES" not in why:
      print(f"{prog}: huge pages: not enabled although --huge_pages=on: {why}.", file=sys.stderr, flush=True)
    return
  if sys.stderr.isatty():   # for the person at the terminal; piped stderr keeps errors to one line
    print(f"{prog}: huge pages: re-executing with GLIBC_TUNABLES={env['GLIBC_TUNABLES']} ({why}; "
          f"--huge_pages=off runs without).", file=sys.stderr, flush=True)
  sys.stdout.flush()
  try:
    os.execve(sys.executable, sys.orig_argv, env)
  except OSError as e:
    print(f"{prog}: huge pages: re-execution failed ({e}); running with the default allocator.",
          file=sys.stderr, flush=True)
