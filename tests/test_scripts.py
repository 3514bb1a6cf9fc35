"""Tests for the command lines in scripts/, run as a user would, in subprocesses."""

import json
import os
import pathlib
import platform
import subprocess
import sys

import jax
import pytest

from conftest import REPO_ROOT as REPO, run_script
from jaxrnn import kernels


def tiny_run(tiny_flags, workdir):
  """12 steps, a train row every 5 and a validation every 6."""
  return tiny_flags(workdir, train={"steps": 12, "log_every": 5, "eval_every": 6})


def test_train_writes_metrics_and_prints_final_json(tiny_flags, script, tmp_path):
  """A short run: metrics.jsonl rows with the documented fields, last stdout line is the result,
  run.json names the versions, the commit and the machine."""
  workdir = tmp_path / "run"
  proc = script("train.py", "--config", str(REPO / "configs" / "gru.py"),
                *tiny_run(tiny_flags, workdir))
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["step"] == 12 and result["perplexity"] == pytest.approx(2 ** result["bpc"])
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train_rows = [r for r in rows if r["split"] == "train"]
  val_rows = [r for r in rows if r["split"] == "val"]
  assert [r["step"] for r in train_rows] == [5, 10, 12]
  assert {"loss", "grad_norm", "lr", "tokens_per_s"} <= set(train_rows[0])
  assert [r["step"] for r in val_rows] == [6, 12]
  assert {"loss", "perplexity", "bpc", "tokens"} <= set(val_rows[0])
  assert val_rows[-1]["loss"] == pytest.approx(result["val_loss"])
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"]["cell"] == "gru" and saved["train"]["steps"] == 12
  assert json.loads((workdir / "vocab.json").read_text())["level"] == "char"
  run = json.loads((workdir / "run.json").read_text())
  assert run["jax"] == jax.__version__ and run["device_kind"] and run["devices"] == 1 and run["cpu"]
  git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                       text=True)
  if (REPO / ".git").exists() and git.returncode == 0:  # a checkout: the commit it runs from
    assert run["git_commit"].split("+")[0] == git.stdout.strip()
  else:
    assert run["git_commit"] is None


def test_unknown_cell_lists_valid_cells_without_traceback(tiny_flags, script, tmp_path):
  """--config.model.cell=nope exits 2 with the valid names and no Python traceback."""
  proc = script("train.py", *tiny_run(tiny_flags, tmp_path / "run"), "--config.model.cell=nope")
  assert proc.returncode == 2
  assert "rnn, gru, lstm" in proc.stderr and "Traceback" not in proc.stderr


def test_misspelt_field_is_named(tiny_flags, script, tmp_path):
  """A typo in a config field fails before training and names the field."""
  proc = script("train.py", *tiny_run(tiny_flags, tmp_path / "run"), "--config.model.hiden_size=3")
  assert proc.returncode != 0 and "hiden_size" in proc.stderr


def test_empty_corpus_is_a_one_line_error(tiny_flags, script, tmp_path):
  """An empty corpus file: exit 2, one line on stderr that says the file is empty."""
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  proc = script("train.py", *tiny_run(tiny_flags, tmp_path / "run"), f"--config.data.corpus={empty}")
  assert proc.returncode == 2 and proc.stderr.strip().endswith("is empty; give a file with some text in it")
  assert len(proc.stderr.strip().splitlines()) == 1


def test_sample_prints_only_the_texts(trained, script):
  """sample.py: stdout holds the samples (prefix first) separated by blank lines, nothing else."""
  args = [f"--workdir={trained}", "--prefix=the q", "--length=30", "--num_samples=2"]
  greedy = script("sample.py", *args, "--temperature=0")
  assert greedy.returncode == 0, greedy.stderr
  first, second = greedy.stdout.rstrip("\n").split("\n\n")
  assert first == second and first.startswith("the q") and len(first) == 5 + 30
  assert "step 12" in greedy.stderr
  seeded = [script("sample.py", *args, f"--seed={s}").stdout for s in (0, 0, 1)]
  assert seeded[0] == seeded[1] != seeded[2]


