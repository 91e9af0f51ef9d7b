"""Plans a TPU run from a CPU machine: compiles the train step `main` would run for a slice.

  python -m isdaa_jax.plan --config=configs/hh.py --topology=v5p-32 [--out=plan.json] \
      [--find_batch] [--hbm_bytes=N] [--config.key=value ...]

The step comes from `train.setup(config, mesh)` (the one `train.run` jits) on a mesh of the
slice's devices from `jax.experimental.topologies`; its inputs are `jax.ShapeDtypeStruct`s that
carry their shardings, so no weights are read (with `model.path`, only its config.json) and no
data: the batch is `data.batch_size` pairs of the longest kept length (`data.max_length`,
`data.max_prompt_length`), the largest shape the run can see. XLA compiles it for the TPU
(libtpu, the `tpu` extra) without a TPU attached; a multi-host slice compiles in this one process.

Reported: per-chip bytes (parameters, optimizer state, reference, batch from the shardings;
XLA's temporaries; the total XLA allocates) against the chip's HBM; micro-batch, accumulation,
processes and per-host batch; model FLOPs per step (6N per token for the policy, 2N more for an
in-step reference, plus attention scores; rematerialization not counted) and XLA's count when the
compiled step has no loop (XLA counts a loop body once: scan_layers, grad_accum_steps > 1,
chunked log-probs); a roofline lower bound on step time and the pairs/s and MFU it implies;
collective bytes by kind per step from the compiled HLO (each loop body times its trip count);
parameters the sharding rules meant to shard that stayed replicated.
"""

import collections
import functools
import importlib.util
import json
import math
import os
import re
import sys

import jax
import numpy as np
from flax import nnx

from isdaa_jax import sharding, throughput, tpu_chips, train
from isdaa_jax.errors import UserError
from isdaa_jax.model.llama import Llama

COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')
_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'bf16': 2, 'f16': 2, 's32': 4,
                'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8}
# `%x = <result shape or tuple> <op>(`; an async pair is counted once, at its -done.
_OP_RE = re.compile(r'=\s*(\(.*?\)|[a-z0-9]+\[[0-9,]*\]\S*)\s+(' + '|'.join(COLLECTIVES)
                    + r')(-done)?\(')
_SHAPE_RE = re.compile(r'\b([a-z]+[0-9]*)\[([0-9,]*)\]')
# A computation's header, `%name (params) -> result {`.
_COMPUTATION_RE = re.compile(r'^(?:ENTRY\s+)?%(\S+)\s+\(.*\)\s+->\s+(.*)\s+\{$')
# libtpu emits a reduce-scatter as a custom fusion of this name whose body is an all-reduce of
# the full array and a dynamic-slice of the device's shard (the emitter runs it as one
# reduce-scatter); its all-reduce counts as a reduce-scatter of the fusion's result.
_REDUCE_SCATTER_FUSION = 'all-reduce-scatter'
# `while(%init), condition=%c, body=%b`; the computations other ops call (fusions, reducers,
# conditional branches).
_WHILE_RE = re.compile(r'\swhile\(.*?condition=%([\w.\-]+),\s*body=%([\w.\-]+)')
_CALLS_RE = re.compile(r'(?:calls|to_apply)=%([\w.\-]+)|'
                       r'(?:branch_computations|called_computations)=\{([^}]*)\}')
# A loop condition's integer constant, and its root `compare(%counter, %limit), direction=LT`.
_INT_CONSTANT_RE = re.compile(r'%([\w.\-]+)\s*=\s*[su](?:32|64)\[\]\S*\s+constant\((\d+)\)')
_LESS_THAN_ROOT_RE = re.compile(r'ROOT\s.*compare\(%[\w.\-]+,\s*%([\w.\-]+)\),\s*direction=LT')


class PlanError(UserError):
  """The slice or config cannot be planned; the message says what to change."""


