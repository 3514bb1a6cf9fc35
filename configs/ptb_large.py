"""Zaremba et al. 2014's large LSTM on word-level Penn Treebank (their test perplexity: 78.4).

  python scripts/train.py --config configs/ptb_large.py --workdir runs/ptb_large
  python scripts/eval.py --workdir runs/ptb_large --step best --split test

The medium recipe (`ptb_medium.py`: SGD, step decay by epochs, batch 20 x 35, loss scale
translated) at their large settings: 2 x 1500 LSTM, embedding 1500, dropout 0.65, every
parameter U(-0.04, 0.04), lr 1 (35 here) for 14 epochs, then divided by 1.15 every epoch, 55
epochs, gradient norm clipped at 10 (10 / 35 here). The reported test perplexity is the
best-validation checkpoint's (theirs: the last epoch's). Meant for one GPU (about 51M
training tokens).
"""

from configs import ptb_medium


def get_config():
  config = ptb_medium.get_config()
  config.model.update(hidden_size=1500, embed_dim=1500, dropout=0.65, init_scale=0.04)
  config.train.update(steps=55, clip_norm=10 / 35, decay_factor=1 / 1.15, decay_after=14)
  return config
