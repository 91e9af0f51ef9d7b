"""Orbax checkpoints of the train state, the data iterator and the config.

Each step directory holds `state` (step, params, optimizer state), `data` (the Grain iterator
state, when the pipeline has one) and `config` (the resolved config as JSON). Orbax writes into a
temporary directory and renames it when complete, so a process killed mid-save leaves no
checkpoint behind; a checkpoint that is present but unreadable (a damaged disk, a truncated copy)
is moved aside to WORKDIR/checkpoints_corrupt/STEP (outside Orbax's view, so retention can never
keep it over a good one and the step is saved afresh) with a one-sentence warning, and the
previous one restored. Retention: the last `keep_last` plus, with `keep_best`, the one with the
lowest eval loss. A LoRA run's state is its adapters and their optimizer state, and each step also
holds `base` (the base weights' fingerprint): a resume over other base weights is refused.
"""

import contextlib
import errno
import gc
import logging as std_logging
import os
import pathlib
import shutil
import sys
import time
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging

from isdaa_jax.errors import UserError


class CheckpointError(UserError):
  """No readable checkpoint could be restored."""


def _policy(ckpt_config):
  latest = ocp.checkpoint_managers.LatestN(n=ckpt_config.keep_last)
  if not ckpt_config.keep_best:
    return latest
  best = ocp.checkpoint_managers.BestN(
      get_metric_fn=lambda m: m['eval_loss'], reverse=True, n=1,
      keep_checkpoints_without_metrics=False)
  return ocp.checkpoint_managers.AnyPreservationPolicy([latest, best])


class BaseMismatchError(UserError):
  """A LoRA checkpoint was trained over other base weights than this run's."""


class DiskFullError(UserError):
  """The disk filled up while a checkpoint was written."""


class NotWritableError(UserError):
  """The workdir or its checkpoints folder cannot be written."""


def check_writable(workdir) -> None:
  """Raises NotWritableError unless WORKDIR and WORKDIR/checkpoints (if present) take a file.

  Checked up front: a read-only workdir otherwise fails writing config.json, and a read-only
  checkpoints folder makes Orbax retry for minutes before it gives up.
  """
  workdir = pathlib.Path(workdir).absolute()
  for folder in (workdir, workdir / 'checkpoints'):
    if folder == workdir or folder.exists():
      probe = folder / f'.write_probe.{os.getpid()}'
      try:
        probe.write_bytes(b'')
        probe.unlink()
      except OSError as e:
        raise NotWritableError(
            f'{folder} is not writable ({e.strerror}); fix its permissions or pass another '
            '--workdir') from None