def topology_devices(slice_: tpu_chips.Slice) -> list:
  """The slice's TPU devices, compiled for from this host with no TPU attached."""
  if importlib.util.find_spec('libtpu') is None:
    raise PlanError('the TPU compiler (libtpu) is not installed; run pip install -e ".[tpu]" '
                    'and rerun')
  # Compiling touches no TPU: several planners (a test and its CLI subprocess, a benchmark) may
  # load libtpu at once, which its lockfile would otherwise refuse.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    return list(topologies.get_topology_desc(topology_name=slice_.topology,
                                             platform='tpu').devices)
  except Exception as e:  # libtpu's own error for a shape it does not know  # pylint: disable=broad-except
    raise PlanError(f'libtpu does not know the topology {slice_.topology} '
                    f'({str(e).splitlines()[0][:120]}); pass a slice shape Cloud TPU offers, '
                    'e.g. v5p:2x2x4 or v5p-32') from None


def _longest_pairs(config, step_mode: str) -> list:
  """`data.batch_size` pairs of the longest kept length: the batch shapes a run can reach."""
  d = config.data
  response = d.max_length - d.max_prompt_length
  pair = dict(prompt_ids=np.ones(d.max_prompt_length, np.int32),
              chosen_ids=np.ones(response, np.int32), rejected_ids=np.ones(response, np.int32))
  if step_mode == 'precomputed':
    pair.update(reference_chosen_logps=0.0, reference_rejected_logps=0.0)
  return [pair] * d.batch_size


def abstract_batch(config, run_setup: train.Setup) -> dict:
  """The step's batch as ShapeDtypeStructs on `run_setup.batch_sharding`."""
  batch = run_setup.step.layout.collate(
      _longest_pairs(config, run_setup.step.reference),
      micro_batches=run_setup.step.grad_accum_steps, row_multiple=run_setup.data_parallel)
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=run_setup.batch_sharding)
          for k, v in batch.items()}


def _device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
  return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
             for a in jax.tree.leaves(tree))


def _shape_bytes(text: str) -> int:
  return sum(math.prod(int(x) for x in dims.split(',') if x) * _DTYPE_BYTES.get(dtype, 4)
             for dtype, dims in _SHAPE_RE.findall(text))


def _computations(hlo_text: str) -> tuple[dict, str]:
  """(name -> (result shape text, body lines), the ENTRY computation's name) of HLO text."""
  comps, entry, current = {}, '', None
  for line in hlo_text.splitlines():
    header = _COMPUTATION_RE.match(line)
    if header:
      current = header.group(1)
      comps[current] = (header.group(2), [])
      entry = current if line.startswith('ENTRY') else entry
    elif current is not None and line.startswith(' '):
      comps[current][1].append(line)
  return comps, entry


def _trip_count(condition_lines: list) -> int | None:
  """The trip count of a loop whose condition is `counter < constant` (how JAX's scan, map and
  fori_loop lower: the counter starts at 0 and steps by 1); None for any other condition."""
  constants = dict(_INT_CONSTANT_RE.findall('\n'.join(condition_lines)))
  for line in condition_lines:
    root = _LESS_THAN_ROOT_RE.search(line)
    if root and root.group(1) in constants:
      return int(constants[root.group(1)])
  return None


def _executions(comps: dict, entry: str) -> tuple[dict, int]:
  """(name -> times a computation runs per execution of `entry`, loops of unknown trip count).

  A while body runs its trip count per execution of the loop; every other called computation
  (fusions, reducers, branches: counted as if each ran) once per execution of its caller. A loop
  whose count is unknown counts once."""
  callers = collections.defaultdict(list)  # callee -> [(caller, times per caller execution)]
  unknown = 0
  for name, (_, lines) in comps.items():
    for line in lines:
      loop = _WHILE_RE.search(line)
      if loop:
        trips = _trip_count(comps.get(loop.group(1), ('', []))[1])
        unknown += trips is None
        callers[loop.group(2)].append((name, 1 if trips is None else trips))
        continue
      for single, group in _CALLS_RE.findall(line):
        for callee in ([single] if single else re.findall(r'%([\w.\-]+)', group)):
          callers[callee].append((name, 1))

  @functools.cache
  def runs(name: str) -> int:
    return 1 if name == entry else sum(runs(c) * k for c, k in callers[name])

  return {name: runs(name) for name in comps}, unknown


