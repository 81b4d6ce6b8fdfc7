"""The documentation stays true: the site builds with warnings as errors, every snippet marked to
run runs, the code's references to the mathematics name sections that exist, and the benchmarks
page is what `benchmarks/report.py` makes of the results files."""
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from ge2mst_jax.train import loop as train_lib
from tests import cpu
from tests.test_train import ROOT, small_digits

ROOT_PATH = pathlib.Path(ROOT)
DOCS = ROOT_PATH / "docs"
PAGES = sorted([ROOT_PATH / "README.md", *DOCS.rglob("*.md")])
RUN_MARK = "<!-- run -->"
LINKED = ("train.py", "eval.py", "configs", "benchmarks", "examples")
# A fenced block right after the mark: its language and its body.
_MARKED_BLOCK = re.compile(re.escape(RUN_MARK) + r"[ \t]*\n```(python|bash)[^\n]*\n(.*?)^```", re.S | re.M)


def marked_blocks(text: str) -> dict[str, list[str]]:
  """The page's blocks marked to run, by language, in page order."""
  blocks = {"python": [], "bash": []}
  for lang, body in _MARKED_BLOCK.findall(text):
    blocks[lang].append(body)
  return blocks


def test_marked_blocks_are_found_in_order_and_only_after_the_mark():
  text = ("<!-- run -->\n```python\na = 1\n```\n\n```python\nnot_run()\n```\n"
          "<!-- run -->\n```bash\necho hi\n```\n<!-- run -->\n```python\nb = a\n```\n")
  assert marked_blocks(text) == {"python": ["a = 1\n", "b = a\n"], "bash": ["echo hi\n"]}


def test_site_builds_with_warnings_as_errors(tmp_path):
  # A broken link or anchor, a page outside the toctree, a docstring autodoc cannot import or
  # parse: each is a warning, and -W makes it fail the build.
  out = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                        str(DOCS), str(tmp_path / "html")], cwd=ROOT, env=cpu.env(1),
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-6000:]
  assert (tmp_path / "html" / "math.html").exists() and (tmp_path / "html" / "api.html").exists()


RUNNABLE = [p for p in PAGES if any(marked_blocks(p.read_text()).values())]


@pytest.fixture(scope="module")
def snippet_dir(tmp_path_factory):
  """A directory holding `workdirs/digits`, a small trained digits run in train.py's layout."""
  base = tmp_path_factory.mktemp("snippets")
  train_lib.train_and_evaluate(small_digits(8, checkpoint_every=4), str(base / "workdirs" / "digits"), quiet=True)
  return base


@pytest.mark.slow
@pytest.mark.xdist_group("trained_digits")   # test_eval's worker: the fixture's programs compile once for both
@pytest.mark.parametrize("page", RUNNABLE, ids=[str(p.relative_to(ROOT_PATH)) for p in RUNNABLE])
def test_page_snippets_run(page, snippet_dir, tmp_path):
  blocks = marked_blocks(page.read_text())
  run_dir = tmp_path / "run"
  shutil.copytree(snippet_dir, run_dir)   # a copy: snippets may write into the work directory
  for name in LINKED:   # commands read as typed in a checkout: python eval.py --workdir workdirs/digits
    os.symlink(ROOT_PATH / name, run_dir / name)
  env = {**cpu.env(1), "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
         "GE2MST_HUGE_PAGES": "off", "MPLBACKEND": "Agg"}
  for lang, cmd in (("python", [sys.executable, "-"]), ("bash", ["bash", "-euo", "pipefail", "-s"])):
    if blocks[lang]:
      out = subprocess.run(cmd, input="\n".join(blocks[lang]), cwd=run_dir, env=env, capture_output=True, text=True)
      assert out.returncode == 0, f"{page.name}'s {lang} snippets failed:\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"


def heading_anchors(markdown: str) -> set[str]:
  """The anchors of a page's headings, as GitHub and MyST (`myst_heading_anchors`) make them."""
  anchors = set()
  for line in markdown.splitlines():
    if m := re.match(r"#{1,6} (.+)", line):
      anchors.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
  return anchors


def test_the_codes_references_to_the_mathematics_name_sections_of_docs_math():
  anchors = heading_anchors((DOCS / "math.md").read_text())
  refs, stale = [], []
  for path in [*ROOT_PATH.glob("*.py"), *(ROOT_PATH / d for d in ("ge2mst_jax", "configs", "benchmarks", "tests"))]:
    for f in ([path] if path.is_file() else path.rglob("*.py")):
      if f == pathlib.Path(__file__):
        continue
      text = f.read_text()
      refs += [(f.name, a) for a in re.findall(r"docs/math\.md#([\w\-]+)", text)]
      stale += [f.name for _ in re.findall(r"SPEC §", text)]
  assert not stale, f"references to SPEC (docs/math.md replaces it) in {stale}"
  assert refs, "no references to docs/math.md found: the pattern above went stale"
  assert not [r for r in refs if r[1] not in anchors], f"anchors missing from docs/math.md: {sorted(anchors)}"


def test_benchmarks_page_is_what_the_results_files_make():
  out = subprocess.run([sys.executable, "benchmarks/report.py", "--check"], cwd=ROOT, env=cpu.env(1),
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
