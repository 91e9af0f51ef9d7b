"""`isdaa_jax.score`: batched, bucketed, sharded scores equal a direct per-pair computation."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from isdaa_jax import defaults, reference_cache, score, scoring, sharding
from isdaa_jax import policy as policy_lib
from isdaa_jax import layout as layout_lib
from isdaa_jax.data.tokenize import PairTokenizer
from isdaa_jax.errors import UserError
from isdaa_jax.data import sources
from isdaa_jax.model import hf
from isdaa_jax.model.llama import Llama, LlamaConfig

import tokenizer_util

ROOT = pathlib.Path(__file__).parents[1]
FIXTURES = ROOT / 'tests' / 'fixtures'
POLICY, REFERENCE = str(FIXTURES / 'llama_gqa'), str(FIXTURES / 'llama_sharded')  # V = 128


def _config():
  config = defaults.get_config()
  config.data.length_buckets = (16, 32)
  config.data.max_length = 32
  config.data.max_prompt_length = 16
  config.model.logprob_chunk_size = 8
  return config


def _id_rows(n=6, vocab=128, seed=0, max_response=20):
  """Token-id pairs; with the default max_response they fill both length buckets."""
  rng = np.random.default_rng(seed)
  tokens = lambda lo, hi: rng.integers(3, vocab, rng.integers(lo, hi)).tolist()
  return [dict(prompt_ids=[1] + tokens(1, 6), chosen_ids=tokens(1, max_response) + [2],
               rejected_ids=tokens(1, max_response) + [2]) for _ in range(n)]


def _write_jsonl(path, rows):
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return str(path)


def _read_jsonl(path):
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


@nnx.jit
def _logits_32(model, ids_1T):
  t = ids_1T.shape[1]
  hidden = model(ids_1T, jnp.arange(t)[None], jnp.ones((1, t), jnp.int32))
  return hidden[0] @ model.unembedding()


def _direct_logps(model, prompt, response):
  """One pair on its own, unchunked, log-softmax in float64: log p(response | prompt)."""
  seq = np.asarray(prompt + response)
  n = len(seq)
  # Right-padded to one length so this compiles once; causal attention keeps the real positions
  # independent of what follows them.
  logits = np.asarray(_logits_32(model, jnp.asarray(np.pad(seq, (0, 32 - n))[None])), np.float64)
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  return sum(logp[t - 1, seq[t]] for t in range(len(prompt), n))


def _run(tmp_path, rows, **kwargs):
  args = dict(model=POLICY, reference=None, tokenizer=None, batch_size=3, source='pairs',
              as_reference=False)
  args.update(kwargs)
  out = tmp_path / 'out.jsonl'
  summary = score.run(_config(), pairs_path=_write_jsonl(tmp_path / 'in.jsonl', rows),
                      out_path=str(out), **args)
  return _read_jsonl(out), summary


def test_scores_equal_a_direct_unbatched_computation(tmp_path, monkeypatch):
  traces = []
  forward = scoring._forward
  monkeypatch.setattr(scoring, '_forward', lambda *a: traces.append(1) or forward(*a))
  rows = _id_rows()
  out, summary = _run(tmp_path, rows, reference=REFERENCE)
  assert summary['kept'] == len(rows) == len(out)
  # Two buckets (16 and 32) for each of the two models: one compilation per bucket and model.
  lengths = [len(r['prompt_ids']) + max(len(r['chosen_ids']), len(r['rejected_ids']))
             for r in rows]
  assert min(lengths) <= 16 < max(lengths) and len(traces) == 4
  mesh = sharding.make_mesh(defaults.get_config().mesh, jax.devices()[:1])
  policy = hf.load_model(POLICY, _config().model, mesh)
  reference = hf.load_model(REFERENCE, _config().model, mesh)
  for i, (row, got) in enumerate(zip(rows, out)):
    assert got['index'] == i and got['chosen_ids'] == row['chosen_ids']
    expected = {}
    for side in ('chosen', 'rejected'):
      expected[f'policy_{side}_logps'] = _direct_logps(policy, row['prompt_ids'],
                                                       row[f'{side}_ids'])
      expected[f'reference_{side}_logps'] = _direct_logps(reference, row['prompt_ids'],
                                                          row[f'{side}_ids'])
      assert got[f'{side}_tokens'] == len(row[f'{side}_ids'])
    for key, value in expected.items():
      assert got[key] == pytest.approx(value, abs=2e-4), key
    margin = ((expected['policy_chosen_logps'] - expected['reference_chosen_logps'])
              - (expected['policy_rejected_logps'] - expected['reference_rejected_logps']))
    assert got['margin'] == pytest.approx(margin, abs=5e-4)
    assert abs(got['margin']) > 1e-2  # different models: the margins are not trivially zero


def test_reference_equal_to_policy_gives_zero_margin(tmp_path):
  out, _ = _run(tmp_path, _id_rows(5, seed=1, max_response=8), reference=POLICY)
  for row in out:
    assert row['policy_chosen_logps'] == row['reference_chosen_logps']
    assert row['margin'] == 0.0


def test_without_reference_the_margin_is_the_logp_difference(tmp_path):
  out, _ = _run(tmp_path, _id_rows(4, seed=2, max_response=8), batch_size=16)
  for row in out:
    assert 'reference_chosen_logps' not in row
    assert row['margin'] == pytest.approx(row['policy_chosen_logps']
                                          - row['policy_rejected_logps'], abs=1e-6)


def test_as_reference_writes_training_ready_reference_columns(tmp_path):
  rows = _id_rows(4, seed=3, max_response=8)
  for r in rows:
    r['behavior_chosen_logps'], r['behavior_rejected_logps'] = -1.5, -2.5
  out, _ = _run(tmp_path, rows, as_reference=True)
  plain, _ = _run(tmp_path, rows)
  for got, ref in zip(out, plain):
    assert got['reference_chosen_logps'] == ref['policy_chosen_logps']
    assert 'policy_chosen_logps' not in got and 'margin' not in got
    assert got['behavior_chosen_logps'] == -1.5
    # The output row is itself a valid token-id training row with both log-prob kinds.
    parsed = sources.parse_pairs(got)
    assert parsed.logps['reference_rejected_logps'] == got['reference_rejected_logps']
    assert parsed.logps['behavior_rejected_logps'] == -2.5


def test_text_rows_are_tokenized_like_training(tmp_path):
  tok_dir = tokenizer_util.build_tokenizer(tmp_path / 'tok')
  model_dir = tmp_path / 'model'
  hf.save_model(Llama(LlamaConfig.tiny(vocab_size=384), rngs=nnx.Rngs(3)), str(model_dir))
  rows = [dict(prompt='Human: How do I bake bread?', chosen=' Mix flour and water.',
               rejected=' No idea.'),
          dict(prompt='The quick brown fox', chosen=' jumps.', rejected=' sleeps on the mat.'),
          dict(prompt='same', chosen='x', rejected='x')]  # dropped: identical responses
  out, summary = _run(tmp_path, rows, model=str(model_dir), tokenizer=tok_dir, batch_size=2)
  assert summary['dropped'] == {'identical_responses': 1} and len(out) == 2
  expected = PairTokenizer(_config().data, tok_dir)([sources.parse_pairs(r) for r in rows[:2]])
  mesh = sharding.make_mesh(defaults.get_config().mesh, jax.devices()[:1])
  model = hf.load_model(str(model_dir), _config().model, mesh)
  for got, pair in zip(out, expected):
    assert got['prompt_ids'][0] == 1 and got['chosen_ids'][-1] == 2  # BOS ... EOS
    assert got['prompt_ids'] == pair['prompt_ids'] and got['rejected_ids'] == pair['rejected_ids']
    assert got['policy_chosen_logps'] == pytest.approx(
        _direct_logps(model, pair['prompt_ids'], pair['chosen_ids']), abs=2e-4)


def test_user_errors(tmp_path):
  with pytest.raises(ValueError, match='vocabulary has 128'):
    _run(tmp_path, _id_rows(2, vocab=300))
  with pytest.raises(ValueError, match='--as_reference'):
    _run(tmp_path, _id_rows(2), reference=POLICY, as_reference=True)
  with pytest.raises(FileNotFoundError, match='--pairs'):
    score.run(_config(), pairs_path=str(tmp_path / 'absent.jsonl'), out_path='x', model=POLICY,
              reference=None, tokenizer=None, batch_size=2, source='pairs', as_reference=False)


def test_command_line(tmp_path):
  rows = _id_rows(5, seed=4)
  pairs = _write_jsonl(tmp_path / 'pairs.jsonl', rows)
  out = tmp_path / 'scores.jsonl'
  cmd = [sys.executable, '-m', 'isdaa_jax.score', f'--model={POLICY}', f'--reference={POLICY}',
         f'--pairs={pairs}', f'--out={out}', '--batch_size=2', '--config.mesh.tensor=2',
         '--config.data.length_buckets=(16,32)', '--config.data.max_length=32',
         f'--cache_out={tmp_path / "ref.npz"}']
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4')
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'scored 5 of 5 pairs' in proc.stdout
  got = _read_jsonl(out)
  direct, _ = _run(tmp_path, rows)
  for a, b in zip(got, direct):
    assert a['margin'] == 0.0
    assert a['policy_chosen_logps'] == pytest.approx(b['policy_chosen_logps'], abs=1e-4)
  # --cache_out: the --reference log-probs under the key training computes for these pairs.
  config = defaults.get_config()
  config.data.max_length = 32
  key = reference_cache.fingerprint(
      [{k: r[k] for k in sources.ID_COLUMNS} for r in got], tokenizer=POLICY,
      data_config=config.data, reference=POLICY, model_config=config.model, seed=0)
  cached = reference_cache.load(tmp_path / 'ref.npz', key)
  np.testing.assert_allclose(cached['rejected_logps'], [r['reference_rejected_logps'] for r in got],
                             atol=1e-5)


@pytest.mark.parametrize('layout', [layout_lib.PrefixShared((16, 32)),
                                    layout_lib.Packed(40, shared=False),
                                    layout_lib.Packed(64, shared=True)])
def test_prefix_shared_and_packed_scoring_equal_padded_scoring(layout):
  pairs = _id_rows(n=7, seed=3)
  mesh = sharding.make_mesh(defaults.get_config().mesh, jax.devices()[:2])
  kwargs = dict(batch_size=4, chunk_size=8, progress=False)
  model = hf.load_model(POLICY, _config().model, mesh)
  padded = scoring.score_pairs(model, pairs, mesh, layout=layout_lib.Padded((16, 32)), **kwargs)
  other = scoring.score_pairs(model, pairs, mesh, layout=layout, **kwargs)
  for name in ('chosen_logps', 'rejected_logps', 'chosen_tokens', 'rejected_tokens'):
    np.testing.assert_allclose(getattr(other, name), getattr(padded, name), rtol=1e-5,
                               atol=1e-4, err_msg=name)


def test_out_may_not_be_an_input_and_is_replaced_atomically(tmp_path, monkeypatch):
  rows = _id_rows(4, seed=5) + [dict(prompt_ids=[1, 4], chosen_ids=[5, 2], rejected_ids=[5, 2])]
  pairs = _write_jsonl(tmp_path / 'in.jsonl', rows)
  before = pathlib.Path(pairs).read_bytes()
  (tmp_path / 'link.jsonl').symlink_to(pairs)
  args = dict(model=POLICY, reference=None, tokenizer=None, batch_size=2, source='pairs',
              as_reference=True)
  for out, cache in ((pairs, None), (str(tmp_path / 'link.jsonl'), None), (None, pairs),
                     (str(tmp_path / 'o'), str(tmp_path / 'o'))):
    with pytest.raises(UserError, match=r'(is the --pairs input|are both .*/o); '):
      score.run(_config(), pairs_path=pairs, out_path=out, cache_path=cache, **args)
  assert pathlib.Path(pairs).read_bytes() == before
  # A run that fails while writing leaves an earlier output as it was, and no temporary file.
  out = tmp_path / 'scores.jsonl'
  out.write_text('earlier\n')

  def fail_midway(*a, **kw):
    yield {'index': 0}
    raise RuntimeError('killed')

  monkeypatch.setattr(score, 'output_rows', fail_midway)
  with pytest.raises(RuntimeError, match='killed'):
    score.run(_config(), pairs_path=pairs, out_path=str(out), **args)
  assert out.read_text() == 'earlier\n' and sorted(p.name for p in tmp_path.iterdir()) == [
      'in.jsonl', 'link.jsonl', 'scores.jsonl']
  monkeypatch.undo()
  score.run(_config(), pairs_path=pairs, out_path=str(out), **args)
  assert len(_read_jsonl(out)) == 4 and pathlib.Path(pairs).read_bytes() == before


def test_lora_init_from_scores_the_adapted_policy(tmp_path):
  """--config.model.lora.init_from=ADAPTER scores base + adapter, exactly as scoring the merged
  checkpoint; the PEFT fixture's adapter (nonzero B) is written over llama_gqa by peft itself."""
  adapter = FIXTURES / 'lora_gqa'
  config = _config()
  config.model.lora.rank, config.model.lora.alpha = 4, 8.0
  config.model.lora.init_from = str(adapter)
  mesh = sharding.make_mesh(defaults.get_config().mesh, jax.devices()[:1])
  merged = policy_lib.load_model(config.model, POLICY, mesh)
  ref = np.load(adapter / 'reference.npz')
  ids_BT = jnp.asarray(ref['input_ids'])
  b, t = ids_BT.shape
  logits = np.asarray(merged(ids_BT, jnp.tile(jnp.arange(t), (b, 1)), jnp.ones((b, t), jnp.int32))
                      @ merged.unembedding())
  np.testing.assert_allclose(logits, ref['logits'], atol=1e-4, rtol=1e-4)  # peft's own logits
  hf.save_model(merged, str(tmp_path / 'merged'))
  rows = _id_rows(4, seed=3, max_response=8)
  with_adapter = score.run(config, pairs_path=_write_jsonl(tmp_path / 'in.jsonl', rows),
                           out_path=str(tmp_path / 'a.jsonl'), model=POLICY, reference=None,
                           tokenizer=None, batch_size=4, source='pairs', as_reference=False)
  assert with_adapter['kept'] == 4
  of_merged, _ = _run(tmp_path, rows, model=str(tmp_path / 'merged'), batch_size=4)
  of_base, _ = _run(tmp_path, rows, batch_size=4)
  for a, m, base in zip(_read_jsonl(tmp_path / 'a.jsonl'), of_merged, of_base):
    assert a['policy_chosen_logps'] == pytest.approx(m['policy_chosen_logps'], abs=1e-5)
    assert a['policy_rejected_logps'] == pytest.approx(m['policy_rejected_logps'], abs=1e-5)
    assert abs(a['policy_chosen_logps'] - base['policy_chosen_logps']) > 1e-3
