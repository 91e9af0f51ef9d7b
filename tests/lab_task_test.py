"""The lab's task (gold reward, demonstrations, labels) and its analysis (R(d) fit, summaries)."""

import dataclasses

import numpy as np
import pytest

from isdaa_jax.lab import defaults as lab_defaults
from isdaa_jax.lab import report
from isdaa_jax.lab.task import EOS, Task


@pytest.fixture
def task():
  return Task.from_config(lab_defaults.get_config('quick').lab.task)


def test_gold_reward_is_a_hump_in_the_on_topic_fraction(task):
  task = dataclasses.replace(task, k_star=0.5)
  prompts = task.sample_prompts(np.random.default_rng(0), 3)
  topic = task.topic_of(prompts)
  on = task.first_content + topic[:, None] + task.num_topics * np.arange(4)[None, :]
  off = task.first_content + (topic[:, None] + 1) % task.num_topics + np.zeros((1, 4), int)
  for n_on, want in [(0, 0.0), (2, 1.0), (4, 0.0), (1, 0.75)]:
    resp = np.concatenate([on[:, :n_on], off[:, :4 - n_on]], axis=1)
    np.testing.assert_allclose(task.gold_reward(prompts, resp, np.full(3, 4)), want)


def test_demonstrations_have_the_configured_on_topic_rate_and_end_with_eos(task):
  rng = np.random.default_rng(1)
  prompts = task.sample_prompts(rng, 4000)
  demos = task.sample_demonstrations(rng, prompts)
  assert all(d[-1] == EOS and task.min_response <= len(d) - 1 <= task.max_response
             for d in demos)
  tokens = np.zeros((len(demos), task.max_response), np.int32)
  lengths = np.array([len(d) - 1 for d in demos])
  for i, d in enumerate(demos):
    tokens[i, :len(d) - 1] = d[:-1]
  k = task.on_topic_fraction(prompts, tokens, lengths)
  assert abs(k.mean() - task.demo_on_topic) < 0.01
  # Off-topic tokens are spread over every other topic's tokens.
  assert len(np.unique(tokens[tokens > 0])) == task.num_content
  # On most demonstrations more on-topic tokens is better: the proxy the preferences teach.
  assert np.mean(k < task.k_star) > 0.75


def test_bradley_terry_labels_follow_the_gold_gap(task):
  rng = np.random.default_rng(2)
  a = np.full(20000, 0.6)
  b = np.full(20000, 0.5)
  p = task.preference_labels(rng, a, b).mean()
  assert abs(p - 1 / (1 + np.exp(-0.1 / task.bt_temperature))) < 0.015


def test_rd_fit_recovers_known_coefficients():
  d = np.linspace(0.05, 3.0, 40)
  gain = d * (1.3 - 0.7 * np.log(d))
  a, b = report.fit_rd(d, gain)
  assert a == pytest.approx(1.3, abs=1e-9) and b == pytest.approx(0.7, abs=1e-9)


def test_summaries_and_verdict_over_seeds():
  points = []
  for seed in range(3):
    for imp in (False, True):
      for step, (kl, gold) in enumerate([(0.0, 0.5), (1.0, 0.8), (4.0, 0.6 if imp else 0.2)]):
        points.append(dict(method='dpo', importance=imp, beta=0.1, seed=seed, step=step * 10,
                           kl=kl + 0.01 * seed, gold=gold + 0.01 * seed))
  rows = report.summarize(points)
  assert len(rows) == 2 and all(r['seeds'] == 3 for r in rows)
  off = next(r for r in rows if not r['importance'])
  assert off['peak_gold'] == pytest.approx(0.81) and off['drop'] == pytest.approx(0.6)
  assert off['kl_at_peak'] == pytest.approx(1.01)
  mean, ci = report.mean_ci95([1.0, 2.0, 3.0])
  assert mean == 2.0 and ci == pytest.approx(4.303 * 1.0 / np.sqrt(3))
  # Every seed's with-minus-without final gold is 0.4: an interval of width 0 excludes zero.
  assert report.paired(rows[1], rows[0]) == (pytest.approx(0.4), pytest.approx(0.0), 3)
  text = report.verdict(rows)
  assert 'raised the final gold reward in 1 and lowered it in 0 of 1' in text
  assert 'Without the weight 1 of 1 settings over-optimized' in text
  assert "At each method's lowest beta the weight helped in every method" in text
  # With no difference the verdict says plainly that the lab disagrees with the paper.
  same = [dict(p, gold=p['gold'] if not p['importance'] else
               next(q['gold'] for q in points if not q['importance'] and q['seed'] == p['seed']
                    and q['step'] == p['step'])) for p in points]
  text = report.verdict(report.summarize(same))
  assert 'raised the final gold reward in 0 and lowered it in 0 of 1' in text
  assert "The lab disagrees with the IS-DAA paper's claim" in text