def collective_bytes(hlo_text: str) -> tuple[dict, int]:
  """(result bytes per device and step of each collective kind in compiled HLO text, loops whose
  trip count was not read and whose collectives therefore count once per loop)."""
  comps, entry = _computations(hlo_text)
  runs, unknown = _executions(comps, entry)
  out = dict.fromkeys(COLLECTIVES, 0)
  for name, (result, lines) in comps.items():
    # The all-reduce inside libtpu's all-reduce-scatter fusion is the shard's reduce-scatter.
    scatter_result = _shape_bytes(result) if name.startswith(_REDUCE_SCATTER_FUSION) else None
    for line in lines:
      for shape, kind, _ in _OP_RE.findall(line):
        if kind == 'all-reduce' and scatter_result is not None:
          out['reduce-scatter'] += scatter_result * runs[name]
        else:
          out[kind] += _shape_bytes(shape) * runs[name]
  return out, unknown


def unsharded_params(model_cfg, mesh) -> list:
  """'path [shape] axis' for each parameter dimension the rules map onto a mesh axis of size > 1
  that stayed replicated (the dimension does not divide, or the axis was taken)."""
  abstract = nnx.eval_shape(lambda: Llama(model_cfg, rngs=nnx.Rngs(0)))
  found = []
  for path, var in jax.tree_util.tree_leaves_with_path(
      nnx.state(abstract), is_leaf=lambda x: isinstance(x, nnx.Variable)):
    axes = var.get_metadata().get('logical_axes')
    if axes is None:
      continue
    shape = var.get_value().shape
    spec = tuple(sharding.logical_to_spec(axes, shape, mesh))
    taken = {a for s in spec if s for a in ((s,) if isinstance(s, str) else s)}
    for name, dim, got in zip(axes, shape, spec):
      rule = sharding.LOGICAL_RULES[name] if name else None
      rule = (rule,) if isinstance(rule, str) else tuple(rule or ())
      meant = [a for a in rule if mesh.shape[a] > 1 and a not in taken]
      if got is None and meant:
        found.append(f'{jax.tree_util.keystr(path)} {list(shape)} {name}->{"x".join(meant)}')
  return found


def model_flops(model_cfg, step_mode: str, rows: int, row_len: int) -> float:
  """FLOPs of one step by counting: 2N per token forward, 4N backward (2N with LoRA), 2N for an
  in-step reference; attention scores as XLA computes them (the full T x T, masked half included)."""
  tokens = rows * row_len
  attn_fwd = 4 * model_cfg.num_layers * model_cfg.num_heads * model_cfg.head_dim * row_len
  # With LoRA the reference forward in the step is the base, adapters off.
  passes = throughput.forward_equivalents(step_mode, lora=model_cfg.lora is not None)
  return passes * (2 * model_cfg.num_params() + attn_fwd) * tokens