class Checkpointer:
  """Saves and restores (state, data iterator, config) under WORKDIR/checkpoints."""

  def __init__(self, workdir, ckpt_config, has_data_state: bool,
               base_fingerprint: Optional[str] = None):
    self.directory = pathlib.Path(workdir).absolute() / 'checkpoints'
    self.corrupt_directory = pathlib.Path(workdir).absolute() / 'checkpoints_corrupt'
    self._has_data = has_data_state
    self._base = base_fingerprint  # LoRA: the frozen base weights' `lora.fingerprint`
    options = ocp.CheckpointManagerOptions(
        preservation_policy=_policy(ckpt_config),
        enable_async_checkpointing=ckpt_config.async_save,
        create=True)
    items = (('state', 'config') + (('data',) if has_data_state else ())
             + (('base',) if base_fingerprint else ()))
    handlers = {'state': ocp.StandardCheckpointHandler(), 'config': ocp.JsonCheckpointHandler()}
    if base_fingerprint:
      handlers['base'] = ocp.JsonCheckpointHandler()
    if has_data_state:
      import grain  # pylint: disable=g-import-not-at-top
      handlers['data'] = grain.checkpoint.CheckpointHandler()
    self._manager = ocp.CheckpointManager(self.directory, item_names=items, options=options,
                                          item_handlers=handlers)

  def save(self, step: int, state, data_iterator, config_json: dict,
           eval_loss: Optional[float] = None, force: bool = False) -> bool:
    if step in self._manager.all_steps():
      return False  # e.g. a rerun that resumed at its final step: never overwrite a checkpoint
    args = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config_json))
    if self._has_data:
      import grain  # pylint: disable=g-import-not-at-top
      args['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    if self._base:
      args['base'] = ocp.args.JsonSave({'fingerprint': self._base})
    metrics = None if eval_loss is None else {'eval_loss': float(eval_loss)}
    with self._disk_full_is_one_sentence(step):
      return self._manager.save(step, args=ocp.args.Composite(**args), metrics=metrics,
                                force=force)

  @contextlib.contextmanager
  def _disk_full_is_one_sentence(self, step: Optional[int]):
    try:
      yield
    except OSError as e:
      if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        raise
      good = [s for s in self.all_steps() if s != step]
      previous = (f'the previous checkpoint (step {good[-1]}) is intact' if good
                  else 'no earlier checkpoint exists')
      raise DiskFullError(
          f'the disk holding {self.directory.parent} filled up while saving the checkpoint'
          f'{f" at step {step}" if step is not None else ""}; {previous}, so free some space '
          'and rerun the same command to resume') from None

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def restore_latest(self, abstract_state, data_iterator) -> Optional[Any]:
    """The newest readable checkpoint's state (iterator restored in place); None if there is none.

    Raises CheckpointError when checkpoints exist but none can be restored (a changed model or
    optimizer config, say): starting afresh would let retention delete them.
    """
    first_error, unreadable = None, []
    for step in reversed(self.all_steps()):
      self._check_base(step)
      args = dict(state=ocp.args.StandardRestore(abstract_state))
      if self._has_data:
        import grain  # pylint: disable=g-import-not-at-top
        args['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
      try:
        with _reads_of(self.directory / str(step)):
          restored = self._manager.restore(step, args=ocp.args.Composite(**args))
      except Exception as e:  # pylint: disable=broad-except
        first_error = first_error or f'step {step}: {type(e).__name__}: {_first_line(e)}'
        unreadable.append((step, f'{type(e).__name__}: {_first_line(e)}'))
        continue
      # Only once a good one restored: if none does (a changed config), all are left untouched.
      for bad_step, why in unreadable:
        moved = self._move_aside(bad_step)
        logging.warning('checkpoint at step %d was unreadable (%s), so it was moved to %s and '
                        'training resumes from step %d', bad_step, why, moved, step)
      return restored['state']
    if first_error is not None:
      raise CheckpointError(
          f'{self.directory} holds checkpoints but none matches this run ({first_error}); if '
          'the model or optimizer config changed, use a new --workdir (the checkpoints are left '
          'untouched)')
    return None

  def _check_base(self, step: int):
    """Raises BaseMismatchError when step's checkpoint was trained over other base weights."""
    if not self._base:
      return
    try:
      with _reads_of(self.directory / str(step)):
        saved = self._manager.restore(step, args=ocp.args.Composite(
            base=ocp.args.JsonRestore()))['base']['fingerprint']
    except Exception:  # pylint: disable=broad-except
      return  # unreadable: restore_latest sets it aside like any damaged checkpoint
    if saved != self._base:
      raise BaseMismatchError(
          f'the LoRA checkpoint at step {step} in {self.directory} was trained over other base '
          f'weights (fingerprint {saved[:12]}, this run\'s base {self._base[:12]}); set '
          'config.model.path (and lora.base_dtype) to the base it was trained on, or use a new '
          '--workdir')

  def _move_aside(self, step: int) -> Optional[pathlib.Path]:
    """Moves an unreadable step out of Orbax's view; returns where, or None if it stays.

    Left in place, it would count towards `keep_last`, the step would never be saved again
    (save skips existing steps) and retention would delete the good one restored instead.
    """
    source = self.directory / str(step)
    target = self.corrupt_directory / f'{step}.{time.strftime("%Y%m%dT%H%M%S")}'
    if jax.process_index() == 0 and source.exists():
      self.corrupt_directory.mkdir(parents=True, exist_ok=True)
      shutil.move(str(source), str(target))
    self._manager.reload()
    return target

  def wait(self):
    with self._disk_full_is_one_sentence(None):
      self._manager.wait_until_finished()

  def close(self):
    self._manager.close()


# The step directories being read or whose restore failed in this process: debris naming one
# is dropped.
_FAILED_READS: set[str] = set()


def _is_abandoned_read(exc: Optional[BaseException], tb) -> bool:
  """Whether an exception is debris of a failed Orbax restore, not a fault of its own.

  When one array of a checkpoint is unreadable, Orbax stops the restore and closes its event
  loop while TensorStore still completes the other reads. Those reads raise into a closed loop
  ('Event loop is closed', printed by TensorStore through `sys.excepthook`), are
  garbage-collected still holding their own error (through `sys.unraisablehook`), or are
  reported by asyncio as 'Task/Future exception was never retrieved' (through its logger, with
  the OUT_OF_RANGE read of a file in the failed step's directory). Python prints each as a
  traceback, after the one-sentence warning that already says what happened.
  """
  if exc is None:
    return False
  if isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed':
    return True
  # TensorStore's own futures carry no Python frames, only the path of the file they read.
  texts = [str(exc), repr(exc), str(exc.__cause__ or '')]
  if any(step_dir in text for step_dir in _FAILED_READS for text in texts):
    return True
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  return tb is not None and 'orbax' in tb.tb_frame.f_code.co_filename


class _DropAbandonedReads(std_logging.Filter):
  """asyncio's 'exception was never retrieved' records for a failed restore's reads."""

  drops_abandoned_reads = True

  def filter(self, record):
    exc = record.exc_info[1] if record.exc_info else None
    if 'never retrieved' in str(record.msg) and _is_abandoned_read(
        exc, exc.__traceback__ if exc is not None else None):
      logging.debug('dropped debris of a failed checkpoint read: %s', exc)
      return False
    return True


@contextlib.contextmanager
def _reads_of(step_dir: pathlib.Path):
  """Restores step_dir with the debris of a failed read dropped (see `_is_abandoned_read`).

  The filters go in before the restore, not once it has failed: TensorStore's callbacks run on
  its own threads and may print into the closed loop before the failure even reaches us (CI
  printed them ahead of the warning). They stay for the rest of the process, since the debris can
  surface at any later collection, callback or turn of the event loop; a step that restores
  leaves no debris, so its directory is forgotten again.
  """
  _drop_abandoned_reads()
  # Orbax may name the directory through its resolved path (a symlinked workdir).
  names = {str(step_dir), str(step_dir.resolve())} - _FAILED_READS
  _FAILED_READS.update(names)
  try:
    yield
  except Exception:
    gc.collect()  # The abandoned coroutines surface now, not in the middle of training output.
    raise
  _FAILED_READS.difference_update(names)


def _drop_abandoned_reads():
  """Installs, once per process, the filters on the three channels the debris prints through;
  everything they do not match still prints."""
  if not getattr(sys.unraisablehook, 'drops_abandoned_reads', False):
    previous_unraisable = sys.unraisablehook

    def unraisable_hook(unraisable):
      if _is_abandoned_read(unraisable.exc_value, unraisable.exc_traceback):
        logging.debug('dropped debris of a failed checkpoint read: %s', unraisable.exc_value)
      else:
        previous_unraisable(unraisable)

    unraisable_hook.drops_abandoned_reads = True
    sys.unraisablehook = unraisable_hook
  if not getattr(sys.excepthook, 'drops_abandoned_reads', False):
    previous_except = sys.excepthook

    def except_hook(exc_type, exc, tb):
      if _is_abandoned_read(exc, tb):
        logging.debug('dropped debris of a failed checkpoint read: %s', exc)
      else:
        previous_except(exc_type, exc, tb)

    except_hook.drops_abandoned_reads = True
    sys.excepthook = except_hook
  asyncio_logger = std_logging.getLogger('asyncio')
  if not any(getattr(f, 'drops_abandoned_reads', False) for f in asyncio_logger.filters):
    asyncio_logger.addFilter(_DropAbandonedReads())


def _first_line(e: Exception) -> str:
  lines = str(e).strip().splitlines()
  return (lines[0] if lines else '')[:200]
