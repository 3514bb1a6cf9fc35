"""The cell comparison on Tiny Shakespeare: 2 layers at equal parameter count (about 870K), one budget.

  python scripts/train.py --config configs/cells_cpu.py --workdir runs/cells_lstm
  python scripts/train.py --config configs/cells_cpu.py --workdir runs/cells_gru \
      --config.model.cell=gru --config.model.hidden_size=296
  python scripts/train.py --config configs/cells_cpu.py --workdir runs/cells_rglru \
      --config.model.cell=rglru --config.model.hidden_size=496
  python scripts/train.py --config configs/cells_cpu.py --workdir runs/cells_slstm \
      --config.model.cell=slstm --config.model.hidden_size=352 --config.model.num_heads=4
  python scripts/train.py --config configs/cells_cpu.py --workdir runs/cells_mlstm \
      --config.model.cell=mlstm --config.model.hidden_size=424 --config.model.num_heads=4

The widths give 875,202 (lstm 256), 871,570 (gru 296), 874,274 (rglru 496), 863,874 (slstm
352) and 867,234 (mlstm 424) parameters with the 64-wide embedding; every run takes the same
800 steps of 32 x 128 characters (3.3M tokens, about 3.3 epochs) with the same optimizer, and
is validated once, at the end. The README's cell table was measured with these commands.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.update(cell="lstm", num_layers=2, hidden_size=256, embed_dim=64, dropout=0.1)
  config.data.update(batch_size=32, seq_len=128)
  config.train.update(steps=800, lr=3e-3, schedule="cosine", warmup_steps=50, eval_every=0,
                      ckpt_every=800, log_every=50)
  return config
