"""Every jaxrnn field, with the defaults of the README quickstart: a 1 x 256 LSTM on Tiny Shakespeare.

  python scripts/train.py --config configs/default.py --workdir runs/quickstart

Override any field on the command line, e.g. `--config.model.cell=gru --config.train.steps=500`.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "lm"  # "lm": predict the next token; "classify": one label per sentence

  config.model = ml_collections.ConfigDict()
  config.model.cell = "lstm"  # a name in jaxrnn.cells: rnn, gru, lstm, lnlstm, mingru, minlstm, indrnn
  config.model.hidden_size = 256  # h, per layer
  config.model.num_layers = 1  # stacked cells
  config.model.embed_dim = 64  # e, width of the token embedding
  config.model.embed_scale = 1.0  # std of the normal embedding init (1 as torch.nn.Embedding)
  config.model.one_hot = False  # feed one-hot tokens instead of an embedding (embed_dim unused)
  config.model.dropout = 0.0  # on embeddings, between layers and before the head (train only)
  config.model.unroll = 1  # lax.scan unroll factor
  # "auto": the fastest path measured here (layers.resolve: oneDNN for lstm/gru on a CPU, cuDNN
  # for a wide LSTM on a GPU, else an XLA recurrence); "fused": XLA, input product first, then a
  # scan with a custom VJP (parallel scan for mingru/minlstm); "scan": XLA scan of the whole
  # step; "onednn" / "cudnn": those whole-layer kernels (jaxrnn/kernels)
  config.model.impl = "auto"
  config.model.compute_dtype = "float32"  # matrix-product operands: float32 or bfloat16
  config.model.nonlinearity = "tanh"  # rnn cell only: tanh or relu
  config.model.forget_bias = 0.0  # lstm and lnlstm cells: added to the forget-gate bias at init
  config.model.bidirectional = False  # classify only: each layer also reads every sentence backwards
  config.model.pooling = "last"  # classify: "last" valid output (of each direction) or "mean" of them
  config.model.num_classes = 2  # classify: one output per class; 1: one sigmoid unit (2 classes)

  config.data = ml_collections.ConfigDict()
  config.data.corpus = "tinyshakespeare"  # a name in jaxrnn.data.CORPORA or a path to a text file
  config.data.tokens = placeholder(str)  # "char" or "word"; None: the corpus' default (char)
  config.data.val_frac = placeholder(float)  # single-file and sentence corpora; None: corpus default
  config.data.test_frac = placeholder(float)  # single-file and sentence corpora; None: corpus default
  config.data.batching = "sequential"  # lm: "sequential" (state carried) or "random" windows
  config.data.batch_size = 32  # b, lanes (lm) or sentences (classify) per batch
  config.data.seq_len = 64  # t, truncated-BPTT length (lm); words kept per sentence (classify)
  config.data.max_vocab = 0  # classify: vocabulary cap (top training words, <pad>, <unk>); 0: none
  config.data.split_seed = 0  # classify: the shuffle behind the fixed train/val/test split

  config.train = ml_collections.ConfigDict()
  config.train.steps = 1000  # optimizer steps
  config.train.optimizer = "adam"  # adam, adamw or sgd
  config.train.lr = 3e-3  # peak learning rate
  config.train.schedule = "constant"  # constant or cosine (with linear warmup)
  config.train.warmup_steps = 0  # linear warmup from 0 to lr
  config.train.weight_decay = 0.0  # adamw only
  config.train.clip_norm = 1.0  # global-norm gradient clipping; 0 turns it off
  config.train.devices = 0  # local devices for data parallelism (pmap); 0: all of them
  config.train.seed = 0  # parameters, dropout and random batching
  config.train.log_every = 10  # steps between train rows in metrics.jsonl
  config.train.eval_every = 250  # steps between whole-split validations; 0: only at the end
  config.train.ckpt_every = 250  # steps between checkpoints (also saved at the end and on SIGTERM)
  config.train.keep = 3  # latest checkpoints kept, besides the best by validation loss
  config.train.eval_lanes = 16  # lm: contiguous lanes evaluated side by side; classify: batch rows
  config.train.eval_chunk = 256  # columns per evaluation step
  return config