@pytest.mark.slow  # two training runs for a drawing; the tutorial test draws a plot too
def test_plot_draws_two_runs_and_refuses_an_empty_workdir(tiny_flags, script, tmp_path):
  """plot.py: a real PNG for two tiny runs; a workdir without metrics is a clear error."""
  runs = [tmp_path / "a", tmp_path / "b"]
  for run in runs:
    assert script("train.py", *tiny_run(tiny_flags, run)).returncode == 0
  png = tmp_path / "curves.png"
  proc = script("plot.py", f"--workdir={runs[0]}", str(runs[1]), f"--out={png}")
  assert proc.returncode == 0, proc.stderr
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
  (tmp_path / "empty").mkdir()
  bad = script("plot.py", f"--workdir={tmp_path / 'empty'}", f"--out={tmp_path / 'x.png'}")
  assert bad.returncode == 2 and "no metrics" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow  # the classifier's script run end to end; tests/test_tasks_classify.py stays fast
def test_classify_config_trains_and_eval_reads_the_test_split(script, tmp_path):
  """configs/classify_rt.py (shrunk): the last stdout line has val_accuracy; validation rows have
  accuracy and loss and no test rows are written; eval.py --split test prints accuracy and
  loss; sample.py refuses the run."""
  workdir = tmp_path / "run"
  proc = script("train.py", "--config", str(REPO / "configs" / "classify_rt.py"),
                f"--workdir={workdir}", "--config.model.hidden_size=8",
                "--config.model.embed_dim=8", "--config.data.max_vocab=300",
                "--config.data.batch_size=8", "--config.train.steps=4",
                "--config.train.eval_every=2", "--config.train.log_every=2")
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["step"] == 4 and 0.0 <= result["val_accuracy"] <= 1.0 and result["val_loss"] > 0
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  val_rows = [r for r in rows if r["split"] == "val"]
  assert [r["step"] for r in val_rows] == [2, 4] and {"accuracy", "loss"} <= set(val_rows[0])
  assert not [r for r in rows if r["split"] == "test"]
  proc = script("eval.py", f"--workdir={workdir}", "--split=test", "--step=best")
  assert proc.returncode == 0, proc.stderr
  evaluated = json.loads(proc.stdout)
  assert evaluated["split"] == "test" and evaluated["examples"] == 1066
  assert 0.0 <= evaluated["accuracy"] <= 1.0 and evaluated["loss"] > 0
  mismatched = script("eval.py", f"--workdir={workdir}", "--corpus=tinyshakespeare")
  assert mismatched.returncode == 2 and "labelled sentence corpus" in mismatched.stderr
  refused = script("sample.py", f"--workdir={workdir}")
  assert refused.returncode == 2 and "sampling needs a language model" in refused.stderr
  assert "Traceback" not in refused.stderr


