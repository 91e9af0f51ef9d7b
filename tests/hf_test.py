"""Hugging Face checkpoint I/O: parity with transformers' outputs, round trips, placement, errors.

The reference outputs come from transformers' PyTorch Llama (tests/fixtures/make_llama_fixtures.py,
which also checks that transformers loads what `save_model` writes: torch is not installed here).
"""

import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors import safe_open

from isdaa_jax import defaults
from isdaa_jax import sharding
from isdaa_jax.model import hf, logprobs

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'
CAUSAL = ('llama_gqa', 'llama_tied', 'llama_rope3', 'llama_sharded')


def _model_config(**overrides):
  cfg = defaults.get_config().model
  for k, v in overrides.items():
    setattr(cfg, k, v)
  return cfg


def _mesh(data=1, fsdp=1, tensor=1):
  mesh_cfg = defaults.get_config().mesh
  mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor = data, fsdp, tensor
  return sharding.make_mesh(mesh_cfg, jax.devices()[:data * fsdp * tensor])


def _ref(name):
  return dict(np.load(FIXTURES / name / 'reference.npz'))


def _hidden(model, ids, mask):
  positions = np.where(mask > 0, np.arange(ids.shape[1]), 0)
  return model(jnp.asarray(ids), jnp.asarray(positions, jnp.int32), jnp.asarray(mask))


def _logits(model, ids, mask):
  return np.asarray(_hidden(model, ids, mask) @ model.unembedding())


def _load(name, mesh=None, **overrides):
  return hf.load_model(str(FIXTURES / name), _model_config(**overrides), mesh or _mesh())


def _params(model):
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]}


@pytest.mark.parametrize('name', CAUSAL)
def test_logits_and_logps_match_transformers(name):
  ref = _ref(name)
  ids, mask = ref['input_ids'], ref['attention_mask']
  model = _load(name)
  hidden = _hidden(model, ids, mask)
  logits = np.asarray(hidden @ model.unembedding())
  real = mask.astype(bool)
  assert np.abs(logits - ref['logits'])[real].max() < 1e-4
  logps = np.asarray(logprobs.token_logps(hidden[:, :-1], model.unembedding(),
                                          jnp.asarray(ids[:, 1:]), chunk_size=4))
  valid = mask[:, 1:].astype(bool)
  np.testing.assert_allclose(logps[valid], ref['token_logps'][valid], atol=1e-4, rtol=0)
  # The comparison is not vacuous: the reference is far from uniform.
  assert ref['token_logps'][valid].std() > 0.5


def test_llama3_rope_scaling_is_read():
  cfg = hf.load_config(str(FIXTURES / 'llama_rope3'))
  assert cfg.rope_theta == 500000.0
  assert cfg.rope_scaling == dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0,
                                  high_freq_factor=4.0, original_max_position_embeddings=16)
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size) == (4, 1, 16, 32)


def test_transformers_4_config_spelling_gives_the_same_logits(tmp_path):
  src = FIXTURES / 'llama_rope3'
  config = json.loads((src / 'config.json').read_text())
  rope = config.pop('rope_parameters')
  config['rope_theta'] = rope.pop('rope_theta')
  config['rope_scaling'] = rope
  config['torch_dtype'] = config.pop('dtype')
  (tmp_path / 'config.json').write_text(json.dumps(config))
  shutil.copy(src / 'model.safetensors', tmp_path)
  ref = _ref('llama_rope3')
  logits = _logits(hf.load_model(str(tmp_path), _model_config(), _mesh()),
                   ref['input_ids'], ref['attention_mask'])
  real = ref['attention_mask'].astype(bool)
  assert np.abs(logits - ref['logits'])[real].max() < 1e-4


def test_save_writes_the_original_tensors_and_config(tmp_path):
  src = FIXTURES / 'llama_gqa'
  hf.save_model(_load('llama_gqa'), str(tmp_path))
  # Read back with the safetensors library itself.
  with safe_open(src / 'model.safetensors', 'numpy') as a, \
       safe_open(tmp_path / 'model.safetensors', 'numpy') as b:
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
      assert a.get_tensor(k).tobytes() == b.get_tensor(k).tobytes(), k
    assert b.metadata() == {'format': 'pt'}
  original = json.loads((src / 'config.json').read_text())
  saved = json.loads((tmp_path / 'config.json').read_text())
  for key in ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
              'num_attention_heads', 'num_key_value_heads', 'head_dim', 'rms_norm_eps',
              'rope_parameters', 'tie_word_embeddings', 'max_position_embeddings',
              'architectures', 'model_type', 'dtype'):
    assert saved[key] == original[key], key


