"""The TPU planner: the real train step compiled for TPU slices from this CPU host (libtpu)."""

import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from configs import tiny
from isdaa_jax import plan, tpu_chips
from isdaa_jax.model import lora
from isdaa_jax.model.llama import LlamaConfig

_REPO = pathlib.Path(__file__).parents[1]


def _tiny(**overrides):
  config = tiny.get_config()
  for key, value in overrides.items():
    section, name = key.split('__')
    config[section][name] = value
  return config


@pytest.fixture(scope='module')
def single():
  """Tiny DPO with an in-step reference on one v5p host (4 chips, fsdp=4)."""
  return plan.compile_plan(_tiny(), tpu_chips.parse('v5p:2x2x1'))


@pytest.fixture(scope='module')
def multi():
  """The same on 4 hosts (16 chips), mesh data=2 x fsdp=4 x tensor=2."""
  return plan.compile_plan(_tiny(data__batch_size=16, mesh__data=2, mesh__fsdp=4,
                                 mesh__tensor=2), tpu_chips.parse('v5p:2x2x4'))


def _param_bytes(config) -> int:
  # tiny: float32 parameters, tied embeddings.
  return 4 * LlamaConfig.from_model_config(config.model).num_params()


def _chunks(config) -> int:
  # Log-prob chunks of the longest row: the loop that gathers the vocabulary head and reduces its
  # gradient once per chunk.
  return -(-config.data.max_length // config.model.logprob_chunk_size)


def _batch_bytes(pairs: int, row_len: int) -> int:
  # Padded layout: 5 int32 [pairs, row_len] arrays per side.
  return 2 * 5 * 4 * pairs * row_len


@pytest.mark.parametrize('name, topology, chips', [
    ('v5p-8', 'v5p:2x2x1', 4), ('v5p-32', 'v5p:2x2x4', 16), ('v5p-128', 'v5p:4x4x4', 64),
    ('v4-32', 'v4:2x2x4', 16), ('v5litepod-16', 'v5e:4x4', 16), ('v6e-8', 'v6e:2x4', 8),
    ('v5p:2x2x4', 'v5p:2x2x4', 16), ('v6e:4x4', 'v6e:4x4', 16)])
def test_slice_names(name, topology, chips):
  s = tpu_chips.parse(name)
  assert (s.topology, s.num_chips) == (topology, chips)


@pytest.mark.parametrize('name', ['v7-8', 'v5p-12', 'v5p:2x2', 'tpu'])
def test_unknown_slice_is_one_sentence_listing_the_known(name):
  with pytest.raises(tpu_chips.UnknownTopologyError) as e:
    tpu_chips.parse(name)
  message = str(e.value)
  assert '\n' not in message and 'v5litepod-N' in message and 'v5p:AxBxC' in message


def test_missing_libtpu_says_how_to_install(monkeypatch):
  monkeypatch.setattr(plan.importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(plan.PlanError, match=r'pip install -e "\.\[tpu\]"'):
    plan.topology_devices(tpu_chips.parse('v5p-8'))


def test_collective_bytes_from_hlo_text():
  hlo = '\n'.join([
      '%all-reduce-scatter.3 (input.3: f32[256,512]) -> f32[64,512] {',
      '  %input.3 = f32[256,512]{1,0} parameter(0)',
      '  %all-reduce.9 = f32[256,512]{1,0} all-reduce(%input.3), to_apply=%add.1',
      '  ROOT %dynamic-slice.2 = f32[64,512]{1,0} dynamic-slice(%all-reduce.9, %i, %z)',
      '}',
      'ENTRY %main.1 (p.1: f32[4,1024]) -> (f32[8]) {',
      '  %all-gather.1 = bf16[4,1024]{1,0} all-gather(%p), dimensions={0}',
      '  %ar = (f32[8]{0}, s32[2,2]{1,0}) all-reduce(%a, %b), to_apply=%add',
      '  %cp-start = (f32[16]{0}, f32[16]{0}) collective-permute-start(%x)',
      '  %cp-done = f32[16]{0} collective-permute-done(%cp-start)',
      '  %fusion = f32[16]{0} fusion(%all-gather.1)',
      '  %rs = f32[64,512]{1,0} fusion(%g), kind=kCustom, calls=%all-reduce-scatter.3',
      '}'])
  got = plan.collective_bytes(hlo)
  # The all-reduce inside libtpu's all-reduce-scatter fusion is the shard's reduce-scatter.
  assert got == ({'all-gather': 4 * 1024 * 2, 'reduce-scatter': 64 * 512 * 4,
                  'all-reduce': 8 * 4 + 4 * 4, 'all-to-all': 0, 'collective-permute': 16 * 4}, 0)


def test_collective_bytes_count_each_loop_body_times_its_trip_count():
  hlo = '\n'.join([
      '%cond.1 (p.1: (s32[], f32[8])) -> pred[] {',
      '  %limit = s32[]{:T(128)} constant(5)',
      '  %p.1 = (s32[]{:T(128)}, f32[8]{0}) parameter(0)',
      '  %i = s32[]{:T(128)} get-tuple-element(%p.1), index=0',
      '  ROOT %lt = pred[]{:T(512)} compare(%i, %limit), direction=LT, metadata={op_name="lt"}',
      '}',
      '%inner_cond (p.2: (s32[], f32[8])) -> pred[] {',
      '  %n = s32[] constant(3)',
      '  ROOT %lt.2 = pred[] compare(%j, %n), direction=LT',
      '}',
      '%inner_body (p.3: (s32[], f32[8])) -> (s32[], f32[8]) {',
      '  %ag.2 = f32[16]{0} all-gather(%x), dimensions={0}',
      '  ROOT %t.2 = (s32[], f32[8]) tuple(%j, %x)',
      '}',
      '%body.1 (p.4: (s32[], f32[8])) -> (s32[], f32[8]) {',
      '  %ag.1 = bf16[4,1024]{1,0} all-gather(%w), dimensions={0}',
      '  %w.2 = (s32[], f32[8]) while(%t.0), condition=%inner_cond, body=%inner_body',
      '  %f = f32[8]{0} fusion(%ag.1), kind=kLoop, calls=%fused.1',
      '  ROOT %t.1 = (s32[], f32[8]) tuple(%i, %f)',
      '}',
      '%fused.1 (q: bf16[4,1024]) -> f32[8] {',
      '  ROOT %ar.1 = f32[8]{0} all-reduce(%q), to_apply=%add',
      '}',
      '%odd_cond (p.5: (s32[], f32[8])) -> pred[] {',
      '  ROOT %ne = pred[] compare(%i, %k), direction=NE',
      '}',
      '%odd_body (p.6: (s32[], f32[8])) -> (s32[], f32[8]) {',
      '  %cp = f32[4]{0} collective-permute(%y)',
      '}',
      'ENTRY %main (p.0: f32[8]) -> f32[8] {',
      '  %loop = (s32[]{:T(128)}, f32[8]{0}) while(%init), condition=%cond.1, body=%body.1, '
      'metadata={op_name="while"}',
      '  %odd = (s32[], f32[8]) while(%init), condition=%odd_cond, body=%odd_body',
      '  ROOT %ar.0 = f32[8]{0} all-reduce(%p.0), to_apply=%add',
      '}'])
  got, unread = plan.collective_bytes(hlo)
  # The outer body runs 5 times, the inner body 5 x 3, the fusion called from the outer body 5;
  # the loop whose condition is not `counter < constant` counts once and is reported.
  assert got['all-gather'] == 5 * 4 * 1024 * 2 + 15 * 16 * 4
  assert got['all-reduce'] == 5 * 8 * 4 + 8 * 4
  assert got['collective-permute'] == 4 * 4
  assert unread == 1


def test_scanned_layers_count_the_collectives_of_the_unrolled_model():
  """Collectives per step: with scan_layers the layer loop's body (and the chunked log-probs'
  loop) run once per layer (chunk), so the scanned step moves what the unrolled one does (before
  the trip counts, the scanned count was 38% of the unrolled one here)."""
  got = {}
  for scan in (False, True):
    config = _tiny(model__scan_layers=scan, model__num_layers=3, model__hidden_size=256,
                   model__intermediate_size=512, model__head_dim=64, model__logprob_chunk_size=16)
    got[scan] = plan.compile_plan(config, tpu_chips.parse('v5p:2x2x1'))
    assert got[scan]['collective_loops_counted_once'] == 0
  unrolled, scanned = (got[s]['collective_bytes_per_chip'] for s in (False, True))
  for kind in ('all-gather', 'reduce-scatter', 'all-reduce'):
    assert unrolled[kind] > 0
    assert abs(scanned[kind] - unrolled[kind]) <= 0.05 * unrolled[kind], kind


def test_single_host_shards_params_and_batch(single):
  config = _tiny()
  assert (single['num_chips'], single['num_processes'], single['mesh']) == (
      4, 1, {'data': 1, 'fsdp': 4, 'tensor': 1})
  c = single['per_chip_bytes']
  # Every tiny dimension the rules shard divides by 4: nothing stays replicated.
  assert single['replicated_params'] == []
  assert c['params'] == _param_bytes(config) / 4
  assert c['reference'] == c['params']
  assert c['optimizer'] >= 2 * c['params']  # Adam's two moments, sharded like the parameters
  assert c['batch'] == _batch_bytes(8, 48) / 4
  assert c['total'] >= c['params'] + c['optimizer'] + c['reference'] + c['batch'] + c['temp']
  assert single['fits'] and single['hbm_bytes_per_chip'] == 95 * tpu_chips.GiB
  assert (single['per_device_micro_batch'], single['grad_accum_steps']) == (2, 1)
  # Chunked log-probs compile to a loop: XLA's count would be a loop body's, so it is withheld.
  assert single['xla_flops_per_step'] is None
  assert single['roofline_step_s'] == max(single['roofline_compute_s'],
                                          single['roofline_memory_s'])
  assert math.isclose(single['roofline_pairs_per_s'], 8 / single['roofline_step_s'])
  # FSDP: the weights are gathered for each device's own rows. At this size XLA all-reduces
  # the gradients (one combined all-reduce, the vocabulary head's once per log-prob chunk, and
  # scalars): 1.09x those bytes here; before `llama.rows_over_data` XLA kept the weights in place
  # and all-reduced replicated activations, 37x the parameter bytes on this tiny model.
  head = 4 * config.model.vocab_size * config.model.hidden_size
  assert single['collective_bytes_per_chip']['all-reduce'] <= 1.25 * (
      4 * c['params'] + (_chunks(config) - 1) * head)
  assert single['collective_bytes_per_chip']['all-gather'] >= 4 * c['params']


def test_fsdp_reduce_scatters_gradients_of_large_matrices():
  """At hidden size 1024 XLA reduce-scatters every matrix's gradient to its fsdp shard (libtpu
  writes it as an all-reduce-scatter fusion): one shard's bytes of each, and only the norm
  scales' gradients and scalars stay all-reduced. (At hidden 32-256 it all-reduces the smaller
  ones instead, combined into one op.) The tied vocabulary head's gradient is reduced inside the
  log-prob chunk loop, so once per chunk."""
  config = _tiny(model__hidden_size=1024, model__intermediate_size=2048, model__vocab_size=2048,
                 model__head_dim=64, model__num_layers=1)
  got = plan.compile_plan(config, tpu_chips.parse('v5p:2x2x1'))
  b = got['collective_bytes_per_chip']
  norms = 4 * 1024 * (2 * 1 + 1)  # float32 [hidden] scales: two per layer and the final one
  chunks = _chunks(config)
  head_shard = 2048 * 1024  # float32 [V, D] over 4 chips
  assert b['reduce-scatter'] == (_param_bytes(config) - norms) / 4 + (chunks - 1) * head_shard
  # Plus each chunk's few int32 index all-reduces of the head's row gather (~4.6 KB: positions
  # of the chunk's sorted rows, `logprobs.masked_token_logps`).
  assert norms <= b['all-reduce'] < norms + chunks * 8192


@pytest.mark.parametrize('tied', [True, False])
def test_vocabulary_head_gradient_is_reduce_scattered_at_llama3_vocab(tied):
  """Issue 14: at Llama 3's vocabulary (128256) libtpu all-reduced the whole gradient of the
  vocabulary head (the tied embedding, or lm_head) when log-probs cast and gathered it as [D, V]
  (here 4 V D bytes; 0.49 GiB bf16 for Llama-3.2-1B on v5p-8). Now every matrix's gradient is
  reduce-scattered to its shard; the input embedding's lookup needs no reduction at all (its
  rows' gradients come by all-to-all), so untied, lm_head is the one vocabulary-sized shard."""
  v, d = 128256, 1024
  config = _tiny(model__hidden_size=d, model__intermediate_size=2048, model__vocab_size=v,
                 model__head_dim=64, model__num_layers=1, model__tie_word_embeddings=tied)
  got = plan.compile_plan(config, tpu_chips.parse('v5p:2x2x1'))
  b = got['collective_bytes_per_chip']
  norms = 4 * d * 3
  untied_embed = 0 if tied else 4 * v * d
  chunks = _chunks(config)
  assert norms <= b['all-reduce'] < norms + chunks * 8192
  # The head's shard (4 V D / 4 bytes) is reduce-scattered once per log-prob chunk.
  assert b['reduce-scatter'] == ((_param_bytes(config) - norms - untied_embed) / 4
                                 + (chunks - 1) * v * d)


def test_find_batch_doubles_then_bisects(monkeypatch):
  """The search, on plans whose fit is given: 1, 2, 4 by doubling, then 3 by bisection."""
  tried = []

  def fake(config, slice_, hbm_bytes=0):
    micro = config.data.batch_size // 4  # v5p-8: fsdp over 4 devices, no accumulation
    tried.append(micro)
    return {'per_device_micro_batch': micro, 'fits': micro <= 2}

  monkeypatch.setattr(plan, 'compile_plan', fake)
  best, got = plan.find_batch(_tiny(), tpu_chips.parse('v5p:2x2x1'))
  assert best == 2 and got == {'per_device_micro_batch': 2, 'fits': True}
  assert tried == [1, 2, 4, 3]


def test_find_batch_returns_a_micro_batch_that_fits_whose_successor_does_not(single, monkeypatch):
  # Real compiles: a budget 10% above the 2-pair-per-device step's bytes. (At this size the
  # compiled code and XLA's workspace, not the batch, are most of the bytes and need not grow
  # with the batch, so the test asserts what the search guarantees, not an exact answer.)
  budget = int(single['per_chip_bytes']['total'] * 1.1)
  tried = {}
  compile_plan = plan.compile_plan

  def recording(config, slice_, hbm_bytes=0):
    got = compile_plan(config, slice_, hbm_bytes)
    tried[got['per_device_micro_batch']] = got['fits']
    return got

  monkeypatch.setattr(plan, 'compile_plan', recording)
  best, got = plan.find_batch(_tiny(), tpu_chips.parse('v5p:2x2x1'), hbm_bytes=budget)
  assert best >= 1 and tried[best] and tried[best + 1] is False
  assert got['fits'] and got['per_device_micro_batch'] == best
  assert got['per_chip_bytes']['total'] <= budget and got['batch_size'] == 4 * best


def test_multi_host_topology_compiles_in_one_process(multi):
  config = _tiny(mesh__data=2, mesh__fsdp=4, mesh__tensor=2)
  assert (multi['num_chips'], multi['num_processes'], multi['chips_per_process']) == (16, 4, 4)
  assert multi['per_host_batch'] == 4 and multi['per_device_micro_batch'] == 2
  c = multi['per_chip_bytes']
  # The batch shards over data x fsdp = 8, not over the tensor axis.
  assert c['batch'] == _batch_bytes(16, 48) / 8
  # Matrices shard over fsdp x tensor = 8; only the norm scales (embed only) over fsdp alone.
  total = _param_bytes(config)
  norms = 4 * config.model.hidden_size * (2 * config.model.num_layers + 1)
  assert c['params'] == (total - norms) / 8 + norms / 4
  assert multi['replicated_params'] == []
  assert multi['collective_bytes_per_chip']['all-reduce'] > 0  # gradients over data x fsdp


def test_analytic_flops_match_xla_on_an_unrolled_model():
  t = 64
  config = _tiny(model__hidden_size=128, model__intermediate_size=384, model__vocab_size=512,
                 model__head_dim=32, model__max_position_embeddings=t,
                 model__logprob_chunk_size=0, data__max_length=t, data__max_prompt_length=t // 2,
                 data__length_buckets=(t,))
  got = plan.compile_plan(config, tpu_chips.parse('v5p:2x2x1'))
  assert got['xla_flops_per_step'] is not None, got['xla_flops_note']
  assert abs(got['xla_flops_per_step'] / got['flops_per_step'] - 1) < 0.1
  assert got['flops_per_step'] == plan.model_flops(
      LlamaConfig.from_model_config(config.model), 'model', rows=16, row_len=t)


def _plan_cli(*args):
  return subprocess.run([sys.executable, '-m', 'isdaa_jax.plan', '--config=configs/tiny.py',
                         *args], cwd=_REPO, env=dict(os.environ, JAX_PLATFORMS='cpu'),
                        capture_output=True, text=True, timeout=600)


def test_cli_writes_json_and_fit_flips_with_the_batch(single, tmp_path):
  # A budget just above the 8-pair step: the 64-pair step does not fit it.
  budget = single['per_chip_bytes']['total'] + 4096
  out = tmp_path / 'plan.json'
  res = _plan_cli('--topology=v5p-8', f'--hbm_bytes={budget}', f'--out={out}',
                  '--config.data.batch_size=64')
  assert res.returncode == 0, res.stderr[-3000:]
  got = json.loads(out.read_text())
  for key in ('topology', 'num_chips', 'num_processes', 'per_chip_bytes', 'hbm_bytes_per_chip',
              'fits', 'flops_per_step', 'roofline_step_s'):
    assert key in got
  assert set(got['per_chip_bytes']) >= {'params', 'optimizer', 'reference', 'batch', 'temp',
                                        'total'}
  assert got['hbm_bytes_per_chip'] == budget
  assert got['per_chip_bytes']['total'] > budget and not got['fits']
  assert 'DOES NOT FIT' in res.stdout


def test_cli_unknown_topology_is_one_sentence():
  res = _plan_cli('--topology=v9-8')
  assert res.returncode == 1
  assert 'Traceback' not in res.stderr
  last = res.stderr.strip().splitlines()[-1]
  assert last.startswith("error: unknown TPU slice 'v9-8'; pass one of the accelerator types")


def test_gpu_only_attention_is_refused_before_compiling():
  with pytest.raises(plan.PlanError, match="attention='cudnn' is a GPU kernel"):
    plan.compile_plan(_tiny(model__attention='cudnn'), tpu_chips.parse('v5p-8'))


def test_lora_plan_holds_the_base_once_and_adapters_with_their_moments():
  """Issue 16 with the planner: the step's frozen argument is the LoRA base (it is also the
  reference), sharded like the full model's parameters; only the small adapters carry Adam
  moments; the counted FLOPs drop the base's weight gradients."""
  config = _tiny()
  config.model.lora.rank = 4
  got = plan.compile_plan(config, tpu_chips.parse('v5p:2x2x1'))
  c = got['per_chip_bytes']
  assert c['reference'] == _param_bytes(config) / 4  # the float32 base, sharded over fsdp=4
  # Rank 4 on q, k, v, o, gate, up, down: 4 * (sum of in + out) = 2048 per layer, 2 layers, f32.
  # A shards with its projection's input axis (fsdp), B with its output axis (the tensor axis
  # of size 1 here, so B is replicated): per chip, between a quarter and all of the total.
  adapters = 4 * 2 * 4 * (64 + 48 + 48 + 64 + 96 + 96 + 96)
  assert adapters / 4 < c['params'] < adapters
  assert 2 * c['params'] <= c['optimizer'] < 3 * c['params'] + 1024
  cfg = LlamaConfig.from_model_config(config.model)
  lora_cfg = dataclasses.replace(cfg, lora=lora.LoraSpec.from_config(config.model))
  # Forward + input-gradient backward + base-as-reference forward = 3 of full DPO's 4 passes.
  full = plan.model_flops(cfg, 'model', rows=16, row_len=48)
  assert math.isclose(plan.model_flops(lora_cfg, 'model', rows=16, row_len=48), 0.75 * full)
