"""Preemption (SIGTERM) handling that agrees on one checkpoint step across processes."""

import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils


class Preemption:
  """Says when to checkpoint and exit after a preemption notice (SIGTERM), on every process alike.

  One process: a Python SIGTERM handler sets a flag. Several: JAX's preemption service (started by
  `jax.distributed.initialize`, it catches SIGTERM on whichever hosts get it) agrees on one step
  at which `reached(step)` turns true everywhere, so all processes save together rather than some
  entering a collective save that the others never join.
  """

  def __init__(self):
    self._raised = False
    self._previous = None
    self._multihost = jax.process_count() > 1
    if not self._multihost and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning('SIGTERM received: checkpointing and exiting')
    self._raised = True

  def reached(self, step: int) -> bool:
    """Called once per step, at the same steps on every process."""
    if self._multihost and not self._raised:
      self._raised = multihost_utils.reached_preemption_sync_point(step)
      if self._raised:
        logging.warning('preemption: all processes checkpoint at step %d and exit', step)
    return self._raised

  @property
  def raised(self) -> bool:
    return self._raised

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