@pytest.fixture(scope="module")
def trained(tiny_flags, tmp_path_factory):
  """A finished 12-step tiny run to point eval.py and sample.py at."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  assert run_script("train.py", *tiny_run(tiny_flags, workdir)).returncode == 0
  return workdir


@pytest.mark.parametrize("case", [
    "workdir is a file", "checkpoints is a file", "empty workdir", "unknown field",
    "negative batch", "too many eval lanes", "whitespace corpus", "eval step abc",
    "sample step abc", "top_k past the vocabulary", "negative beam", "beam with temperature",
    "beam past the continuations",
])
def test_bad_input_is_one_line_error(case, tiny_flags, trained, tmp_path):
  """Each bad input: `error: ...` on stderr as one line naming what to change, exit 2, no
  traceback."""
  run = tmp_path / "run"
  flags = tiny_run(tiny_flags, run)
  if case == "workdir is a file":
    run.write_text("")
    args, expected = ("train.py", *flags), "is a file, not a directory"
  elif case == "checkpoints is a file":
    run.mkdir()
    (run / "checkpoints").write_text("")
    args, expected = ("train.py", *flags), "its checkpoints"
  elif case == "empty workdir":
    args, expected = ("train.py", *flags, "--workdir="), "--workdir is empty"
  elif case == "unknown field":
    args, expected = ("train.py", *flags, "--config.model.foo=1"), "unknown config field model.foo"
  elif case == "negative batch":
    args, expected = ("train.py", *flags, "--config.data.batch_size=-4"), "data.batch_size must be"
  elif case == "too many eval lanes":
    args, expected = ("train.py", *flags, "--config.train.eval_lanes=100000"), "use at most"
  elif case == "whitespace corpus":
    spaces = tmp_path / "spaces.txt"
    spaces.write_text(" " * 20_000)
    args, expected = ("train.py", *flags, f"--config.data.corpus={spaces}"), "only whitespace"
  elif case in ("eval step abc", "sample step abc"):
    args = (case.split()[0] + ".py", f"--workdir={trained}", "--step=abc")
    expected = "--step must be a step number"
  elif case == "top_k past the vocabulary":
    args, expected = ("sample.py", f"--workdir={trained}", "--top_k=1000"), "more than the vocab"
  elif case == "negative beam":
    args, expected = ("sample.py", f"--workdir={trained}", "--beam=-2"), "--beam must be >= 1"
  elif case == "beam with temperature":
    args = ("sample.py", f"--workdir={trained}", "--beam=2", "--temperature=0.5")
    expected = "--temperature shape random sampling"
  else:
    args = ("sample.py", f"--workdir={trained}", "--beam=1000", "--length=1")
    expected = "continuations of --length 1"
  proc = run_script(*args)
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
  assert not run.is_dir() or not (run / "metrics.jsonl").exists()


def test_a_prefix_outside_the_vocabulary_is_named(trained):
  """Symbols the run never saw are named in a warning, and still read as <unk>."""
  proc = run_script("sample.py", f"--workdir={trained}", "--prefix=the éß", "--length=5")
  assert proc.returncode == 0, proc.stderr
  assert "outside the run's vocabulary, read as <unk>: 'é', 'ß'" in proc.stderr


def test_sample_beam_prints_the_best_sequences_and_their_log_probabilities(trained):
  """sample.py --beam 3: three different texts of prefix + length on stdout, best first, their
  log-probabilities (falling) on stderr."""
  proc = run_script("sample.py", f"--workdir={trained}", "--prefix=the", "--length=12",
                    "--beam=3")
  assert proc.returncode == 0, proc.stderr
  texts = proc.stdout.rstrip("\n").split("\n\n")
  assert len(texts) == len(set(texts)) == 3
  assert all(t.startswith("the") and len(t) == 3 + 12 for t in texts)
  line = next(l for l in proc.stderr.splitlines() if l.startswith("log-probabilities"))
  log_probs = [float(x) for x in line.split(": ")[1].split(", ")]
  assert len(log_probs) == 3 and log_probs == sorted(log_probs, reverse=True) and log_probs[0] < 0


CONFIG_FILES = {
    "missing file": (None, "--config {path}: no such file (configs/ holds "),
    "syntax error": ("def get_config(:\n  pass\n", "--config {path}, line 1: invalid syntax"),
    "an int": ("def get_config():\n  return 3\n",
               "--config {path}: get_config() returned int, not an ml_collections.ConfigDict"),
    "no get_config": ("x = 1\n", "--config {path} has no get_config() function"),
}


@pytest.mark.parametrize("case", CONFIG_FILES)
def test_a_bad_config_file_is_one_line_naming_the_file(case, tmp_path):
  """A config file that is missing, does not parse (line named), returns no ConfigDict or has
  no get_config: exit 2, one line naming the file, no traceback."""
  source, expected = CONFIG_FILES[case]
  path = tmp_path / "my_config.py"
  if source is not None:
    path.write_text(source)
  proc = run_script("train.py", f"--config={path}", f"--workdir={tmp_path / 'run'}")
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(lines) == 1
  assert lines[0].startswith(f"error: {expected.format(path=path)}"), lines
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["tensorboard without tensorboardX", "corpus under one batch"])
def test_a_run_refused_before_training_creates_nothing(case, tiny_config, tmp_path, monkeypatch):
  """Refusals that need the data or the environment, not only the config, come before the
  workdir is made: no lock, config.json or checkpoints/ left behind."""
  from jaxrnn import UserError, train
  if case == "tensorboard without tensorboardX":
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    config, message = tiny_config(train={"tensorboard": True}), "needs tensorboardX"
  else:
    short = tmp_path / "short.txt"
    short.write_text("to be or not to be, that is the question: whether 'tis noble\n")
    config = tiny_config(data={"corpus": str(short), "batch_size": 8, "seq_len": 8})
    message = "shorter than"
  with pytest.raises(UserError, match=message):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_plot_draws_a_classifier_run(script, tmp_path):
  """plot.py on a classifier's workdir (validation accuracy and loss, no perplexity) draws its
  accuracy and training loss."""
  run = tmp_path / "rt"
  run.mkdir()
  (run / "config.json").write_text(json.dumps(
      {"task": "classify", "model": {"cell": "lstm", "num_layers": 1, "hidden_size": 128}}))
  (run / "metrics.jsonl").write_text("".join(
      json.dumps(row) + "\n" for step in (10, 20, 30) for row in (
          {"step": step, "split": "train", "loss": 0.7 - step / 100, "elapsed_s": step},
          {"step": step, "split": "val", "loss": 0.6, "accuracy": 0.5 + step / 100,
           "examples": 1066, "elapsed_s": step})))
  png = tmp_path / "curves.png"
  proc = script("plot.py", f"--workdir={run}", f"--out={png}")
  assert proc.returncode == 0, proc.stderr
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_of_a_classifier_and_without_matplotlib_is_one_line(tmp_path):
  """plot.py without matplotlib names the [plot] extra in one line (exit 2); runs of two
  tasks are refused in one line; a classifier's rows (accuracy, no perplexity) pass the
  checks that come before drawing."""
  for name, task, row in (("lm", "lm", {"perplexity": 5.0}),
                          ("rt", "classify", {"accuracy": 0.7})):
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.json").write_text(json.dumps(
        {"task": task, "model": {"cell": "lstm", "num_layers": 1, "hidden_size": 8}}))
    (tmp_path / name / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "split": "train", "loss": 1.0}) + "\n"
        + json.dumps({"step": 1, "split": "val", "loss": 1.0, **row}) + "\n")
  block = ("import runpy, sys; sys.modules['matplotlib'] = None; "
           "sys.argv = ['plot.py'] + sys.argv[1:]; "
           "runpy.run_path('scripts/plot.py', run_name='__main__')")
  for args, expected in (([f"--workdir={tmp_path / 'rt'}"], "pip install -e '.[plot]'"),
                         ([f"--workdir={tmp_path / 'rt'}", str(tmp_path / "lm")],
                          "different tasks")):
    proc = subprocess.run([sys.executable, "-c", block, *args, f"--out={tmp_path / 'x.png'}"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr


_FAULTS_PER_STEP = """
import functools, resource, sys
import jax, jax.numpy as jnp, numpy as np
from configs import default
from jaxrnn import cli, model, optim, train
config = default.get_config()  # scripts/bench.py's defaults: 2 x 256 LSTM, batch 32 x 64, Adam
config.model.update(num_layers=2, hidden_size=256, embed_dim=256, one_hot=False, dropout=0.0)
config.data.update(batch_size=32, seq_len=64)
config.train.update(optimizer="adam", schedule="constant", warmup_steps=0)
tx = optim.make_optimizer(config.train)
state = [train.create_train_state(config, 65, tx)]
step = jax.jit(functools.partial(train.train_step, config=config, tx=tx), donate_argnums=(0,))
ids = np.random.default_rng(0).integers(0, 65, (32, 65), dtype=np.int32)
batch = {"inputs": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:])}
zeros = model.initial_carry(config.model, 32)
def faults_per_step(steps=4):
  for _ in range(2):
    state[0] = jax.block_until_ready(step(state[0], batch, zeros)[0])
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(steps):
    state[0] = jax.block_until_ready(step(state[0], batch, zeros)[0])
  return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps
