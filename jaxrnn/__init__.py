"""jaxrnn: recurrent language models as pure JAX functions."""

__version__ = "0.1.0"


class UserError(ValueError):
  """Bad input from a user (config, corpus, workdir): scripts print it as one line and exit 2."""
