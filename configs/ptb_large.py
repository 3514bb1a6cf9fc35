"""Zaremba et al. 2014's large LSTM on word-level Penn Treebank (their test perplexity: 78.4).

  python scripts/train.py --config configs/ptb_large.py --workdir runs/ptb_large
  python scripts/eval.py --workdir runs/ptb_large --step best --split test

Their recipe, as here: 2 x 1500 LSTM, embedding 1500, dropout 0.65 on the non-recurrent
connections, every parameter U(-0.04, 0.04), SGD at lr 1 for 14 epochs, then divided by 1.15
every epoch, 55 epochs, batch 20 x 35, gradient norm clipped at 10. Their loss sums the 35
unrolled steps and averages over the batch; jaxrnn's is the mean over all tokens, so their lr 1
is lr 35 here and their clip 10 is 10 / 35. The reported test perplexity is the
best-validation checkpoint's (theirs: the last epoch's). Meant for one GPU (about 51M
training tokens).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.update(cell="lstm", num_layers=2, hidden_size=1500, embed_dim=1500, dropout=0.65,
                      init_scale=0.04)
  config.data.update(corpus="ptb", tokens="word", batch_size=20, seq_len=35)
  config.train.update(unit="epochs", steps=55, optimizer="sgd", lr=35.0, clip_norm=10 / 35,
                      schedule="step", decay_factor=1 / 1.15, decay_after=14, eval_every=1,
                      ckpt_every=1, log_every=200)
  return config
