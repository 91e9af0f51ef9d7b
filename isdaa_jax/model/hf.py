"""Hugging Face Llama checkpoints (config.json + safetensors) <-> isdaa_jax `Llama`, without torch.

Loading reads `model.safetensors` or the sharded `model-0000x-of-0000y.safetensors` files named by
`model.safetensors.index.json`, one tensor at a time: every parameter is built with
`jax.make_array_from_callback`, so each device reads from the memory-mapped file only the slice
its sharding assigns it, converted to the parameter dtype. No unsharded copy of the model (or of
a stacked parameter) is ever held in host memory. Saving streams one tensor at a time the other
way. Only safetensors are read: nothing is unpickled and no remote code runs.

Tensor names and layouts are listed in `isdaa_jax.model.llama`'s module docstring.
"""

import dataclasses
import json
import pathlib
from typing import Optional

import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from huggingface_hub import errors as hub_errors
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from isdaa_jax import gguf_file, sharding
from isdaa_jax.errors import UserError
from isdaa_jax.model import gguf
from isdaa_jax.model import hf_config
from isdaa_jax.model import safetensors_io
from isdaa_jax.model.hf_config import ModelFileError
from isdaa_jax.model.llama import Llama, LlamaConfig

SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
# Shard size of saved checkpoints (Hugging Face's default is 5 GB as well).
MAX_SHARD_BYTES = 5 * 2**30
_METADATA = {'format': 'pt'}  # transformers refuses safetensors files without a known format

# Decoder parameter -> (HF tensor under model.layers.{i}., layout); the layouts are defined in
# `_read_block` / `_to_hf` below.
_LAYER_TENSORS = {
    'attn_norm': ('input_layernorm.weight', 'copy'),
    'wq': ('self_attn.q_proj.weight', 'heads_in'),
    'wk': ('self_attn.k_proj.weight', 'heads_in'),
    'wv': ('self_attn.v_proj.weight', 'heads_in'),
    'wo': ('self_attn.o_proj.weight', 'heads_out'),
    'mlp_norm': ('post_attention_layernorm.weight', 'copy'),
    'w_gate': ('mlp.gate_proj.weight', 'transpose'),
    'w_up': ('mlp.up_proj.weight', 'transpose'),
    'w_down': ('mlp.down_proj.weight', 'transpose'),
}
_TOP_TENSORS = {
    'embed': ('model.embed_tokens.weight', 'copy'),
    'final_norm': ('model.norm.weight', 'copy'),
    'lm_head': ('lm_head.weight', 'transpose'),
}
SCORE_TENSOR = 'score.weight'
# Tensors some checkpoints carry that hold nothing the model needs.
_IGNORED_SUFFIXES = ('rotary_emb.inv_freq',)


# ---------------------------------------------------------------------------------------------
# Layouts. HF Linear weights are [out, in]; ours are [in, out] with attention heads split out.

def _hf_shape(layout: str, shape: tuple) -> tuple:
  """HF tensor shape of one (per-layer) parameter of shape `shape`."""
  if layout == 'copy':
    return shape
  if layout == 'transpose':
    return shape[::-1]
  if layout == 'heads_in':  # [D, N, H] <- W [N*H, D]
    return (shape[1] * shape[2], shape[0])
  return (shape[2], shape[0] * shape[1])  # heads_out: [N, H, D] <- W [D, N*H]


def _read_block(w: np.ndarray, layout: str, shape: tuple, idx: tuple) -> np.ndarray:
  """Our slice `idx` (step-1 slices of `shape`) of HF tensor `w`, reading only that part."""
  if layout == 'copy':
    return w[idx]
  if layout == 'transpose':
    return w[idx[1], idx[0]].T
  if layout == 'heads_in':
    d, n, k = idx
    dh = shape[2]
    rows = w[n.start * dh:n.stop * dh, d]  # [n*H, d]
    return rows.T.reshape(d.stop - d.start, n.stop - n.start, dh)[:, :, k]
  n, k, d = idx
  dh = shape[1]
  cols = w[d, n.start * dh:n.stop * dh]  # [d, n*H]
  return cols.T.reshape(n.stop - n.start, dh, d.stop - d.start)[:, k, :]


def _to_hf(layout: str, a: np.ndarray) -> np.ndarray:
  if layout == 'copy':
    return a
  if layout == 'transpose':
    return a.T
  if layout == 'heads_in':
    return a.reshape(a.shape[0], -1).T
  return a.reshape(-1, a.shape[-1]).T


# ---------------------------------------------------------------------------------------------
# The parameters of a model and the HF tensors they come from.

