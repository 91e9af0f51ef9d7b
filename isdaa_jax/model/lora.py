"""LoRA adapters on the decoder projections, stacked over layers like the base kernels.

A target projection with kernel W [L, *in, *out] (e.g. wq [L, D, N, H]) gets
  A [L, *in, R]   (`{W}_lora_a`, logical axes of W's input dims + 'lora_rank')
  B [L, R, *out]  (`{W}_lora_b`, 'lora_rank' + W's output dims)
and computes x W + (alpha / R) (x A) B. A and B live in `DecoderLayers` beside W, so the
unrolled loop, `jax.lax.scan` over layers and remat treat them like any other stacked
parameter, and they shard with their base projection (A along its input axis, B along its
output axis) through the same logical-axis table.

Why not qwix: its LoRA provider intercepts `einsum` calls whose right operand *is* a module
parameter and creates the adapters lazily on the first call. Our blocks run on per-layer slices
of stacked kernels (`p['wq'][i]`, or the scanned `xs`), so qwix finds no parameter to adapt,
and creating variables inside `jax.lax.scan` is not possible; its adapters also take the base
dtype, where we keep float32 adapters over a bfloat16 base.

Init as PEFT's default: A ~ kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
B = 0, so the adapted model equals the base at step 0.
"""

import dataclasses
import hashlib
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

# config.model.lora.targets name -> (DecoderLayers kernel, number of input dims after `layers`).
TARGETS = {
    'q': ('wq', 1), 'k': ('wk', 1), 'v': ('wv', 1), 'o': ('wo', 2),
    'gate': ('w_gate', 1), 'up': ('w_up', 1), 'down': ('w_down', 1),
}
_INPUT_DIMS = dict(TARGETS.values())
SUFFIXES = ('_lora_a', '_lora_b')


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Which projections carry adapters, their rank, scale numerator and dtype."""
  rank: int
  alpha: float
  targets: tuple[str, ...]
  dtype: str = 'float32'

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @property
  def kernels(self) -> tuple[str, ...]:
    return tuple(TARGETS[t][0] for t in self.targets)

  @classmethod
  def from_config(cls, model_config) -> 'LoraSpec':
    """From `config.model` (`lora` section; the adapters take `model.param_dtype`)."""
    lora = model_config.lora
    return cls(rank=lora.rank, alpha=float(lora.alpha), targets=tuple(lora.targets),
               dtype=model_config.param_dtype)


def param_names(spec: LoraSpec) -> tuple[str, ...]:
  return tuple(k + s for k in spec.kernels for s in SUFFIXES)


def is_adapter(name: str) -> bool:
  return name.endswith(SUFFIXES)


def make_params(spec: LoraSpec, kernels: dict, rngs: nnx.Rngs) -> dict:
  """name -> nnx.LoRAParam for every target; `kernels` maps a kernel name to its nnx.Param."""
  out = {}
  dtype = jnp.dtype(spec.dtype)
  for kernel in spec.kernels:
    n_in = _INPUT_DIMS[kernel]
    w = kernels[kernel]
    shape, axes = w.get_value().shape, w.get_metadata()['logical_axes']
    in_shape, out_shape = shape[1:1 + n_in], shape[1 + n_in:]
    bound = 1.0 / math.sqrt(math.prod(in_shape))
    a = jax.random.uniform(rngs.params(), (shape[0], *in_shape, spec.rank), jnp.float32,
                           -bound, bound).astype(dtype)
    out[kernel + '_lora_a'] = nnx.LoRAParam(
        a, logical_axes=(axes[0], *axes[1:1 + n_in], 'lora_rank'))
    out[kernel + '_lora_b'] = nnx.LoRAParam(
        jnp.zeros((shape[0], spec.rank, *out_shape), dtype),
        logical_axes=(axes[0], 'lora_rank', *axes[1 + n_in:]))
  return out


def delta(x_M_in, a_in_R, b_R_out, scale: float, dtype):
  """(scale * x A) B for one layer: x [M, *in], A [*in, R], B [R, *out] -> [M, *out]."""
  r = a_in_R.shape[-1]
  x_MI = x_M_in.reshape(x_M_in.shape[0], -1)
  low_MR = x_MI @ a_in_R.reshape(-1, r).astype(dtype)
  out_MO = (low_MR * jnp.asarray(scale, dtype)) @ b_R_out.reshape(r, -1).astype(dtype)
  return out_MO.reshape(x_M_in.shape[0], *b_R_out.shape[1:])


def merged_kernel(w, a, b, scale: float):
  """W + scale * A B over stacked layers, in W's dtype (the product runs in float32)."""
  r = a.shape[-1]
  L = w.shape[0]
  a_LIR = a.reshape(L, -1, r).astype(jnp.float32)
  b_LRO = b.reshape(L, r, -1).astype(jnp.float32)
  ab = jnp.einsum('lir,lro->lio', a_LIR, b_LRO) * scale
  return (w.astype(jnp.float32) + ab.reshape(w.shape)).astype(w.dtype)


# ---------------------------------------------------------------------------------------------
# Pure-dict helpers: the trained adapters and the frozen base are separate trees of one model.

def split(params: dict) -> tuple[dict, dict]:
  """(base, adapters) of a policy's pure dict."""
  layers = params['layers']
  base = {**params, 'layers': {k: v for k, v in layers.items() if not is_adapter(k)}}
  return base, {'layers': {k: v for k, v in layers.items() if is_adapter(k)}}


def combine(base: dict, adapters: dict) -> dict:
  """The policy's pure dict from the frozen base and the adapters (no copies)."""
  return {**base, 'layers': {**base['layers'], **adapters['layers']}}


def merge_into_base(base: dict, adapters: dict, spec: LoraSpec) -> dict:
  """Base params with every adapted kernel replaced by W + scale A B (for export)."""
  layers = dict(base['layers'])
  for kernel in spec.kernels:
    a, b = adapters['layers'][kernel + '_lora_a'], adapters['layers'][kernel + '_lora_b']
    layers[kernel] = merged_kernel(layers[kernel], a, b, spec.scale)
  return {**base, 'layers': layers}


def fingerprint(base: dict) -> str:
  """A digest of the base weights: every parameter's path, shape, dtype and 64 of its values.

  Sampled values, not sums: a gather is exact, so 1 device and a sharded mesh give the same
  digest, and any other checkpoint differs in some sampled value with near certainty.
  """
  leaves = jax.tree_util.tree_leaves_with_path(base)
  mesh = leaves[0][1].sharding.mesh

  def sample(x):
    idx = np.linspace(0, x.size - 1, min(64, x.size)).astype(np.int64)
    return jnp.take(x.reshape(-1), jnp.asarray(idx)).astype(jnp.float32)

  values = jax.jit(lambda xs: [sample(x) for x in xs],
                   out_shardings=NamedSharding(mesh, P()))([x for _, x in leaves])
  digest = hashlib.sha256()
  for (path, x), v in zip(leaves, values):
    digest.update(f'{jax.tree_util.keystr(path)}:{x.shape}:{x.dtype};'.encode())
    digest.update(np.asarray(v).tobytes())
  return digest.hexdigest()