before = faults_per_step()
kept = cli.keep_freed_memory()
# Each of XLA's threads that allocated fills its own heap once (more of them on a busy machine).
print(before, kept, min(faults_per_step() for _ in range(5)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc (Linux) only")
def test_scripts_keep_freed_memory_so_a_training_step_touches_no_new_pages():
  """`cli.keep_freed_memory()`, what every script does first: a training step at the bench
  defaults (50-57 MB of fresh pages per step from glibc before it, unless the kernel backs
  memory with huge pages anyway) then reuses what the last steps freed. A user's own malloc
  tuning is left alone."""
  proc = subprocess.run([sys.executable, "-c", _FAULTS_PER_STEP], capture_output=True,
                        text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr
  before, kept, after = proc.stdout.split()
  assert kept == "True" and float(after) < 1000, proc.stdout
  huge_pages = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
  if not (huge_pages.exists() and "[always]" in huge_pages.read_text()):
    assert float(before) > 8000, proc.stdout
  proc = subprocess.run([sys.executable, "-c", "from jaxrnn import cli; "
                         "print(cli.keep_freed_memory())"], capture_output=True, text=True,
                        cwd=REPO, timeout=60, env={**os.environ, "MALLOC_ARENA_MAX": "2"})
  assert proc.stdout.strip() == "False", proc.stderr


_FAULTS_PER_CALL = """
import resource, sys
from jaxrnn import cli
cli.keep_freed_memory()
if sys.argv[1] == "inline":
  cli.run_inline()
import jax, jax.numpy as jnp
x = jnp.ones((1 << 25,), jnp.float32)  # 128 MB; the call's scratch holds two such sums
f = jax.jit(lambda x: (jnp.cumsum(x) * jnp.cumsum(x[::-1])).sum())
for _ in range(2):
  f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
  f(x).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc (Linux) only")
def test_run_inline_keeps_a_calls_large_scratch_between_calls():
  """`cli.run_inline()`, what every script does first: a call whose scratch outgrows a thread's
  64 MB malloc heap faults its pages in afresh on every call when dispatched to XLA's thread,
  and reuses the main heap's when run on the calling thread (measured here: 131,000 against
  33,000 faults a call)."""
  faults = {}
  for mode in ("dispatched", "inline"):
    proc = subprocess.run([sys.executable, "-c", _FAULTS_PER_CALL, mode], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    faults[mode] = float(proc.stdout.split()[-1])
  assert faults["inline"] < 0.5 * faults["dispatched"], faults


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc (Linux) only")
def test_huge_page_env_sets_the_tunables_only_where_they_change_something():
  """GLIBC_TUNABLES=MALLOC_TUNABLES (huge pages, and keep_freed_memory's two settings) where
  the kernel gives huge pages on request; never over the user's own malloc tuning, opt-out, or
  a process that was restarted already."""
  from jaxrnn import cli
  if platform.libc_ver()[0] != "glibc":
    assert cli.huge_page_env({}, "always") is None
    return
  for mode in ("always", "madvise"):
    assert cli.huge_page_env({"PATH": "/bin"}, mode) == {
        "PATH": "/bin", "GLIBC_TUNABLES": cli.MALLOC_TUNABLES, "JAXRNN_HUGE_PAGES": "done"}
  assert cli.huge_page_env({}, "never") is None
  for users in ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, {"MALLOC_ARENA_MAX": "2"},
                {"JAXRNN_HUGE_PAGES": "0"}, cli.huge_page_env({}, "always")):
    assert cli.huge_page_env(users, "madvise") is None, users
  tunables = dict(t.split("=") for t in cli.MALLOC_TUNABLES.split(":"))
  assert tunables == {"glibc.malloc.hugetlb": "1", "glibc.malloc.mmap_max": "0",
                      "glibc.malloc.trim_threshold": "2147483647"}


_RESTART = """
import os, sys
print("start", os.getpid(), os.environ.get("GLIBC_TUNABLES"))  # unflushed: the restart flushes
from jaxrnn import cli
cli.restart_with_huge_pages(__file__)
print("after", os.getpid(), os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], sys.flags.dev_mode,
      "jax" in sys.modules)
"""


def test_a_script_restarts_itself_once_where_the_host_gives_huge_pages(tmp_path):
  """restart_with_huge_pages: where this host's kernel and glibc give huge pages, the script
  runs again once (the same pid, interpreter options and arguments), with the tunables set and
  before jax is imported, and gives its children the environment it was given; elsewhere, or
  run as `-c` code, it goes on as it was."""
  from jaxrnn import cli
  script = tmp_path / "restart.py"
  script.write_text(_RESTART)
  env = {k: v for k, v in os.environ.items() if k not in (
      "GLIBC_TUNABLES", "JAXRNN_HUGE_PAGES", "PYTHONUNBUFFERED") and not k.startswith("MALLOC_")}
  mode = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
  version = platform.libc_ver()[1].split(".")
  restarts = (platform.libc_ver()[0] == "glibc" and tuple(map(int, version)) >= (2, 35)
              and mode.exists() and "[never]" not in mode.read_text())
  proc = subprocess.run([sys.executable, "-X", "dev", str(script), "--flag=1"],
                        capture_output=True, text=True, cwd=REPO, timeout=60, env=env)
  assert proc.returncode == 0, proc.stderr
  lines = [line.split(" ", 3) for line in proc.stdout.splitlines()]
  pid = lines[0][1]
  if restarts:
    assert [line[0] for line in lines] == ["start", "start", "after"], proc.stdout
    assert lines[0][2] == "None" and lines[1][1] == pid == lines[2][1], proc.stdout
    assert lines[1][2] == cli.MALLOC_TUNABLES and lines[2][2] == "None", proc.stdout
  else:
    assert [line[0] for line in lines] == ["start", "after"], proc.stdout
    assert lines[1][1] == pid and lines[1][2] == "None", proc.stdout
  assert lines[-1][3] == "['--flag=1'] True False", proc.stdout
  code = subprocess.run([sys.executable, "-c", _RESTART.replace("__file__", "'-c'")],
                        capture_output=True, text=True, cwd=REPO, timeout=60, env=env)
  assert [line.split()[0] for line in code.stdout.splitlines()] == ["start", "after"], code.stderr


def _plot_runs(tmp_path, blocks: dict[str, str]) -> list[pathlib.Path]:
  """A workdir per name in `blocks`: an lstm 2 x 8 LM in that model.block, two rows of metrics."""
  runs = []
  for name, block in blocks.items():
    run = tmp_path / name
    run.mkdir()
    (run / "config.json").write_text(json.dumps(
        {"task": "lm", "model": {"cell": "lstm", "block": block, "num_layers": 2,
                                 "hidden_size": 8}}))
    (run / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "split": "train", "loss": 1.0}) + "\n"
        + json.dumps({"step": 1, "split": "val", "loss": 1.0, "perplexity": 2.7}) + "\n")
    runs.append(run)
  return runs


def test_plot_writes_into_new_and_existing_directories(script, tmp_path):
  """plot.py --out: a path in directories not there yet creates them; an existing directory
  takes curves.png; either way stderr names the file written."""
  run, = _plot_runs(tmp_path, {"a": "stack"})
  for out, written in ((tmp_path / "new" / "sub" / "c.png", tmp_path / "new" / "sub" / "c.png"),
                       (tmp_path / "a", tmp_path / "a" / "curves.png")):
    proc = script("plot.py", f"--workdir={run}", f"--out={out}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"wrote {written}"
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert not (tmp_path / "a.png").exists()


def test_plot_legend_names_a_block_other_than_stack(tmp_path):
  """plot.py labels a run with its model.block unless that is the default stack, so a
  residual LSTM does not read as a stack of LSTMs."""
  runs = _plot_runs(tmp_path, {"a": "stack", "b": "residual"})
  legend = ("import runpy, sys; from matplotlib import figure; save = figure.Figure.savefig; "
            "figure.Figure.savefig = lambda fig, *a, **k: (print([t.get_text() for t in "
            "fig.axes[0].get_legend().get_texts()]), save(fig, *a, **k)); "
            "sys.argv = ['plot.py'] + sys.argv[1:]; "
            "runpy.run_path('scripts/plot.py', run_name='__main__')")
  proc = subprocess.run([sys.executable, "-c", legend, f"--workdir={runs[0]}", str(runs[1]),
                         f"--out={tmp_path / 'x.png'}"], capture_output=True, text=True,
                        cwd=REPO, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == "['lstm 2x8 (a)', 'lstm residual 2x8 (b)']"


def test_huge_pages_take_what_a_user_would_type():
  """JAXRNN_HUGE_PAGES: 1 / yes / on (any case) or unset restart, 0 / no / off do not, and
  anything else is a one-line error naming the variable."""
  from jaxrnn import UserError, cli
  wanted = {v: cli._huge_pages_wanted({"JAXRNN_HUGE_PAGES": v})
            for v in ("1", "yes", "On", "TRUE", "0", "no", "off", "false", "done")}
  assert wanted == {"1": True, "yes": True, "On": True, "TRUE": True, "0": False, "no": False,
                    "off": False, "false": False, "done": False}
  assert cli._huge_pages_wanted({})
  with pytest.raises(UserError, match="^JAXRNN_HUGE_PAGES must be 1 or 0 .*, got 'maybe'$"):
    cli._huge_pages_wanted({"JAXRNN_HUGE_PAGES": "maybe"})


def test_the_restart_leaves_wrapper_programs_alone():
  """Arguments before the script that hold a program (coverage run, a debugger's launcher) are
  not restarted under: the restart would run the wrapper again; interpreter options are."""
  from jaxrnn import cli
  assert not cli._wrapped([]) and not cli._wrapped(["-X", "dev", "-W", "ignore", "-u", "-O"])
  assert cli._wrapped(["/usr/bin/coverage", "run"]) and cli._wrapped(["-u", "memray", "run"])


# What Windows and macOS answer where Linux has /proc, glibc and Intel's oneDNN wheel, as a
# sitecustomize.py run before the script: no /proc, no oneDNN wheel (its platform marker is
# Linux), and ctypes.CDLL(None) raising (Windows) or a C library without glibc's functions.
_NOT_LINUX = """
import builtins, ctypes, importlib.metadata, sys
_open, _distribution = builtins.open, importlib.metadata.distribution
def _no_proc(file, *a, **k):
  if str(file).startswith(("/proc/", "/sys/")): raise FileNotFoundError(2, "No such file", file)
  return _open(file, *a, **k)
def _no_onednn(name):
  if name.startswith("onednn"): raise importlib.metadata.PackageNotFoundError(name)
  return _distribution(name)
builtins.open, importlib.metadata.distribution = _no_proc, _no_onednn
class _CDLL(ctypes.CDLL):
  def __init__(self, name, *a, **k):
    if name is None and WINDOWS:
      raise TypeError("expected str, bytes or os.PathLike, not NoneType")
    super().__init__("libm.so.6" if name is None else name, *a, **k)  # no malloc functions
ctypes.CDLL = _CDLL
if WINDOWS:
  sys.modules["fcntl"] = None
"""


@pytest.mark.parametrize("system", ["Windows", "macOS"])
def test_jaxrnn_trains_where_linux_answers_are_missing(system, tiny_flags, tmp_path):
  """Windows and macOS, simulated (no /proc nor oneDNN wheel; the C library not openable by
  name, or without glibc's malloc functions; Windows without fcntl): train.py starts, `auto`
  falls back to XLA saying once why each kernel is missing, and the run trains and saves."""
  (tmp_path / "sitecustomize.py").write_text(f"WINDOWS = {system == 'Windows'}\n{_NOT_LINUX}")
  from conftest import run_script
  proc = run_script("train.py", *tiny_flags(tmp_path / "run", model={"hidden_size": 64}), env={
      "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])})
  assert proc.returncode == 0, proc.stderr
  assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == 5
  notes = [line for line in proc.stderr.splitlines() if "model.impl=auto runs" in line]
  onednn_why = ("the onednn-cpu-gomp package (libdnnl.so.3) is not installed"
                if kernels._extension("_onednn_rnn") else kernels.unavailable("onednn"))  # unbuilt
  assert notes == [  # each kernel it lacks said once, with why
      f"note: model.impl=auto runs the next fastest path, not onednn: {onednn_why}",
      "note: model.impl=auto runs the next fastest path, not core: jaxrnn's core needs an "
      "x86-64 CPU with AVX-512 or AVX2 and FMA"], proc.stderr
  assert ("note: this platform has no file locks" in proc.stderr) == (system == "Windows")


def test_a_reader_that_goes_away_stops_no_run(tiny_flags, tmp_path):
  """`train.py ... 2>&1 | head -1` trains to the end and saves; `sample.py ... | head -3` ends
  with status 0 and no traceback, as Unix tools do."""
  workdir = tmp_path / "run"
  flags = tiny_flags(workdir, train={"steps": 30, "log_every": 1, "ckpt_every": 10})
  script = lambda name, *args: " ".join([sys.executable, str(REPO / "scripts" / name),
                                         *(f"'{a}'" for a in args)])
  train = subprocess.run(["bash", "-c", f"{script('train.py', *flags)} 2>&1 | head -1; "
                          "exit ${PIPESTATUS[0]}"], capture_output=True, text=True, timeout=300,
                         cwd=REPO)
  assert train.returncode == 0 and len(train.stdout.splitlines()) == 1
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert rows[-1]["step"] == 30 and (workdir / "checkpoints" / "30").is_dir()
  samples = script("sample.py", f"--workdir={workdir}", "--num_samples=200", "--length=50")
  sample = subprocess.run(["bash", "-c", f"{samples} 2>{tmp_path / 'err'} | head -3; "
                           "exit ${PIPESTATUS[0]}"], capture_output=True, text=True, timeout=300,
                          cwd=REPO)
  assert sample.returncode == 0 and len(sample.stdout.splitlines()) == 3
  assert "Traceback" not in (tmp_path / "err").read_text()
