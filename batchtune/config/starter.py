"""The commented starter spec that ``batchtune init`` writes."""

STARTER_SPEC = """\
# batchtune spec. Run:  batchtune validate batchtune.yaml && batchtune probe batchtune.yaml
# Any key can be overridden on the command line:  batchtune probe batchtune.yaml optimizer.lr=0.01
name: my-model

# A built-in (mlp, cnn, char_transformer) or your own code:
#   model: {target: "mypackage.models:build_model", kwargs: {depth: 12}}
# A target is imported and called: a spec is trusted input, like a Python script.
model:
  builtin: mlp
  kwargs: {in_features: 32, num_classes: 10, hidden: 256}

# The callable returns (train_dataset, val_dataset); a sample is (inputs, targets) or a dict.
data:
  builtin: synthetic_classification
  kwargs: {in_features: 32, num_classes: 10}
  num_workers: 0

loss: cross_entropy          # cross_entropy | mse | model_output | {target: ..., kwargs: ...}

optimizer:                   # any extra key is passed to the optimizer
  name: adamw                # sgd | adam | adamw | rmsprop | adagrad | adamax | nadam | radam
  lr: 0.001                  # the learning rate tuned at base_batch_size
  weight_decay: 0.01

base_batch_size: 64
lr_scaling: auto             # linear | sqrt | none | auto (linear for SGD, sqrt for adaptive)
precision: fp32              # fp32 | bf16 | fp16

device:
  type: auto                 # auto | cpu | cuda | cuda:N | mps
  memory_limit: null         # e.g. "8GiB": emulate a smaller device (on CPU: a simulated capacity)

probe:
  min_batch_size: 1
  max_batch_size: 65536
  granularity: 1             # report the ceiling to a multiple of this (8 suits tensor cores)
  headroom: 0.10             # share of memory the safe batch size leaves free
  steps_per_trial: 2

sweep:
  min_batch_size: 16
  seeds: 3
  samples: 65536             # every batch size sees the same number of samples
  min_steps: 64              # ... and trains at least this many steps, so large batches can reach the target
  lr_multipliers: [0.5, 1, 2]  # each size keeps its fastest lr, so a bad rule is not mistaken for a bad size
  # target_loss: [0.5, 0.3]  # default: the lowest validation loss most sizes reach; trials stop there
  # reach_factor: 2          # ... and a trial short of the lowest at its budget trains on, up to 2x its steps
"""
