"""Reference log-prob cache: the key sees every input that changes the numbers, stale or broken
files are refused, and training with reference='cached' equals training with the model."""

import json
import pathlib
import shutil

import numpy as np
import pytest
from flax import nnx

from configs import tiny
from isdaa_jax import config as config_lib
from isdaa_jax import defaults
from isdaa_jax import reference_cache, score, scoring, train
from isdaa_jax.errors import UserError
from isdaa_jax.metrics_writer import read_metrics
from isdaa_jax.model import hf
from isdaa_jax.model.llama import Llama, LlamaConfig

import tokenizer_util

VOCAB = 128


def _pairs(n=6, seed=0):
  rng = np.random.default_rng(seed)
  tokens = lambda lo, hi: rng.integers(3, VOCAB, rng.integers(lo, hi)).tolist()
  return [dict(prompt_ids=[1] + tokens(2, 8), chosen_ids=tokens(1, 8) + [2],
               rejected_ids=tokens(1, 8) + [2]) for _ in range(n)]


def _key(pairs=None, tokenizer='', reference='', seed=0, **overrides):
  config = defaults.get_config()
  config.update_from_flattened_dict(overrides)
  return reference_cache.fingerprint(pairs or _pairs(), tokenizer=tokenizer,
                                     data_config=config.data, reference=reference,
                                     model_config=config.model, seed=seed)


def _changed(a, b):
  return sorted(c for c in a.components if a.components[c] != b.components[c])


def _model_dir(path, seed=0):
  hf.save_model(Llama(LlamaConfig.tiny(vocab_size=VOCAB), rngs=nnx.Rngs(seed)), str(path))
  return str(path)


def test_fingerprint_changes_with_exactly_the_component_that_changed(tmp_path):
  base_key = _key()
  assert _key() == base_key  # stable
  pairs = _pairs()
  pairs[3]['chosen_ids'][0] += 1
  assert _changed(base_key, _key(pairs)) == ['pairs']
  assert _changed(base_key, _key(**{'data.max_length': 256})) == ['data']
  assert _changed(base_key, _key(**{'data.chat_format': 'plain'})) == ['data']
  assert _changed(base_key, _key(**{'model.dtype': 'bfloat16'})) == ['numerics']
  assert _changed(base_key, _key(**{'model.param_dtype': 'bfloat16'})) == ['numerics']
  # A random initialisation is its architecture and seed; how it runs is not part of it.
  assert _changed(base_key, _key(seed=1)) == ['reference']
  assert _changed(base_key, _key(**{'model.hidden_size': 32})) == ['reference']
  assert _key(**{'model.remat': 'full'}) == base_key

  tok_a = tokenizer_util.build_tokenizer(tmp_path / 'tok_a')
  tok_copy = shutil.copytree(tok_a, tmp_path / 'tok_copy')
  tok_chat = tokenizer_util.build_tokenizer(tmp_path / 'tok_chat', chat_template=True)
  with_tok = _key(tokenizer=tok_a)
  assert _changed(base_key, with_tok) == ['tokenizer']
  assert _key(tokenizer=str(tok_copy)) == with_tok  # content, not the folder's name
  assert _changed(with_tok, _key(tokenizer=tok_chat)) == ['tokenizer']

  ref_a = _model_dir(tmp_path / 'ref_a')
  ref_copy = pathlib.Path(shutil.copytree(ref_a, tmp_path / 'ref_copy'))
  with_ref = _key(reference=ref_a)
  assert _changed(base_key, with_ref) == ['reference']
  assert _key(reference=str(ref_copy)) == with_ref
  weights = ref_copy / 'model.safetensors'
  data = bytearray(weights.read_bytes())
  data[-1] ^= 1  # one float of the last tensor
  weights.write_bytes(bytes(data))
  assert _changed(with_ref, _key(reference=str(ref_copy))) == ['reference']


def _arrays(n, seed=0):
  rng = np.random.default_rng(seed)
  return {name: rng.normal(size=n).astype(np.float32) for name in reference_cache.ARRAYS}


