"""metrics.jsonl: rows past the step a run resumed from are dropped, so each step appears once."""

import json

from isdaa_jax import metrics_writer


def test_drop_after_keeps_rows_up_to_the_restored_step(tmp_path):
  w = metrics_writer.MetricsWriter(tmp_path, tensorboard=False)
  for step in range(0, 8):
    w.write(step, {'loss': 1.0 / (step + 1)})
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 8, "lo')  # a run killed mid-line
  w.drop_after(5)
  assert [r['step'] for r in metrics_writer.read_metrics(tmp_path)] == [0, 1, 2, 3, 4, 5]
  w.write(6, {'loss': 0.5})
  assert [r['step'] for r in metrics_writer.read_metrics(tmp_path)] == [0, 1, 2, 3, 4, 5, 6]
  assert not list(tmp_path.glob('*.tmp'))
  w.close()


def test_drop_after_with_nothing_to_drop_leaves_file_untouched(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text(json.dumps({'step': 1, 'loss': 0.5}) + '\n')
  before = path.stat().st_mtime_ns
  metrics_writer.MetricsWriter(tmp_path, tensorboard=False).drop_after(3)
  assert path.stat().st_mtime_ns == before
  metrics_writer.MetricsWriter(tmp_path / 'none', tensorboard=False).drop_after(0)  # no file
