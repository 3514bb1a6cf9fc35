"""What every script does around its one call into jaxrnn: parse flags, and turn bad input
into one line on stderr (`error: ...`, exit status 2) instead of a traceback."""

import functools
import sys
from typing import Callable, NoReturn

from absl import app, flags

from jaxrnn import UserError


def _fail(message: str) -> NoReturn:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _unknown_config_field(argv: list[str]) -> str | None:
  """The first `--config.<field>` override that names no field of configs/default.py."""
  from configs import default
  from jaxrnn import config as config_lib
  for arg in argv[1:]:
    if arg.startswith("--config."):
      name = arg[len("--config."):].split("=", 1)[0]
      try:
        config_lib.field(default.get_config(), name)
      except (AttributeError, KeyError):
        return name
  return None


def define_config(default_path: str) -> flags.FlagHolder:
  """`--config`, a config file, with `--config.<field>=value` overrides. ml_collections reads
  the overrides from sys.argv as soon as the flag is defined, so an unknown field fails here."""
  from ml_collections import config_flags
  try:
    return config_flags.DEFINE_config_file("config", default_path, "Path to a config file.",
                                           lock_config=True)
  except (AttributeError, KeyError):
    _fail(f"unknown config field {_unknown_config_field(sys.argv)}; configs/default.py lists "
          "every field")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag or config override reported in one line."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    if name := _unknown_config_field(argv):
      _fail(f"unknown config field {name}; configs/default.py lists every field")
    _fail(f"{e}; see --helpshort")


def run(main: Callable[[list[str]], None]) -> None:
  """`absl.app.run(main)`, where a UserError from main ends the script with one line."""
  @functools.wraps(main)
  def guarded(argv: list[str]) -> None:
    try:
      main(argv)
    except UserError as e:
      _fail(str(e))
  app.run(guarded, flags_parser=parse_flags)
