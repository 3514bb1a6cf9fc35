"""docs/tutorial.md runs as written: its Python blocks in order, in one namespace, from a scratch
directory; the text block after a Python block is what that block prints, compared exactly
unless it is marked `nocheck` (output that depends on the machine, which the code checks with
`assert` instead)."""

import contextlib
import io
import re

from conftest import REPO_ROOT

TUTORIAL = REPO_ROOT / "docs" / "tutorial.md"
FENCE = re.compile(r"^```(\w*)[ \t]*(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def blocks() -> list[tuple[str, str, str]]:
  """(language, flag, body) of each fenced block of the tutorial, in order."""
  return FENCE.findall(TUTORIAL.read_text())


def test_the_tutorial_runs_and_prints_what_it_shows(tmp_path, monkeypatch):
  """Every Python block runs; every checked output block equals what its block printed; the
  perplexity plot the page embeds is drawn."""
  monkeypatch.chdir(tmp_path)
  (tmp_path / "docs").mkdir()
  namespace, printed, checked = {"__name__": "tutorial"}, None, 0
  for i, (language, flag, body) in enumerate(blocks()):
    if language == "python":
      with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(compile(body, f"{TUTORIAL.name} block {i}", "exec"), namespace)
      printed = out.getvalue()
    elif language == "text" and flag != "nocheck":
      assert printed == body, f"block {i} printed:\n{printed}\nthe tutorial shows:\n{body}"
      checked += 1
  assert checked >= 3
  assert (tmp_path / "docs" / "tutorial_perplexity.png").read_bytes()[:4] == b"\x89PNG"