@dataclasses.dataclass(frozen=True)
class _Param:
  path: tuple[str, ...]  # attribute path in the Llama module
  hf_names: tuple[str, ...]  # one per layer for stacked decoder parameters, else one
  layout: str

  @property
  def stacked(self) -> bool:
    return self.path[0] == 'layers'


def _params(cfg: LlamaConfig) -> list[_Param]:
  out = []
  for attr in ('embed', 'final_norm') + (() if cfg.tie_word_embeddings else ('lm_head',)):
    name, layout = _TOP_TENSORS[attr]
    out.append(_Param((attr,), (name,), layout))
  for attr, (suffix, layout) in _LAYER_TENSORS.items():
    names = tuple(f'model.layers.{i}.{suffix}' for i in range(cfg.num_layers))
    out.append(_Param(('layers', attr), names, layout))
  return out


def _variable(model: nnx.Module, path: tuple[str, ...]) -> nnx.Variable:
  obj = model
  for attr in path:
    obj = getattr(obj, attr)
  return obj


# ---------------------------------------------------------------------------------------------
# Where the files are.

class CheckpointNotFoundError(UserError, FileNotFoundError):
  """A local folder or hub id that does not lead to a usable checkpoint."""


_HUB_PATTERNS = ('*.json', '*.safetensors', 'tokenizer.model', '*.tiktoken', '*.txt')


def resolve(path_or_hub_id: str, patterns: tuple[str, ...] = _HUB_PATTERNS) -> pathlib.Path:
  """A local folder as is; a hub id downloaded (or taken from the cache) with huggingface_hub,
  only its files matching `patterns`."""
  path = pathlib.Path(path_or_hub_id).expanduser()
  if path.is_dir():
    return path
  looks_local = (path.exists() or str(path_or_hub_id).startswith(('/', '.', '~'))
                 or str(path_or_hub_id).count('/') != 1)
  if looks_local:
    raise CheckpointNotFoundError(
        f'{path_or_hub_id!r} is neither a model folder nor a hub id; give a local Hugging Face '
        'folder with config.json and *.safetensors, or a hub id such as meta-llama/Llama-3.2-1B')
  try:
    return pathlib.Path(huggingface_hub.snapshot_download(path_or_hub_id,
                                                          allow_patterns=list(patterns)))
  except (OSError, hub_errors.HfHubHTTPError, hub_errors.HFValidationError) as e:
    raise CheckpointNotFoundError(
        f'could not get {path_or_hub_id!r} from the Hugging Face hub ({type(e).__name__}); '
        'download it where the hub is reachable and pass the local folder instead, e.g. '
        'config.model.path=/local/folder') from e


def read_config(folder: pathlib.Path) -> dict:
  path = pathlib.Path(folder) / 'config.json'
  if not path.is_file():
    raise CheckpointNotFoundError(f'{folder} has no config.json; point to a Hugging Face model '
                                  'folder (as save_pretrained writes it)')
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ModelFileError(f'{path} is not valid JSON ({e}); fix or re-download it') from None


def load_config(path_or_hub_id: str, model_config=None) -> LlamaConfig:
  """The architecture in config.json (or a .gguf file's metadata), with `model_config`'s policy."""
  model_file = gguf_file.find(path_or_hub_id)
  if model_file is not None:
    return gguf.load_config(model_file, model_config)
  folder = resolve(path_or_hub_id)
  return hf_config.from_hf_dict(read_config(folder), model_config,
                                where=str(folder / 'config.json'))


class _Tensors:
  """Name -> lazily opened safetensors file, for a single-file or sharded checkpoint."""

  def __init__(self, folder: pathlib.Path):
    self.folder = folder
    self._readers = {}
    if (folder / INDEX_FILE).is_file():
      with open(folder / INDEX_FILE) as f:
        self.file_of = dict(json.load(f)['weight_map'])
    elif (folder / SINGLE_FILE).is_file():
      reader = safetensors_io.Reader(folder / SINGLE_FILE)
      self.file_of = {name: SINGLE_FILE for name in reader.keys()}
      self._readers[SINGLE_FILE] = reader
    else:
      pickled = sorted(p.name for p in folder.glob('*.bin')) + sorted(
          p.name for p in folder.glob('*.pt*'))
      hint = (f' (found {pickled[0]}: pickled checkpoints are never loaded; convert it with '
              'transformers save_pretrained(safe_serialization=True))') if pickled else ''
      raise CheckpointNotFoundError(f'{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}; '
                                    'point to a folder with safetensors weights')

  def reader(self, name: str) -> safetensors_io.Reader:
    fname = self.file_of[name]
    if fname not in self._readers:
      if not (self.folder / fname).is_file():
        raise CheckpointNotFoundError(f'{INDEX_FILE} in {self.folder} lists {fname}, which is '
                                      'missing; download the complete checkpoint')
      self._readers[fname] = safetensors_io.Reader(self.folder / fname)
    return self._readers[fname]

  def check(self, name: str, expected_shape: tuple):
    if name not in self.file_of:
      raise ModelFileError(f'checkpoint {self.folder} has no tensor {name!r}, which its '
                            'config.json architecture needs; the download is incomplete or it is '
                            'not a Llama checkpoint')
    shape = self.reader(name).shape(name)
    if shape != tuple(expected_shape):
      raise ModelFileError(f'tensor {name!r} in {self.folder} has shape {shape} but '
                            f'config.json implies {tuple(expected_shape)}; the weights and '
                            'config.json disagree')

  def array(self, name: str) -> np.ndarray:
    return self.reader(name).array(name)


