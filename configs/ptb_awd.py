"""AWD-LSTM's regularized 3-layer LSTM (Merity et al. 2018) on word-level Penn Treebank.

  python scripts/train.py --config configs/ptb_awd.py --workdir runs/ptb_awd
  python scripts/eval.py --workdir runs/ptb_awd --step best --split test

As AWD-LSTM's PTB command (`main.py --batch_size 20 --data data/penn --dropouti 0.4
--dropouth 0.25 --seed 141 --epoch 500`, with its defaults): LSTM 1150 -> 1150 -> 400, tied
400-wide embedding and softmax (24M parameters), locked dropout 0.4 on the embedding output,
0.25 between layers and 0.4 before the softmax, embedding dropout 0.1, weight drop 0.5 on each
W_hh, AR 2 and TAR 1, SGD at lr 30 (on a per-token mean, as jaxrnn's) with gradient norm
clipped at 0.25, NT-ASGD with a non-monotone interval of 5 validations, one per epoch.
Where it differs:
  - 40 epochs, not 500 (and no finetuning stage): the budget is about 8 minutes of one GPU, so
    this reaches well short of the paper's 58.8 (60.7 / 58.8 is its figure after 500 epochs);
  - a fixed BPTT length of 70 (AWD draws it around 70 per batch), batch 20;
  - no L2 weight decay (AWD: 1.2e-6 with SGD; jaxrnn has weight decay for adamw only);
  - the embedding N(0, 0.06^2), not U(-0.1, 0.1) (the same spread); LSTMs as PyTorch's.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.update(cell="lstm", num_layers=3, hidden_size=1150, embed_dim=400,
                      embed_scale=0.06, tie_embedding=True, locked_dropout=True, dropout=0.4,
                      dropout_in=0.4, dropout_hidden=0.25, dropout_out=0.4, embed_dropout=0.1,
                      weight_drop=0.5, ar=2.0, tar=1.0)
  config.data.update(corpus="ptb", tokens="word", batch_size=20, seq_len=70)
  config.train.update(unit="epochs", steps=40, optimizer="sgd", lr=30.0, clip_norm=0.25,
                      asgd_patience=5, eval_every=1, ckpt_every=1, log_every=100)
  return config