def compile_plan(config, slice_: tpu_chips.Slice, hbm_bytes: int = 0) -> dict:
  """Compiles the train step for `slice_` and returns the plan (the JSON of the module doc)."""
  if config.model.attention == 'cudnn':
    raise PlanError("config.model.attention='cudnn' is a GPU kernel; plan a TPU run with "
                    "--config.model.attention=xla or blocked")
  devices = topology_devices(slice_)
  mesh = sharding.make_mesh(config.mesh, devices)
  run_setup = train.setup(config, mesh)
  state = run_setup.abstract_state
  # The in-step reference model, or with LoRA the frozen base (which is also the reference).
  reference = run_setup.abstract_frozen
  batch = abstract_batch(config, run_setup)
  compiled = run_setup.train_step.lower(state, reference, batch).compile()
  mem = compiled.memory_analysis()
  hlo = compiled.as_text()
  devices_per_chip = len(devices) // slice_.num_chips  # 2 where libtpu compiles per core (v4)
  per_device = {
      'params': _device_bytes(state.params), 'optimizer': _device_bytes(state.opt_state),
      'reference': _device_bytes(reference), 'batch': _device_bytes(batch),
      'temp': mem.temp_size_in_bytes, 'code': mem.generated_code_size_in_bytes,
      'total': (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)}
  per_chip = {k: v * devices_per_chip for k, v in per_device.items()}
  hbm = hbm_bytes or slice_.chip.hbm_bytes
  processes = len({d.process_index for d in devices})
  step, dp = run_setup.step, run_setup.data_parallel
  row_len = max(a.shape[1] for a in batch.values() if len(a.shape) == 2)
  rows = step.layout.row_tokens(batch) // row_len
  flops = model_flops(run_setup.model_cfg, step.reference, rows, row_len)
  has_loop = bool(re.search(r'\swhile\(', hlo))
  collectives, loops_counted_once = collective_bytes(hlo)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = None if has_loop else float(cost['flops']) * len(devices)
  # HBM traffic: XLA's per-op count without loops, else reading the inputs and writing the
  # outputs once (a lower bound).
  moved = (float(cost['bytes accessed']) if not has_loop
           else float(mem.argument_size_in_bytes + mem.output_size_in_bytes)) * devices_per_chip
  compute_s = flops / (slice_.num_chips * slice_.chip.peak_flops)
  memory_s = moved / slice_.chip.hbm_bandwidth
  step_s = max(compute_s, memory_s)
  batch_size = config.data.batch_size
  return {
      'topology': slice_.topology, 'chip': slice_.chip.name, 'num_chips': slice_.num_chips,
      'devices_per_chip': devices_per_chip, 'num_processes': processes,
      'chips_per_process': slice_.num_chips // processes,
      'mesh': dict(mesh.shape), 'batch_size': batch_size,
      'per_host_batch': batch_size // processes,
      'grad_accum_steps': step.grad_accum_steps,
      'per_device_micro_batch': batch_size // (step.grad_accum_steps * dp),
      'row_length': row_len, 'rows_per_step': rows, 'reference': config.train.reference,
      'num_params': run_setup.model_cfg.num_params(),
      'per_chip_bytes': per_chip, 'hbm_bytes_per_chip': hbm,
      'fits': per_chip['total'] <= hbm, 'hbm_margin_bytes': hbm - per_chip['total'],
      'flops_per_step': flops, 'xla_flops_per_step': xla_flops,
      'xla_flops_note': ('the compiled step has a loop (scan_layers, grad_accum_steps > 1 or '
                         'chunked log-probs): XLA counts its body once, so only the analytic '
                         'count is given') if has_loop else 'no loop: XLA counted every op',
      'hbm_bytes_moved_per_chip': moved,
      'roofline_compute_s': compute_s, 'roofline_memory_s': memory_s,
      'roofline_step_s': step_s, 'roofline_pairs_per_s': batch_size / step_s,
      'roofline_mfu': flops / (step_s * slice_.num_chips * slice_.chip.peak_flops),
      'collective_bytes_per_chip': {k: v * devices_per_chip for k, v in collectives.items()},
      'collective_loops_counted_once': loops_counted_once,
      'replicated_params': unsharded_params(run_setup.model_cfg, mesh),
  }


def find_batch(config, slice_: tpu_chips.Slice, hbm_bytes: int = 0, limit: int = 1024):
  """(largest per-device micro-batch that fits, its plan), by doubling then bisection on
  compiles; accumulation and the mesh stay as configured. (0, None) when 1 does not fit."""
  devices = topology_devices(slice_)
  mesh_sizes = sharding.mesh_shape(config.mesh, len(devices))
  unit = config.optimizer.grad_accum_steps * mesh_sizes[0] * mesh_sizes[1]
  plans = {}

  def fits(m):
    config.data.batch_size = m * unit
    plans[m] = compile_plan(config, slice_, hbm_bytes)
    return plans[m]['fits']

  good, bad = 0, None
  m = 1
  while m <= limit and fits(m):
    good, m = m, m * 2
  bad = m
  while bad - good > 1:
    mid = (good + bad) // 2
    good, bad = (mid, bad) if fits(mid) else (good, mid)
  return good, plans.get(good)