def test_tied_checkpoint_round_trip_has_no_lm_head(tmp_path):
  model = _load('llama_tied')
  hf.save_model(model, str(tmp_path))
  with safe_open(tmp_path / 'model.safetensors', 'numpy') as f:
    assert 'lm_head.weight' not in f.keys()
  ref = _ref('llama_tied')
  again = hf.load_model(str(tmp_path), _model_config(), _mesh())
  np.testing.assert_array_equal(_logits(again, ref['input_ids'], ref['attention_mask']),
                                _logits(model, ref['input_ids'], ref['attention_mask']))


def test_sharded_checkpoint_write_and_read(tmp_path):
  model = _load('llama_sharded')  # itself read from 6 files + index
  hf.save_model(model, str(tmp_path), max_shard_bytes=20_000)
  index = json.loads((tmp_path / hf.INDEX_FILE).read_text())
  files = sorted(set(index['weight_map'].values()))
  assert len(files) > 2 and files[0] == f'model-00001-of-{len(files):05d}.safetensors'
  assert not (tmp_path / hf.SINGLE_FILE).exists()
  sizes = sum((tmp_path / f).stat().st_size for f in files)
  assert index['metadata']['total_size'] < sizes
  original = json.loads((FIXTURES / 'llama_sharded' / hf.INDEX_FILE).read_text())
  assert set(index['weight_map']) == set(original['weight_map'])
  again = hf.load_model(str(tmp_path), _model_config(), _mesh())
  a, b = _params(model), _params(again)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  # Saving again unsharded into the same folder leaves no stale index or shard behind.
  hf.save_model(again, str(tmp_path))
  assert sorted(p.name for p in tmp_path.iterdir()) == ['config.json', hf.SINGLE_FILE]


def test_bfloat16_parameters_round_trip(tmp_path):
  model = _load('llama_gqa', param_dtype='bfloat16')
  assert model.layers.wq.get_value().dtype == jnp.bfloat16
  hf.save_model(model, str(tmp_path))
  with safe_open(tmp_path / 'model.safetensors', 'flax') as f:
    assert f.get_tensor('model.layers.0.mlp.up_proj.weight').dtype == jnp.bfloat16
  assert json.loads((tmp_path / 'config.json').read_text())['dtype'] == 'bfloat16'
  # Without a model config the checkpoint's dtype is kept; read as float32 the values are exact.
  assert hf.load_config(str(tmp_path)).param_dtype == 'bfloat16'
  f32 = hf.load_model(str(tmp_path), _model_config(), _mesh())
  a, b = _params(model), _params(f32)
  for k in a:
    assert b[k].dtype == np.float32
    np.testing.assert_array_equal(a[k].astype(np.float32), b[k])


