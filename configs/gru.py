"""A 1 x 256 GRU on Tiny Shakespeare.

  python scripts/train.py --config configs/gru.py --workdir runs/gru
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.cell = "gru"
  return config
