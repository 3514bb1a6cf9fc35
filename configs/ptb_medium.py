"""Zaremba et al. 2014's medium LSTM on word-level Penn Treebank (their test perplexity: 82.7).

  python scripts/train.py --config configs/ptb_medium.py --workdir runs/ptb_medium
  python scripts/eval.py --workdir runs/ptb_medium --step best --split test

Their recipe, as here: 2 x 650 LSTM, embedding 650, dropout 0.5 on the non-recurrent
connections (embedding output, between layers, before the softmax), every parameter
U(-0.05, 0.05), SGD at lr 1 for 6 epochs, then divided by 1.2 every epoch, 39 epochs, batch
20 x 35, gradient norm clipped at 5. Their loss sums the 35 unrolled steps and averages over
the batch; jaxrnn's is the mean over all tokens, so their lr 1 is lr 35 here and their clip 5
is 5 / 35. Where it differs: one evaluation and checkpoint per epoch, as theirs, but the
reported test perplexity is the best-validation checkpoint's (theirs: the last epoch's).
Meant for one GPU (about 36M training tokens); a 2-core CPU trains about 1.1K tokens/s.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.update(cell="lstm", num_layers=2, hidden_size=650, embed_dim=650, dropout=0.5,
                      init_scale=0.05)
  config.data.update(corpus="ptb", tokens="word", batch_size=20, seq_len=35)
  config.train.update(unit="epochs", steps=39, optimizer="sgd", lr=35.0, clip_norm=5 / 35,
                      schedule="step", decay_factor=1 / 1.2, decay_after=6, eval_every=1,
                      ckpt_every=1, log_every=200)
  return config