def test_params_land_on_their_shardings_on_a_2x2x2_mesh(monkeypatch):
  blocks = []
  read_block = hf._read_block

  def recording_read_block(w, layout, shape, idx):
    out = read_block(w, layout, shape, idx)
    blocks.append((layout, shape, out.shape))
    return out

  monkeypatch.setattr(hf, '_read_block', recording_read_block)
  mesh = _mesh(2, 2, 2)
  model = _load('llama_gqa', mesh=mesh)
  # Each device read only its quarter (fsdp x tensor) of every attention projection.
  heads = [(shape, got) for layout, shape, got in blocks if layout == 'heads_in']
  assert len(heads) == 3 * 2 * 8  # wq, wk, wv x 2 layers x 8 devices
  for shape, got in heads:
    assert got == (shape[0] // 2, shape[1] // 2, shape[2])
  state = nnx.state(model)
  expected = sharding.state_shardings(state, mesh)
  leaves = jax.tree.leaves(state)
  targets = jax.tree.leaves(expected)
  assert len(leaves) == len(targets) == 12
  for leaf, target in zip(leaves, targets):
    assert leaf.sharding.is_equivalent_to(target, leaf.ndim), (leaf.sharding, target)
  assert model.embed.get_value().sharding.spec == P('tensor', 'fsdp')
  assert model.layers.wq.get_value().sharding.spec == P(None, 'fsdp', 'tensor', None)
  shard = model.layers.w_down.get_value().addressable_shards[0].data
  assert shard.shape == (2, 32, 16)  # [L, F/tensor, D/fsdp]
  one = _params(_load('llama_gqa'))
  for k, v in _params(model).items():
    np.testing.assert_array_equal(v, one[k])
  ref = _ref('llama_gqa')
  logits = _logits(model, ref['input_ids'], ref['attention_mask'])
  real = ref['attention_mask'].astype(bool)
  assert np.abs(logits - ref['logits'])[real].max() < 1e-4


def test_reward_model_scores_match_transformers(tmp_path):
  ref = _ref('llama_reward')
  backbone, head = hf.load_reward_model(str(FIXTURES / 'llama_reward'), _model_config(), _mesh())
  assert head.shape == (32, 1)
  hidden = _hidden(backbone, ref['input_ids'], ref['attention_mask'])
  last = ref['attention_mask'].sum(axis=1) - 1
  scores = np.asarray(hidden[np.arange(len(last)), last] @ head)
  np.testing.assert_allclose(scores, ref['scores'], atol=1e-4, rtol=0)
  hf.save_reward_model(backbone, head, str(tmp_path), pad_token_id=0)
  with safe_open(FIXTURES / 'llama_reward' / 'model.safetensors', 'numpy') as a, \
       safe_open(tmp_path / 'model.safetensors', 'numpy') as b:
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
      assert a.get_tensor(k).tobytes() == b.get_tensor(k).tobytes(), k
  saved = json.loads((tmp_path / 'config.json').read_text())
  assert saved['architectures'] == ['LlamaForSequenceClassification']
  assert saved['pad_token_id'] == 0 and saved['id2label'] == {'0': 'LABEL_0'}


def _copy_fixture(tmp_path, name='llama_gqa'):
  dst = tmp_path / name
  shutil.copytree(FIXTURES / name, dst)
  return dst


def test_missing_tensor_is_named(tmp_path):
  folder = _copy_fixture(tmp_path)
  tensors = safetensors.numpy.load_file(folder / 'model.safetensors')
  del tensors['model.layers.1.mlp.up_proj.weight']
  safetensors.numpy.save_file(tensors, folder / 'model.safetensors', metadata={'format': 'pt'})
  with pytest.raises(hf.ModelFileError, match=r"no tensor 'model\.layers\.1\.mlp\.up_proj"):
    hf.load_model(str(folder), _model_config(), _mesh())


def test_mismatched_shape_names_tensor_and_both_shapes(tmp_path):
  folder = _copy_fixture(tmp_path)
  config = json.loads((folder / 'config.json').read_text())
  config['intermediate_size'] = 48
  (folder / 'config.json').write_text(json.dumps(config))
  with pytest.raises(hf.ModelFileError,
                     match=r"'model\.layers\.0\.mlp\.gate_proj\.weight'.*\(64, 32\).*\(48, 32\)"):
    hf.load_model(str(folder), _model_config(), _mesh())


def test_unknown_tensors_mean_another_architecture(tmp_path):
  folder = _copy_fixture(tmp_path)
  tensors = safetensors.numpy.load_file(folder / 'model.safetensors')
  tensors['model.layers.0.self_attn.q_proj.bias'] = np.zeros(32, np.float32)
  safetensors.numpy.save_file(tensors, folder / 'model.safetensors', metadata={'format': 'pt'})
  with pytest.raises(hf.ModelFileError, match='q_proj.bias'):
    hf.load_model(str(folder), _model_config(), _mesh())


def test_unreachable_hub_names_the_local_folder_alternative(monkeypatch):
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  with pytest.raises(hf.CheckpointNotFoundError) as e:
    hf.load_config('nobody-isdaa/no-such-model')
  message = str(e.value)
  assert 'config.model.path=/local/folder' in message and message.count('\n') == 0


def test_missing_folder_and_pickled_checkpoints(tmp_path):
  with pytest.raises(hf.CheckpointNotFoundError, match='neither a model folder nor a hub id'):
    hf.load_config(str(tmp_path / 'absent'))
  folder = _copy_fixture(tmp_path)
  (folder / 'model.safetensors').rename(folder / 'pytorch_model.bin')
  with pytest.raises(hf.CheckpointNotFoundError, match='never loaded'):
    hf.load_model(str(folder), _model_config(), _mesh())


def test_library_never_imports_torch():
  code = ('import sys, isdaa_jax.model.hf, isdaa_jax.score; '
          'assert "torch" not in sys.modules, "torch was imported"')
  subprocess.run([sys.executable, '-c', code], check=True, cwd=pathlib.Path(__file__).parents[1])