# ---------------------------------------------------------------------------------------------
# Loading.

def _norm_index(idx: tuple, shape: tuple) -> tuple:
  return tuple(slice(*s.indices(n)[:2]) for s, n in zip(idx, shape))


def _load_param(tensors: _Tensors, p: _Param, shape: tuple, dtype, shd: NamedSharding):
  layer_shape = shape[1:] if p.stacked else shape

  def callback(idx):
    idx = _norm_index(idx, shape)
    if not p.stacked:
      return _read_block(tensors.array(p.hf_names[0]), p.layout, shape, idx).astype(dtype)
    layers = range(idx[0].start, idx[0].stop)
    return np.stack([_read_block(tensors.array(p.hf_names[i]), p.layout, layer_shape, idx[1:])
                     .astype(dtype) for i in layers])

  return jax.make_array_from_callback(shape, shd, callback)


def _load(folder: pathlib.Path, cfg: LlamaConfig, mesh: Mesh, extra: tuple[str, ...] = ()):
  return load_tensors(_Tensors(folder), cfg, mesh, extra)


def load_tensors(tensors, cfg: LlamaConfig, mesh: Mesh, extra: tuple[str, ...] = ()):
  """`cfg`'s Llama from `tensors` (HF names and layouts: a `_Tensors` or `gguf.Tensors`)."""
  folder = tensors.folder
  params = _params(cfg)
  model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  shardings = sharding.state_shardings(nnx.state(model), mesh)
  # Every name and shape is checked before anything is read.
  for p in params:
    shape = _variable(model, p.path).get_value().shape
    for name in p.hf_names:
      tensors.check(name, _hf_shape(p.layout, shape[1:] if p.stacked else shape))
  known = {n for p in params for n in p.hf_names} | set(extra) | {_TOP_TENSORS['lm_head'][0]}
  unknown = sorted(n for n in tensors.file_of
                   if n not in known and not n.endswith(_IGNORED_SUFFIXES))
  if unknown:
    raise ModelFileError(f'checkpoint {folder} has tensors a Llama model does not use (e.g. '
                          f'{unknown[0]!r}); it is a different architecture')
  for p in params:
    var = _variable(model, p.path)
    shd = shardings
    for attr in p.path:
      shd = shd[attr]
    abstract = var.get_value()
    var.set_value(_load_param(tensors, p, abstract.shape, abstract.dtype, shd))
  return model, tensors


def load_model(path_or_hub_id: str, model_config, mesh: Mesh) -> Llama:
  """A LlamaForCausalLM checkpoint as a `Llama` whose parameters sit on their mesh shardings.

  The architecture comes from config.json; dtypes, remat, scan and attention kernel from
  `model_config` (`config.model`).
  """
  model_file = gguf_file.find(path_or_hub_id)
  if model_file is not None:
    return gguf.load_model(model_file, model_config, mesh)
  folder = resolve(path_or_hub_id)
  model, _ = _load(folder, load_config(folder, model_config), mesh)
  return model


def load_reward_model(path_or_hub_id: str, model_config, mesh: Mesh) -> tuple[Llama, jax.Array]:
  """A LlamaForSequenceClassification checkpoint: (backbone, head [D, num_labels] replicated).

  The backbone has no output projection of its own (its `unembedding()` is the embedding, unused
  by a reward model); scores are `hidden[last real token] @ head`.
  """
  folder = resolve(path_or_hub_id)
  cfg = dataclasses.replace(load_config(folder, model_config), tie_word_embeddings=True)
  model, tensors = _load(folder, cfg, mesh, extra=(SCORE_TENSOR,))
  return model, _load_head(tensors, cfg, mesh)


