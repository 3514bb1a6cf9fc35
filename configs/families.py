"""The recurrent families on Tiny Shakespeare at equal size and tokens (issue 25's comparison).

  python scripts/train.py --config configs/families.py:gru --workdir runs/families_gru

Rows (the argument after the colon), about 1M parameters each with Tiny Shakespeare's
66-symbol vocabulary; blocks without an MLP (xLSTM's mLSTM, Mamba) take twice the layers, as
their authors count them against a Transformer's:

  lstm       a 2 x 276 LSTM stack (64-wide embedding)                       1,009,482
  gru        a 2 x 320 GRU stack (64-wide embedding)                        1,011,010
  residual   4 residual blocks of 120 around an LSTM, gated MLP 3x          1,001,466
  hawk       4 Hawk blocks of 140 (RG-LRU, 4 heads), gated MLP 3x           1,009,886
  griffin    4 Griffin blocks of 144 (layer 2 local attention, window 128)  1,045,362
  xlstm      8 mLSTM blocks of 128 (inner 256, 4 heads)                       892,674
  xlstm71    the same with layer 3 an sLSTM block (xLSTM[7:1])                891,258
  mamba      8 Mamba blocks of 132 (inner 264, 16 states)                   1,009,206

(xLSTM's inner width is rounded up to a multiple of 64, as the authors': 132 would give
1.14M.) Every row takes the same 800 steps of 32 x 128 characters (3.3M tokens, the budget
of configs/cells_cpu.py), Adam at 3e-3 with a cosine schedule, dropout 0.1, one validation at
the end. Append ":5m" for the rows at about 5M parameters: widths 632, 730, 270, 316, 320,
304, 304 and 306, giving 5.01M, 4.99M, 5.01M, 5.06M, 5.08M, 4.93M, 4.92M and 5.00M (Hawk's
width is a multiple of its 4 heads, Griffin's of 16, its attention heads' RoPE halving each
head twice, hence 144 and its 3.5% more parameters at 1M).
"""

from configs import default

# row: (model fields, {size: hidden_size})
ROWS = {
    "lstm": (dict(cell="lstm", num_layers=2, embed_dim=64), {"1m": 276, "5m": 632}),
    "gru": (dict(cell="gru", num_layers=2, embed_dim=64), {"1m": 320, "5m": 730}),
    "residual": (dict(block="residual", cell="lstm", num_layers=4), {"1m": 120, "5m": 270}),
    "hawk": (dict(block="hawk", cell="rglru", num_layers=4, num_heads=4), {"1m": 140, "5m": 316}),
    # layers recurrent, recurrent, attention, recurrent (the authors' pattern cut at 4)
    "griffin": (dict(block="griffin", cell="rglru", num_layers=4, num_heads=4),
                {"1m": 144, "5m": 320}),
    "xlstm": (dict(block="xlstm", cell="mlstm", num_layers=8, num_heads=4), {"1m": 128, "5m": 304}),
    "xlstm71": (dict(block="xlstm", cell="mlstm", num_layers=8, num_heads=4, slstm_at=(3,)),
                {"1m": 128, "5m": 304}),
    "mamba": (dict(block="mamba", cell="mamba", num_layers=8), {"1m": 132, "5m": 306}),
}


def get_config(row: str = "gru"):
  name, _, size = row.partition(":")
  fields, widths = ROWS[name]
  config = default.get_config()
  config.model.update(dropout=0.1, **fields)
  config.model.hidden_size = widths[size or "1m"]
  if config.model.block != "stack":
    config.model.embed_dim = config.model.hidden_size  # the stream is the embedding's width
  config.data.update(batch_size=32, seq_len=128)
  config.train.update(steps=800, lr=3e-3, schedule="cosine", warmup_steps=50, eval_every=0,
                      ckpt_every=800, log_every=50)
  return config
