"""Test-wide set-up: 8 simulated CPU devices, absl flags marked parsed, float32 matmuls."""

import os

# Must happen before JAX initializes its backends: every test sees 8 CPU devices, and tests that
# want one device build a 1-device mesh explicitly.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
# With the TPU compiler installed (the `tpu` extra, for isdaa_jax.plan), JAX would try a TPU backend
# first and print libtpu's warnings: the tests and the subprocesses they start run on CPU, and the
# plan tests reach TPU topologies explicitly.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

import jax  # noqa: E402
from absl import flags  # noqa: E402

# Exact float32 matmuls on CPU so reference-value comparisons are meaningful.
jax.config.update('jax_default_matmul_precision', 'highest')

# Grain reads absl flags; outside absl.app.run they must be marked parsed first.
if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()
