"""A 1 x 256 LSTM on Tiny Shakespeare (the default config, named).

  python scripts/train.py --config configs/lstm.py --workdir runs/lstm
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.cell = "lstm"
  return config