def _load_head(tensors: _Tensors, cfg: LlamaConfig, mesh: Mesh) -> jax.Array:
  if SCORE_TENSOR not in tensors.file_of:
    raise ModelFileError(f'checkpoint {tensors.folder} has no {SCORE_TENSOR!r}; a reward model '
                          'must be a LlamaForSequenceClassification checkpoint')
  w = tensors.array(SCORE_TENSOR)
  if w.ndim != 2 or w.shape[1] != cfg.hidden_size:
    raise ModelFileError(f'tensor {SCORE_TENSOR!r} in {tensors.folder} has shape {w.shape} but '
                          f'config.json implies (num_labels, {cfg.hidden_size}); the weights and '
                          'config.json disagree')
  head = np.asarray(w).T.astype(jnp.dtype(cfg.param_dtype))
  return jax.device_put(head, NamedSharding(mesh, P()))


# ---------------------------------------------------------------------------------------------
# Saving.

def _host(x: jax.Array) -> np.ndarray:
  # On several hosts a sharded array is gathered (every process must call this).
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _save(model: Llama, out_dir: str, config: dict, extra: dict[str, jax.Array],
          max_shard_bytes: int):
  cfg = model.cfg
  specs, producers = [], {}
  for p in _params(cfg):
    var = _variable(model, p.path)
    for i, name in enumerate(p.hf_names):
      value = var.get_value()
      shape = value.shape[1:] if p.stacked else value.shape
      specs.append((name, _hf_shape(p.layout, shape), np.dtype(value.dtype)))
      producers[name] = (value, i if p.stacked else None, p.layout)
  for name, value in extra.items():
    specs.append((name, value.shape, np.dtype(value.dtype)))
    producers[name] = (value, None, 'copy')

  def produce(name):
    value, layer, layout = producers[name]
    return _to_hf(layout, _host(value if layer is None else value[layer]))

  files, size = [[]], 0
  for spec in specs:
    nbytes = int(np.prod(spec[1])) * spec[2].itemsize
    if files[-1] and size + nbytes > max_shard_bytes:
      files.append([])
      size = 0
    files[-1].append(spec)
    size += nbytes
  names = ([SINGLE_FILE] if len(files) == 1 else
           [f'model-{i + 1:05d}-of-{len(files):05d}.safetensors' for i in range(len(files))])
  if jax.process_index() != 0:
    for spec in specs:  # take part in the gathers that process 0 runs while writing
      produce(spec[0])
    return
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  # A previous save with other sharding would leave an index or files that shadow this one.
  for stale in [out / SINGLE_FILE, out / INDEX_FILE, *out.glob('model-*-of-*.safetensors')]:
    stale.unlink(missing_ok=True)
  for fname, file_specs in zip(names, files):
    safetensors_io.write(out / fname, file_specs, produce, _METADATA)
  if len(files) > 1:
    total = sum(int(np.prod(s[1])) * s[2].itemsize for s in specs)
    index = dict(metadata=dict(total_size=total),
                 weight_map={s[0]: fname for fname, fs in zip(names, files) for s in fs})
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
  (out / 'config.json').write_text(json.dumps(config, indent=2, sort_keys=True))


def token_id_fields(tokenizer) -> dict:
  """config.json's `bos/eos/pad_token_id` fields from a tokenizer (those it defines)."""
  ids = {f'{k}_token_id': getattr(tokenizer, f'{k}_token_id') for k in ('bos', 'eos', 'pad')}
  return {k: v for k, v in ids.items() if v is not None}


def save_model(model: Llama, out_dir: str, *, extra_config: Optional[dict] = None,
               max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
  """Writes config.json + safetensors that transformers loads as LlamaForCausalLM.

  `extra_config` adds config.json fields (e.g. the source's bos/eos/pad token ids).
  """
  config = hf_config.to_hf_dict(model.cfg, 'LlamaForCausalLM', **(extra_config or {}))
  _save(model, out_dir, config, {}, max_shard_bytes)


def save_reward_model(model: Llama, head_DL: jax.Array, out_dir: str, *, pad_token_id: int,
                      extra_config: Optional[dict] = None,
                      max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
  """Writes a LlamaForSequenceClassification checkpoint: backbone + `score.weight` = head.T.

  `model` is a backbone as `load_reward_model` returns it (no lm_head of its own).
  """
  if not model.cfg.tie_word_embeddings:
    raise ValueError('save_reward_model needs a backbone without lm_head, as load_reward_model '
                     'returns it')
  labels = head_DL.shape[1]
  config = hf_config.to_hf_dict(
      dataclasses.replace(model.cfg, tie_word_embeddings=False), 'LlamaForSequenceClassification',
      pad_token_id=pad_token_id, id2label={str(i): f'LABEL_{i}' for i in range(labels)},
      label2id={f'LABEL_{i}': i for i in range(labels)}, **(extra_config or {}))
  _save(model, out_dir, config, {SCORE_TENSOR: jnp.asarray(head_DL).T}, max_shard_bytes)
