"""The lab's synthetic alignment problem: a known gold reward that a proxy can over-optimize.

Vocabulary: PAD=0, BOS=1, EOS=2, then `num_topics` topic tokens, then `num_content` content tokens.
A prompt is BOS, one topic token and a few random content tokens. Each topic t owns the content
tokens whose index is congruent to t modulo num_topics (its "on-topic" set S(x)).

A response is content tokens followed by EOS. With k the fraction of on-topic tokens in it, the
gold reward is the concave hump

    gold(x, y) = 1 - ((k - k_star) / k_star)^2        (peak 1 at k = k_star, 0 at k = 0 and 2 k_star)

The reference policy is trained on demonstrations whose tokens are on-topic with probability
`demo_on_topic` < k_star, so on the reference's own samples "more on-topic tokens" is almost always
better, and Bradley-Terry preferences over those samples teach exactly that. A policy that follows
the learned preference past k_star gains proxy reward while the gold reward falls: reward
over-optimization with a known ground truth.
"""

import dataclasses

import numpy as np

PAD, BOS, EOS = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Task:
  num_topics: int
  num_content: int
  prompt_content: int  # content tokens after the topic token
  min_response: int  # content tokens in a demonstration (EOS not counted)
  max_response: int
  demo_on_topic: float  # on-topic probability per demonstration token
  k_star: float  # on-topic fraction of the gold-reward peak
  bt_temperature: float  # Bradley-Terry temperature of the preference labels

  @classmethod
  def from_config(cls, task_config) -> 'Task':
    return cls(**{f.name: task_config[f.name] for f in dataclasses.fields(cls)})

  @property
  def first_topic(self) -> int:
    return EOS + 1

  @property
  def first_content(self) -> int:
    return self.first_topic + self.num_topics

  @property
  def vocab_size(self) -> int:
    return self.first_content + self.num_content

  @property
  def prompt_length(self) -> int:
    return 2 + self.prompt_content

  def topic_of(self, prompt_ids_BP: np.ndarray) -> np.ndarray:
    return np.asarray(prompt_ids_BP)[:, 1] - self.first_topic

  def on_topic(self, topic_B: np.ndarray, tokens_BL: np.ndarray) -> np.ndarray:
    """[B, L] bool: which tokens are content tokens of the row's topic."""
    tokens_BL = np.asarray(tokens_BL)
    content = tokens_BL >= self.first_content
    idx = tokens_BL - self.first_content
    return content & (idx % self.num_topics == np.asarray(topic_B)[:, None])

  def sample_prompts(self, rng: np.random.Generator, n: int) -> np.ndarray:
    """[n, prompt_length] int32 prompts: BOS, topic, random content tokens."""
    topic = rng.integers(0, self.num_topics, n)
    content = rng.integers(0, self.num_content, (n, self.prompt_content))
    return np.concatenate([
        np.full((n, 1), BOS), (self.first_topic + topic)[:, None], self.first_content + content
    ], axis=1).astype(np.int32)

  def sample_demonstrations(self, rng: np.random.Generator, prompts_BP: np.ndarray):
    """Reference-policy training data: list of response token lists (ending with EOS)."""
    topics = self.topic_of(prompts_BP)
    per_topic = self.num_content // self.num_topics
    responses = []
    for t in topics:
      length = rng.integers(self.min_response, self.max_response + 1)
      on = rng.random(length) < self.demo_on_topic
      on_tok = self.first_content + t + self.num_topics * rng.integers(0, per_topic, length)
      off_idx = rng.integers(0, self.num_content - per_topic, length)
      # Map 0..(num_content - per_topic - 1) onto the content tokens of other topics.
      off_group, off_within = off_idx // (self.num_topics - 1), off_idx % (self.num_topics - 1)
      off_topic = (t + 1 + off_within) % self.num_topics
      off_tok = self.first_content + off_topic + self.num_topics * off_group
      responses.append(np.where(on, on_tok, off_tok).astype(np.int32).tolist() + [EOS])
    return responses

  def on_topic_fraction(self, prompts_BP, responses_BL, lengths_B) -> np.ndarray:
    """k per row: on-topic content tokens over all tokens before EOS (0 for an empty response)."""
    responses_BL = np.asarray(responses_BL)
    lengths_B = np.asarray(lengths_B)
    within = np.arange(responses_BL.shape[1])[None, :] < lengths_B[:, None]
    on = self.on_topic(self.topic_of(prompts_BP), responses_BL) & within
    return on.sum(1) / np.maximum(lengths_B, 1)

  def gold_reward(self, prompts_BP, responses_BL, lengths_B) -> np.ndarray:
    """The known gold reward of each (prompt, response); `lengths_B` counts tokens before EOS."""
    k = self.on_topic_fraction(prompts_BP, responses_BL, lengths_B)
    return 1.0 - np.square((k - self.k_star) / self.k_star)

  def preference_labels(self, rng: np.random.Generator, gold_a_B, gold_b_B) -> np.ndarray:
    """Bradley-Terry draw: True where response a is preferred over b."""
    logits = (np.asarray(gold_a_B) - np.asarray(gold_b_B)) / self.bt_temperature
    return rng.random(logits.shape) < 1.0 / (1.0 + np.exp(-logits))
