"""Preemption (SIGTERM) and Ctrl-C (SIGINT) handling that agrees on one checkpoint step.

A first Ctrl-C acts as SIGTERM (checkpoint at the current step, then exit; `interrupted()` tells
the entry point to exit with status 130); a second one aborts at once with KeyboardInterrupt.
"""

import signal
import threading
from typing import Optional

import jax
from absl import logging
from jax.experimental import multihost_utils


_last_signal: Optional[int] = None  # the signal that stopped the latest run in this process


def interrupted() -> bool:
  """Whether the latest run stopped for a Ctrl-C (its checkpoint is written)."""
  return _last_signal == signal.SIGINT


class Preemption:
  """Says when to checkpoint and exit after a preemption notice (SIGTERM), on every process alike.

  One process: a Python SIGTERM handler sets a flag. Several: JAX's preemption service (started by
  `jax.distributed.initialize`, it catches SIGTERM on whichever hosts get it) agrees on one step
  at which `reached(step)` turns true everywhere, so all processes save together rather than some
  entering a collective save that the others never join.
  """

  def __init__(self):
    global _last_signal
    _last_signal = None
    self._raised = False
    self._previous = {}
    self._multihost = jax.process_count() > 1
    if not self._multihost and threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    global _last_signal
    if signum == signal.SIGINT and self._raised:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now, not at the end of the step
    name = 'Ctrl-C' if signum == signal.SIGINT else 'SIGTERM'
    logging.warning('%s received: checkpointing at the current step and exiting%s', name,
                    ' (press Ctrl-C again to abort without saving)'
                    if signum == signal.SIGINT else '')
    _last_signal = signum
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
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}
