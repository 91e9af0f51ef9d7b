"""The fixed-shape pair batch layout."""

import numpy as np
import pytest

from isdaa_jax.data import collate, packing, prefix


def _pair():
  return dict(prompt_ids=[1, 5, 6], chosen_ids=[7, 8, 2], rejected_ids=[9, 2],
              reference_chosen_logps=-3.0, reference_rejected_logps=-4.0)


def test_layout_marks_exactly_response_targets():
  b = collate.collate_pairs([_pair()], seq_len=8)
  np.testing.assert_array_equal(b['chosen_input_ids'][0], [1, 5, 6, 7, 8, 2, 0, 0])
  np.testing.assert_array_equal(b['chosen_targets'][0], [5, 6, 7, 8, 2, 0, 0, 0])
  # Targets under the mask are exactly the response tokens.
  m = b['chosen_loss_mask'][0].astype(bool)
  np.testing.assert_array_equal(b['chosen_targets'][0][m], [7, 8, 2])
  np.testing.assert_array_equal(b['rejected_targets'][0][b['rejected_loss_mask'][0] == 1], [9, 2])
  np.testing.assert_array_equal(b['rejected_segment_ids'][0], [1, 1, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(b['rejected_positions'][0], [0, 1, 2, 3, 4, 0, 0, 0])
  np.testing.assert_allclose(b['reference_chosen_logps'], [-3.0])
  assert 'behavior_chosen_logps' not in b


def test_bucket_choice_and_overflow_message():
  assert collate.bucket_for(5, (16, 8)) == 8
  assert collate.bucket_for(9, (16, 8)) == 16
  with pytest.raises(ValueError, match='length_buckets'):
    collate.bucket_for(17, (16, 8))
  with pytest.raises(ValueError, match='does not fit'):
    collate.collate_pairs([_pair()], seq_len=5)


def test_every_layout_refuses_a_pair_without_a_prompt_token():
  pair = dict(prompt_ids=[], chosen_ids=[3, 2], rejected_ids=[4, 2])
  for collate_fn in (lambda: collate.collate_pairs([pair], 8),
                     lambda: prefix.collate_shared([pair], 8),
                     lambda: packing.collate_packed([pair], 8, shared=False),
                     lambda: packing.collate_packed([pair], 8, shared=True)):
    with pytest.raises(ValueError, match='at least one prompt token'):
      collate_fn()
