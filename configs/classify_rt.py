"""Sentence polarity (rt-polarity) with a bidirectional 1 x 128 LSTM over word embeddings.

  python scripts/train.py --config configs/classify_rt.py --workdir runs/rt_bilstm
  python scripts/eval.py --workdir runs/rt_bilstm --split test

About 1-2 minutes on two CPU cores (400 steps, about 3 epochs). Test accuracy 77.7 ± 0.8%
over training seeds 0, 1, 2 (validation 77.6 ± 0.5%), every hyperparameter chosen on the
validation split. Swap the cell with `--config.model.cell=gru --config.model.bidirectional=False`.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.task = "classify"
  config.model.update(cell="lstm", bidirectional=True, hidden_size=128, embed_dim=128,
                      embed_scale=0.1, pooling="last", dropout=0.5)
  config.data.update(corpus="rt-polarity", batch_size=64, seq_len=64, max_vocab=10000)
  config.train.update(steps=400, lr=3e-3, schedule="cosine", eval_every=50, ckpt_every=50,
                      log_every=10, eval_lanes=256)
  return config
