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
  config.model.cell = "lstm"  # a name in jaxrnn.cells: rnn, gru, lstm, lnlstm, mingru, minlstm, indrnn,
  # rglru, slstm, mlstm, mamba
  # How each layer wraps its cell (jaxrnn/blocks/): "stack" (stacked cells, dropout between);
  # "residual" (x + cell(norm x), x + mlp(norm x)); "hawk" (cell rglru), "griffin" (cell rglru,
  # local attention at layers 2, 5, ...), "xlstm" (cell mlstm; slstm at slstm_at), "mamba"
  # (cell mamba): their authors' blocks. All but "stack" run a residual stream of hidden_size
  # units (the embedding projected into it if embed_dim differs)
  config.model.block = "stack"
  config.model.mlp_expansion = 3  # residual, hawk, griffin: the gated MLP's width over hidden_size
  config.model.expand = 2  # mamba, xlstm's mLSTM block: the inner width over hidden_size
  config.model.conv_width = 4  # hawk, griffin, xlstm, mamba: the causal convolution's taps
  config.model.lru_width = 0  # hawk, griffin: the RG-LRU's width; 0: hidden_size (the authors')
  # griffin: tokens before the current one its local attention sees (the paper's 1024 at a
  # training length of 2048; here 128 for char-level streams cut into 64-256 steps, carried)
  config.model.attention_window = 128
  config.model.slstm_at = ()  # xlstm: the layers (from 0) that are sLSTM blocks, e.g. (1,)
  config.model.hidden_size = 256  # h, per layer
  config.model.num_layers = 1  # stacked cells
  config.model.embed_dim = 64  # e, width of the token embedding
  config.model.embed_scale = 1.0  # std of the normal embedding init (1 as torch.nn.Embedding)
  config.model.one_hot = False  # feed one-hot tokens instead of an embedding (embed_dim unused)
  config.model.dropout = 0.0  # on embeddings, between layers and before the head (train only)
  # Per-position rates (AWD-LSTM's dropouti / dropouth / dropout); None: model.dropout
  config.model.dropout_in = placeholder(float)  # on the embedding output (the first layer's input)
  config.model.dropout_hidden = placeholder(float)  # between layers
  config.model.dropout_out = placeholder(float)  # on the last layer's output, before the head
  config.model.locked_dropout = False  # one mask per lane and unit for all time steps (variational)
  config.model.embed_dropout = 0.0  # drop whole vocabulary rows of the embedding per batch
  config.model.weight_drop = 0.0  # DropConnect on each layer's recurrent matrix W_hh, per batch
  config.model.tie_embedding = False  # lm: the head's weight is the embedding's transpose; the
  # last layer then has embed_dim units (AWD-LSTM's 1150, 1150, 400 with hidden_size 1150)
  config.model.init_scale = 0.0  # > 0: every parameter U(-s, s) (Zaremba et al.); 0: per-cell init
  config.model.logits_soft_cap = 0.0  # lm: > 0 caps the logits at c * tanh(logits / c)
  # (recurrentgemma's logits_soft_cap: 30 in RecurrentGemma, off in the Griffin paper's models)
  config.model.ar = 0.0  # lm: activation regularization, ar * mean(dropped last-layer output^2)
  config.model.tar = 0.0  # lm: temporal AR, tar * mean((raw output_t+1 - output_t)^2)
  config.model.unroll = 1  # lax.scan unroll factor
  # "auto": the fastest path measured here (layers.resolve: on a CPU lstm/gru evaluate in
  # oneDNN and train in jaxrnn's core, rnn runs in the core; on a GPU a wide LSTM in cuDNN; else
  # an XLA recurrence); "fused": XLA, input product first, then a scan with a custom VJP
  # (parallel scan for mingru/minlstm); "scan": XLA scan of the whole step; "core", "onednn",
  # "cudnn": those whole-layer kernels (jaxrnn/kernels)
  config.model.impl = "auto"
  config.model.compute_dtype = "float32"  # matrix-product operands: float32 or bfloat16
  config.model.nonlinearity = "tanh"  # rnn cell only: tanh or relu
  config.model.forget_bias = 0.0  # lstm and lnlstm cells: added to the forget-gate bias at init
  config.model.num_heads = 1  # slstm (block-diagonal recurrent weights), mlstm (memories),
  # hawk's and griffin's RG-LRU gates (block-diagonal) and griffin's attention (query heads)
  config.model.state_size = 16  # mamba cell: states per channel (d_state)
  config.model.dt_rank = 0  # mamba cell: rank of delta's projection; 0: ceil(hidden_size / 16)
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
  config.train.unit = "steps"  # of steps, warmup_steps, eval_every, ckpt_every: "steps" or
  # "epochs" (passes over the training split; log_every stays in steps)
  config.train.steps = 1000  # optimizer steps (or epochs)
  config.train.optimizer = "adam"  # adam, adamw or sgd
  config.train.lr = 3e-3  # peak learning rate
  # constant, cosine or linear (both decay to 0 at the last step, after the warmup) or step (below)
  config.train.schedule = "constant"
  # step: lr * decay_factor ** max(0, epoch + 1 - decay_after), epoch counted from 0 (Zaremba)
  config.train.decay_factor = 0.5
  config.train.decay_after = 4  # epochs at the full rate
  config.train.warmup_steps = 0  # linear warmup from 0 to lr
  config.train.weight_decay = 0.0  # adamw only
  config.train.b1 = 0.9  # adam, adamw: decay of the first-moment average
  config.train.b2 = 0.999  # adam, adamw: decay of the second-moment average
  config.train.clip_norm = 1.0  # global-norm gradient clipping; 0 turns it off
  # Gradient accumulation: each step's batch runs as k micro-batches of batch_size / k lanes
  # (per device), one after another, their mean gradient making one update (less memory)
  config.train.accumulate = 1
  # NT-ASGD (Merity et al. 2018): 0 off; n > 0: once a validation loss is worse than the best
  # before the last n validations, average the iterates from then on; evaluate and save the mean
  config.train.asgd_patience = 0
  config.train.devices = 0  # local devices for data parallelism (pmap); 0: all of them
  config.train.seed = 0  # parameters, dropout and random batching
  config.train.log_every = 10  # steps between train rows in metrics.jsonl
  # TensorBoard event files in the workdir beside metrics.jsonl (tensorboardX, the [tensorboard]
  # extra): None: when it is installed; True: required; False: never
  config.train.tensorboard = placeholder(bool)
  config.train.eval_every = 250  # steps between whole-split validations; 0: only at the end
  config.train.ckpt_every = 250  # steps between checkpoints (also saved at the end and on SIGTERM)
  config.train.keep = 3  # latest checkpoints kept, besides the best by validation loss
  # The checkpoint a run resumes from: "latest", "best" or a step number. Not the latest: the
  # steps after it move to <workdir>/damaged/ (once: the same command then resumes its own saves)
  config.train.resume_step = "latest"
  config.train.eval_lanes = 16  # lm: contiguous lanes evaluated side by side; classify: batch rows
  config.train.eval_chunk = 256  # columns per evaluation step
  return config
