"""Zaremba et al. 2014's small LSTM on word-level Penn Treebank (their test perplexity: 114.5).

  python scripts/train.py --config configs/ptb_small.py --workdir runs/ptb_small
  python scripts/eval.py --workdir runs/ptb_small --step best --split test

Their recipe: 2 x 200 LSTM, embedding 200, no dropout, every parameter U(-0.1, 0.1), SGD at
lr 1 for 4 epochs then halved every epoch, 13 epochs, batch 20 x 20, gradient norm clipped at
5. Kept here: the sizes, no dropout, the init, SGD with that schedule. Changed, to fit 30
minutes of a 2-core CPU (measured: test 109.1, val 112.7, 25 min 29 s; docs/results.md):
  - the embedding and softmax are tied (Press & Wolf 2017): 2.65M parameters, not 4.6M;
  - 9 epochs, not 13 (validation was best at epoch 5 and flat after it), at batch 20 x 35;
  - the loss scale: theirs sums the unrolled steps and averages over the batch, jaxrnn's is
    the mean over all tokens, so their lr 1 is lr 35 here (35 steps) and their clip 5 is 5 / 35.
The reported test perplexity is the best-validation checkpoint's (theirs: the last epoch's).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.update(cell="lstm", num_layers=2, hidden_size=200, embed_dim=200, init_scale=0.1,
                      tie_embedding=True)
  config.data.update(corpus="ptb", tokens="word", batch_size=20, seq_len=35)
  config.train.update(unit="epochs", steps=9, optimizer="sgd", lr=35.0, clip_norm=5 / 35,
                      schedule="step", decay_factor=0.5, decay_after=4, eval_every=1,
                      ckpt_every=1, log_every=200)
  return config
