"""Batched autoregressive sampling with a KV cache.

Prompts of different lengths are left-padded so that every row's last prompt token sits in the
same cache slot; per-row positions start at 0 on each row's first real token. One call compiles
once per (batch, prompt length, max_new_tokens) shape: the prompt runs as one chunk, then a
`lax.fori_loop` decodes one token per step for every row, rows that emitted EOS keep emitting
padding. Greedy (temperature 0), temperature, top-k and top-p sampling; reproducible by key.
"""

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PAD_ID = 0


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  max_new_tokens: int
  temperature: float = 1.0  # 0 = greedy
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1 = off
  eos_id: int = 2

  @classmethod
  def from_config(cls, sample_config) -> 'SamplingParams':
    """From `config.sample_eval`."""
    return cls(max_new_tokens=sample_config.max_new_tokens,
               temperature=sample_config.temperature, top_k=sample_config.top_k,
               top_p=sample_config.top_p, eos_id=sample_config.eos_id)


@dataclasses.dataclass
class Samples:
  tokens: np.ndarray  # [B, N] generated ids, PAD after EOS (EOS included)
  lengths: np.ndarray  # [B] generated tokens up to and including EOS (N if no EOS)
  logps: np.ndarray  # [B, N] log-probs of each sampled token under the UNMODIFIED policy
  finished: np.ndarray  # [B] whether EOS was emitted


def left_pad(prompts: Sequence[Sequence[int]], length: int = 0):
  """Left-padded prompt ids, positions and segment ids [B, P]."""
  p = max(length, max(len(x) for x in prompts))
  ids = np.full((len(prompts), p), PAD_ID, np.int32)
  seg = np.zeros((len(prompts), p), np.int32)
  for i, x in enumerate(prompts):
    ids[i, p - len(x):] = x
    seg[i, p - len(x):] = 1
  pos = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
  return ids, pos, seg


def _filter_logits(logits_BV, params: SamplingParams):
  """Temperature, top-k and top-p applied to float32 logits."""
  logits = logits_BV / params.temperature
  if params.top_k:
    kth = jax.lax.top_k(logits, params.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if params.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest set whose mass reaches top_p: a token stays if the mass before it < p.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(mass_before < params.top_p, sorted_logits, jnp.inf), axis=-1)
    logits = jnp.where(logits < cutoff[:, None], -jnp.inf, logits)
  return logits


def _next_token(logits_BV, key, params: SamplingParams):
  if params.temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, _filter_logits(logits_BV, params)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('graphdef', 'params'))
def _generate(graphdef, state, prompt_ids, prompt_pos, prompt_seg, key, params: SamplingParams):
  model = nnx.merge(graphdef, state)
  b, p = prompt_ids.shape
  n = params.max_new_tokens
  cache = model.init_cache(b, p + n)
  hidden, cache = model.decode(prompt_ids, prompt_pos, prompt_seg, cache, 0)
  unembed = model.unembedding()
  next_pos = prompt_pos[:, -1] + 1

  def logits_of(h_BD):
    return jnp.einsum('bd,dv->bv', h_BD, unembed.astype(h_BD.dtype),
                      preferred_element_type=jnp.float32)

  def body(i, carry):
    cache, logits, tokens, logps, done, key = carry
    key, sub = jax.random.split(key)
    tok = _next_token(logits, sub, params)
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tok[:, None], -1)[:, 0]
    tok = jnp.where(done, PAD_ID, tok)
    tokens = tokens.at[:, i].set(tok)
    logps = logps.at[:, i].set(jnp.where(done, 0.0, lp))
    new_done = done | (tok == params.eos_id)
    seg = (~done).astype(jnp.int32)[:, None]
    h, cache = model.decode(tok[:, None], (next_pos + i)[:, None], seg, cache, p + i)
    return cache, logits_of(h[:, 0]), tokens, logps, new_done, key

  init = (cache, logits_of(hidden[:, -1]), jnp.zeros((b, n), jnp.int32),
          jnp.zeros((b, n), jnp.float32), jnp.zeros((b,), bool), key)
  _, _, tokens, logps, done, _ = jax.lax.fori_loop(0, n, body, init)
  return tokens, logps, done


@functools.partial(jax.jit, static_argnames=('graphdef', 'params'))
def _generate_runs(graphdef, states, prompt_ids, prompt_pos, prompt_seg, keys,
                   params: SamplingParams):
  return jax.vmap(lambda state, key: _generate(graphdef, state, prompt_ids, prompt_pos, prompt_seg,
                                               key, params))(states, keys)


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], key: jax.Array,
             params: SamplingParams) -> Samples:
  """Samples one response per prompt. `logps` are under the policy itself (temperature 1)."""
  ids, pos, seg = left_pad(prompts)
  graphdef, state = nnx.split(model)
  tokens, logps, done = _generate(graphdef, state, ids, pos, seg, key, params)
  return _samples(np.asarray(tokens), np.asarray(logps), np.asarray(done), params)


def generate_runs(graphdef, states, prompts: Sequence[Sequence[int]], keys: jax.Array,
                  params: SamplingParams) -> list[Samples]:
  """`generate` for R models of one architecture at once (the lab's vectorized runs): `states`
  (params) and `keys` carry a leading run axis R; one compiled program samples them all."""
  ids, pos, seg = left_pad(prompts)
  tokens, logps, done = jax.device_get(_generate_runs(graphdef, states, ids, pos, seg, keys,
                                                      params))
  return [_samples(t, lp, d, params) for t, lp, d in zip(tokens, logps, done)]


def _samples(tokens, logps, done, params: SamplingParams) -> Samples:
  is_eos = tokens == params.eos_id
  first_eos = np.where(is_eos.any(1), is_eos.argmax(1) + 1, tokens.shape[1])
  return Samples(tokens=tokens, lengths=first_eos.astype(np.int32), logps=logps, finished=done)
