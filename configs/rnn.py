"""A 1 x 256 tanh RNN on Tiny Shakespeare, with a lower learning rate.

  python scripts/train.py --config configs/rnn.py --workdir runs/rnn
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.cell = "rnn"
  config.train.lr = 2e-3
  return config
