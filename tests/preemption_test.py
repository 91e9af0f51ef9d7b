"""Ctrl-C: the first acts as SIGTERM (checkpoint, then exit 130), the second aborts at once."""

import os
import signal

import pytest

from isdaa_jax import preemption


def test_first_sigint_flags_a_checkpoint_second_aborts():
  p = preemption.Preemption()
  try:
    os.kill(os.getpid(), signal.SIGINT)
    assert p.raised and p.reached(7) and preemption.interrupted()
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  finally:
    p.restore()
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigterm_is_not_an_interrupt():
  p = preemption.Preemption()
  try:
    os.kill(os.getpid(), signal.SIGTERM)
    assert p.raised and not preemption.interrupted()
  finally:
    p.restore()
  fresh = preemption.Preemption()  # a new run forgets the previous run's signal
  fresh.restore()
  assert not fresh.raised and not preemption.interrupted()