def test_roundtrip_is_exact_and_stale_or_broken_files_are_refused(tmp_path, monkeypatch):
  key, arrays = _key(), _arrays(6)
  path = tmp_path / 'sub' / 'ref.npz'
  reference_cache.save(path, key, arrays)
  assert [p.name for p in path.parent.iterdir()] == ['ref.npz']  # no temporary file left
  got = reference_cache.load(path, key)
  for name in reference_cache.ARRAYS:
    np.testing.assert_array_equal(got[name], arrays[name])
    assert got[name].dtype == np.float32
  meta = json.loads(str(np.load(path)['metadata']))
  assert meta['key'] == key.digest and meta['num_pairs'] == 6 and meta['components']['pairs']

  with pytest.raises(reference_cache.StaleReferenceCacheError,
                     match=r'stale: it was made for other config.data chat_format/max_length') as e:
    reference_cache.load(path, _key(**{'data.max_length': 256}))
  message = str(e.value)
  assert '\n' not in message and 'delete it' in message and 'reference_cache' in message
  assert isinstance(e.value, UserError)  # entry points print it as one line
  with pytest.raises(reference_cache.StaleReferenceCacheError,
                     match=r'other tokenized pairs .*; reference weights'):
    reference_cache.load(path, _key(_pairs(7), seed=3))

  broken = tmp_path / 'broken.npz'
  for content in (path.read_bytes()[:len(path.read_bytes()) // 2], b'not a cache at all'):
    broken.write_bytes(content)
    with pytest.raises(reference_cache.ReferenceCacheError, match='not a complete reference cache'):
      reference_cache.load(broken, key)
  # Arrays that do not match the metadata's N or checksum (an edited or mixed-up file).
  for name, array in (('chosen_logps', np.zeros(5, np.float32)),
                      ('rejected_logps', arrays['rejected_logps'] + 1)):
    np.savez(broken, metadata=np.asarray(json.dumps(meta)), **dict(arrays, **{name: array}))
    with pytest.raises(reference_cache.ReferenceCacheError, match='not a complete'):
      reference_cache.load(broken, key)

  # A write killed half-way leaves the previous file intact and loadable.
  def killed(f, **_):
    f.write(b'PK partial')
    raise KeyboardInterrupt
  monkeypatch.setattr(np, 'savez', killed)
  with pytest.raises(KeyboardInterrupt):
    reference_cache.save(path, key, _arrays(6, seed=1))
  assert [p.name for p in path.parent.iterdir()] == ['ref.npz']
  np.testing.assert_array_equal(reference_cache.load(path, key)['chosen_logps'],
                                arrays['chosen_logps'])


def _tiny(num_steps, **overrides):
  config = tiny.get_config()
  config.train.num_steps = num_steps
  config.train.eval_every = 2
  config.checkpoint.every_steps = 1000
  config.checkpoint.export_hf = False
  config.checkpoint.async_save = False
  config.train.progress_bar = False
  config.train.tensorboard = False
  config.train.peak_flops_per_device = 1e12
  config.update_from_flattened_dict(overrides)
  config_lib.validate(config)
  return config


_COMPARED = ('loss', 'rewards/margins', 'grad_norm', 'is/weight_mean', 'kl/policy_ref_chosen',
             'logps/chosen', 'eval/loss')


def _metrics(workdir):
  rows = {}
  for r in read_metrics(workdir):
    rows.setdefault(r['step'], {}).update({k: r[k] for k in _COMPARED if k in r})
  return rows


def _assert_same(got, expected, steps):
  for step in steps:
    assert set(got[step]) == set(expected[step]), step
    for k, v in expected[step].items():
      # kl/policy_ref_chosen is a difference of two summed log-probs of |logps/chosen| nats, each
      # exact to float32 rounding of that size (the cached sums come from other batch shapes):
      # its error scales with the sums, not with the small difference.
      floor = 1e-6 * max(1.0, abs(expected[step]['logps/chosen'])) if k.startswith('kl/') else 1e-6
      assert got[step][k] == pytest.approx(v, rel=1e-5, abs=floor), (step, k)


class _CountScoring:
  def __init__(self, monkeypatch):
    self.calls = 0
    self._score_pairs = scoring.score_pairs
    monkeypatch.setattr(scoring, 'score_pairs', self)

  def __call__(self, *args, **kwargs):
    self.calls += 1
    return self._score_pairs(*args, **kwargs)


def test_cached_reference_trains_like_the_model_and_is_computed_once(tmp_path, monkeypatch):
  train.run(_tiny(6), tmp_path / 'model')
  expected = _metrics(tmp_path / 'model')
  scoring = _CountScoring(monkeypatch)

  cached = tmp_path / 'cached'
  train.run(_tiny(3, **{'train.reference': 'cached'}), cached)
  assert scoring.calls == 2  # train and eval split, once each
  files = sorted((cached / 'reference_logps').iterdir(), key=lambda f: f.name[16:])
  assert [f.name[16:] for f in files] == ['-eval.npz', '-train.npz']
  stamps = [(f.stat().st_mtime_ns, f.read_bytes()) for f in files]
  # Resuming reads the caches, and the data iterator resumes where it stopped: steps 4-6 equal
  # those of the straight run with the reference model.
  train.run(_tiny(6, **{'train.reference': 'cached'}), cached)
  assert scoring.calls == 2
  _assert_same(_metrics(cached), expected, range(1, 7))

  assert [(f.stat().st_mtime_ns, f.read_bytes()) for f in files] == stamps

  # A cache named explicitly (the eval split's beside it, FILE-eval.npz) for another reference
  # (here another seed of the random initialisation) is refused before training, naming the
  # reference, and kept as it is. (test_score_command_cache_is_accepted_by_training covers a
  # fresh run that accepts a named file.)
  named = tmp_path / 'elsewhere' / 'ref.npz'
  named.parent.mkdir()
  shutil.copy(files[1], named)
  shutil.copy(files[0], named.with_name('ref-eval.npz'))
  config = _tiny(1, **{'train.reference': 'cached', 'train.reference_cache': str(named)})
  config.seed = 1
  with pytest.raises(reference_cache.StaleReferenceCacheError, match='reference weights'):
    train.run(config, tmp_path / 'stale')
  assert named.read_bytes() == files[1].read_bytes() and scoring.calls == 2
  assert not (tmp_path / 'stale' / 'metrics.jsonl').exists()


def test_score_command_cache_is_accepted_by_training(tmp_path, monkeypatch):
  model = _model_dir(tmp_path / 'model', seed=4)
  pairs = tmp_path / 'pairs.jsonl'
  pairs.write_text(''.join(json.dumps(p) + '\n' for p in _pairs(16, seed=5)))
  cache = tmp_path / 'ref.npz'
  config = _tiny(2, **{'train.reference': 'cached', 'train.reference_cache': str(cache),
                       'model.path': model, 'data.source': 'pairs', 'data.path': str(pairs),
                       'data.eval_holdout': 0, 'train.eval_every': 0})
  summary = score.run(config, model=model, reference=None, pairs_path=str(pairs), out_path=None,
                      tokenizer=None, batch_size=4, source='pairs', as_reference=True,
                      cache_path=str(cache))
  assert summary['kept'] == 16 and cache.exists()
  scoring = _CountScoring(monkeypatch)
  train.run(config, tmp_path / 'run')
  assert scoring.calls == 0
  first = _metrics(tmp_path / 'run')[1]
  # The cache holds the starting policy's log-probs: zero margins, loss log 2 at the first step.
  assert first['rewards/margins'] == pytest.approx(0.0, abs=1e-5)
  assert first['loss'] == pytest.approx(np.log(2.0), abs=1e-5)

  # Training's own pre-pass (here from train.reference_path) gives the command's key and values.
  config.train.reference_cache, config.train.reference_path = '', model
  train.run(config, tmp_path / 'prepass')
  assert scoring.calls == 1
  (made,) = (tmp_path / 'prepass' / 'reference_logps').iterdir()
  key = reference_cache.fingerprint(
      [json.loads(line) for line in pairs.read_text().splitlines()], tokenizer=model,
      data_config=config.data, reference=model, model_config=config.model, seed=config.seed)
  assert made.name == f'{key.digest[:16]}-train.npz'
  ours, theirs = reference_cache.load(made, key), reference_cache.load(cache, key)
  for name in reference_cache.ARRAYS:
    np.testing.assert_allclose(ours[name], theirs[name], atol=1e-5)


def test_a_gguf_model_and_its_tokenizer_are_keyed_by_the_file_content(tmp_path):
  # A .gguf path holds weights and tokenizer in one file (it crashed as 'neither folder nor hub id').
  path = tmp_path / 'm.gguf'
  path.write_bytes(b'GGUF weights v1')
  cfg = defaults.get_config().model
  first = (reference_cache.tokenizer_digest(str(path)),
           reference_cache.reference_digest(str(path), cfg, 0))
  assert first == (reference_cache.tokenizer_digest(str(tmp_path)),
                   reference_cache.reference_digest(str(tmp_path), cfg, 0))
  path.write_bytes(b'GGUF weights v2')
  second = (reference_cache.tokenizer_digest(str(path)),
            reference_cache.reference_digest(str(path), cfg, 0))
  assert first[0] != second[0] and first[1] != second[1]
