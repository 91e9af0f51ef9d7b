"""Training throughput: model FLOPs per token, a device's matmul peak, and windowed averages.

  throughput = Throughput(flops_per_token(num_params, config.train.reference, lora),
                          measure_peak_flops() * jax.device_count())
  throughput.add(tokens, seconds)   # per timed step
  metrics.update(throughput.report())   # perf/tokens_per_s, perf/model_flops_per_s, perf/mfu, ...
"""

import time

import jax
import jax.numpy as jnp

from isdaa_jax import reference as reference_lib


def forward_equivalents(reference: str, lora: bool = False) -> int:
  """A step's work per token in forward passes: the policy's forward, a backward of two (input
  and weight gradients; with LoRA only the input half, the frozen base gets no weight gradients
  and the adapters' share is small), and a reference forward when it runs in the step."""
  return 1 + (1 if lora else 2) + (1 if reference_lib.in_step(reference) else 0)


def flops_per_token(num_params: int, reference: str, lora: bool = False) -> float:
  """Model FLOPs per real token: 2N per forward-pass equivalent (6N, 8N with a reference in the
  step, 2N less with LoRA)."""
  return 2.0 * forward_equivalents(reference, lora) * num_params


_PEAK_CACHE = {}


def measure_peak_flops(n: int = 2048) -> float:
  """FLOP/s of one device on a large matmul in the platform's training dtype (cached)."""
  if 'peak' not in _PEAK_CACHE:
    dtype = jnp.float32 if jax.default_backend() == 'cpu' else jnp.bfloat16
    x = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    reps = 3
    start = time.perf_counter()
    for _ in range(reps):
      f(x).block_until_ready()
    _PEAK_CACHE['peak'] = 2 * n**3 * reps / (time.perf_counter() - start)
  return _PEAK_CACHE['peak']


class Throughput:
  """Tokens/s, model FLOP/s and MFU averaged over the steps since the last report.

  One step's time seen from the host jitters (metrics arrive a step late, and a host-bound loop
  sees several steps finish at once); a window's total does not. The caller leaves out time spent
  on evaluation, hooks and checkpoints, and the first step of a run (compilation).
  """

  def __init__(self, flops_per_token: float, peak_flops: float):
    self._flops_per_token = flops_per_token
    self._peak_flops = peak_flops  # of all devices together
    self._tokens, self._seconds, self._steps = 0.0, 0.0, 0

  def add(self, tokens: float, seconds: float):
    self._tokens += tokens
    self._seconds += seconds
    self._steps += 1

  def report(self) -> dict:
    """The window's averages ({} when it holds no timed step); starts a new window."""
    if not self._steps or self._seconds <= 0:
      return {}
    tokens_s = self._tokens / self._seconds
    flops_s = self._flops_per_token * tokens_s
    out = {'perf/tokens_per_s': tokens_s, 'perf/model_flops_per_s': flops_s,
           'perf/mfu': flops_s / self._peak_flops, 'perf/step_seconds': self._seconds / self._steps}
    self._tokens, self._seconds, self._steps = 0.0, 0.0, 0
    return out
