"""Every config key, with its meaning. Experiment configs import this and override."""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # PRNG seed for initialisation and for the order the data is read in

  c.data = ml_collections.ConfigDict()
  c.data.source = "npy"  # "npy": activation shards [N, D] on disk; "synthetic": known features
  c.data.path = ""  # npy: a .npy file or a directory of .npy shards (memory-mapped)
  c.data.d_in = 0  # activation width D; a store of another width is refused
  c.data.normalize = True  # scale inputs by one scalar so E‖x‖² = 1 (folded into the export)
  c.data.norm_rows = 65536  # rows sampled to estimate E‖x‖² before training
  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.n_rows = 262144  # rows generated (held in memory)
  c.data.synthetic.n_features = 256  # true features in superposition (> d_in)
  c.data.synthetic.mean_l0 = 8.0  # mean number of true features active per row
  c.data.synthetic.noise_std = 0.02  # isotropic Gaussian noise added to every row
  c.data.synthetic.seed = 1234  # seed of the generated data and its true dictionary

  c.sae = ml_collections.ConfigDict()
  c.sae.width = 16384  # dictionary width F
  c.sae.sparsity_coefficient = 1e-3  # λ in L = ‖x − x̂‖² + λ‖f‖₀ (inputs normalised)
  c.sae.bandwidth = 0.001  # STE kernel bandwidth ε (tuned for normalised inputs)
  c.sae.kernel = "rectangle"  # KDE kernel of the pseudo-derivative: rectangle|triangle|gaussian
  c.sae.threshold_init = 0.001  # initial θ for every feature
  c.sae.threshold_param = "log"  # train θ through its log ("log") or directly ("raw")

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 7e-5  # Adam learning rate after warm-up
  c.optim.b1 = 0.0  # Adam β1 (the recipe uses no momentum)
  c.optim.b2 = 0.999  # Adam β2
  c.optim.eps = 1e-8  # Adam ε
  c.optim.lr_warmup_steps = 1000  # cosine warm-up of the learning rate over these steps
  c.optim.lr_warmup_init = 0.1  # the warm-up starts at this fraction of learning_rate
  c.optim.sparsity_warmup_steps = 10000  # λ rises linearly from 0 over these steps

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 4096  # activations per step (global, across all devices)
  c.train.num_steps = 100000  # optimiser steps; tokens = num_steps × batch_size
  c.train.log_every = 100  # steps between metrics lines and progress lines
  c.train.checkpoint_every = 5000  # steps between orbax checkpoints (one is also saved at the end)
  c.train.keep_checkpoints = 2  # how many recent checkpoints to keep
  c.train.dead_window_tokens = 10_000_000  # a feature that has not fired for this many tokens is dead

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # devices along the batch axis; -1: all devices left after "model"
  c.mesh.model = 1  # devices the dictionary (F) is split across; -1: all devices
  return c