def _gib(x) -> str:
  for unit, scale in (('GiB', tpu_chips.GiB), ('MiB', 1024**2), ('KiB', 1024)):
    if abs(x) >= scale:
      return f'{x / scale:.2f} {unit}'
  return f'{x:.0f} B'


def format_table(plan: dict) -> str:
  """The plan as aligned `key  value` lines."""
  c, b = plan['per_chip_bytes'], plan['collective_bytes_per_chip']
  rows = [
      ('slice', f"{plan['topology']}: {plan['num_chips']} chips, {plan['num_processes']} "
                f"processes ({plan['chips_per_process']} chips each), mesh {plan['mesh']}"),
      ('batch', f"{plan['batch_size']} pairs/step = {plan['per_host_batch']} per host; "
                f"micro-batch {plan['per_device_micro_batch']} per device x "
                f"{plan['grad_accum_steps']} accumulation; rows of {plan['row_length']} tokens"),
      *((f'per chip: {k}', _gib(c[k])) for k in ('params', 'optimizer', 'reference', 'batch',
                                                 'temp', 'code', 'total')),
      ('HBM per chip', f"{_gib(plan['hbm_bytes_per_chip'])}: "
                       + ('fits' if plan['fits'] else 'DOES NOT FIT')
                       + f", margin {_gib(plan['hbm_margin_bytes'])}"),
      ('FLOPs/step (6N/8N + attention)', f"{plan['flops_per_step']:.3e}"),
      ('FLOPs/step (XLA)', f"{plan['xla_flops_per_step']:.3e}" if plan['xla_flops_per_step']
       else 'not counted: ' + plan['xla_flops_note']),
      ('roofline step', f"{plan['roofline_step_s'] * 1e3:.1f} ms (compute "
                        f"{plan['roofline_compute_s'] * 1e3:.1f} ms, HBM "
                        f"{plan['roofline_memory_s'] * 1e3:.1f} ms)"),
      ('roofline pairs/s, MFU', f"{plan['roofline_pairs_per_s']:.1f}, "
                                f"{plan['roofline_mfu']:.2f}"),
      ('collectives per chip and step', ', '.join(f'{k} {_gib(v)}' for k, v in b.items() if v)
       + (f" ({plan['collective_loops_counted_once']} loops of unread trip count counted once)"
          if plan['collective_loops_counted_once'] else '')),
      ('replicated params', '; '.join(plan['replicated_params']) or 'none'),
  ]
  width = max(len(k) for k, _ in rows)
  return '\n'.join(f'{k:<{width}}  {v}' for k, v in rows)


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from isdaa_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  del argv
  f = flags.FLAGS
  config = f.config
  try:
    config_lib.validate(config)
    slice_ = tpu_chips.parse(f.topology)
    if f.find_batch:
      best, plan = find_batch(config, slice_, f.hbm_bytes)
      if plan is None:
        raise PlanError(f'not even a micro-batch of 1 pair per device fits {slice_.topology}; '
                        'add fsdp/tensor devices, set --config.model.remat=full or take a '
                        'larger slice')
      plan['largest_per_device_micro_batch'] = best
    else:
      plan = compile_plan(config, slice_, f.hbm_bytes)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  print(format_table(plan))
  if f.out:
    with open(f.out, 'w') as fh:
      json.dump(plan, fh, indent=2)


if __name__ == '__main__':
  # Flags only when run as the command: importing the planner (tests, benchmarks) defines none.
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from isdaa_jax import cli  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
  flags.DEFINE_string('topology', None, 'TPU slice: v5p-32, v5litepod-16, v6e-8, v4-32 or '
                      'v5p:2x2x4.')
  flags.DEFINE_string('out', '', 'Write the plan as JSON here.')
  flags.DEFINE_integer('hbm_bytes', 0, 'HBM bytes per chip to plan against (0 = the chip\'s).')
  flags.DEFINE_bool('find_batch', False, 'Search the largest per-device micro-batch that fits.')
  flags.mark_flags_as_required(['config', 'topology'])
  app.run(main, flags_parser=cli.parse_flags)
