"""Parsed pairs to token ids: chat template or plain format, one BOS, EOS-terminated responses.

Formatting of a `TextPair`:
  - prompt as messages, tokenizer with a chat template, `config.data.chat_format='auto'`: the prompt
    is the template with the generation prompt; each response is what the template adds for the
    final assistant message (end-of-turn token included, trailing whitespace removed).
  - prompt as messages otherwise (the plain format): HH's own transcript,
    "\\n\\nHuman: {user}\\n\\nAssistant: {assistant}...\\n\\nAssistant:" ("System:" for system
    messages), and each response is " " + its text, so an HH dialogue reads exactly as released.
  - prompt as a raw string (TL;DR, generic string rows): prompt and responses as they are.
Tokenization: prompt + response is encoded jointly and split after the prompt's own tokens (so the
response tokens are what follows the prompt in the full text); no special tokens are added by the
tokenizer; BOS is prepended once when the tokenizer uses one and the text did not already bring it;
EOS is appended to each response unless it already ends with it.

Truncation (like TRL and the DPO reference code): when prompt + longer response exceeds
`max_length`, the prompt keeps its last `max_prompt_length` tokens (and its BOS); if still too
long, both responses keep their first `max_length - len(prompt)` tokens. A pair is dropped when
truncation would change a pair that carries precomputed log-probs ('too_long': they were computed
on the whole sequence) or makes its two responses identical ('identical_after_truncation').
Token-id pairs skip formatting and tokenization but are truncated by the same rules.
"""

from typing import Sequence

import jinja2
import ml_collections

from isdaa_jax.data.sources import IdPair, TextPair
from isdaa_jax.errors import UserError

PLAIN_ROLES = {'user': 'Human', 'assistant': 'Assistant', 'system': 'System'}


class TokenizerError(UserError):
  """A tokenizer that cannot be loaded or used as configured; the message says what to change."""


def load_tokenizer(name: str):
  """`AutoTokenizer` from a folder or hub id (`config.data.tokenizer`, else `config.model.path`)."""
  if not name:
    raise TokenizerError('text pairs need a tokenizer: set config.data.tokenizer to a tokenizer '
                         "folder or hub id, or config.model.path to the model's")
  import transformers  # pylint: disable=g-import-not-at-top
  from isdaa_jax import gguf_file  # pylint: disable=g-import-not-at-top
  model_file = gguf_file.find(name)
  if model_file is not None:
    return gguf_file.load_tokenizer(model_file)
  try:
    return transformers.AutoTokenizer.from_pretrained(name)
  except (OSError, ValueError) as e:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200].rstrip('.')
    raise TokenizerError(f'could not load the tokenizer {name!r} ({reason}); set '
                         'config.data.tokenizer to a local tokenizer folder or a reachable hub '
                         'id') from None


def plain_prompt(messages: Sequence[dict[str, str]]) -> str:
  turns = ''.join(f"\n\n{PLAIN_ROLES.get(m['role'], m['role'].capitalize())}: {m['content']}"
                  for m in messages)
  return turns + '\n\nAssistant:'


def truncate(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int,
             max_prompt_length: int, bos_id: int | None):
  """(prompt, chosen, rejected, prompt_cut, response_cut) under the rules in the module doc."""
  longer = max(len(chosen), len(rejected))
  prompt_cut = response_cut = False
  if len(prompt) + longer > max_length and len(prompt) > max_prompt_length:
    keep_bos = bos_id is not None and prompt[0] == bos_id
    head = prompt[:1] if keep_bos else []
    prompt = head + prompt[len(prompt) - (max_prompt_length - len(head)):]
    prompt_cut = True
  budget = max_length - len(prompt)
  if longer > budget:
    chosen, rejected = chosen[:budget], rejected[:budget]
    response_cut = True
  return prompt, chosen, rejected, prompt_cut, response_cut


class PairTokenizer:
  """Formats, tokenizes and truncates parsed pairs.

  After each call, `self.cuts[k]` says which parts of pair k were truncated (prompt, response).
  """

  def __init__(self, data: ml_collections.ConfigDict, tokenizer_name: str, tokenizer=None):
    self._data = data
    self._name = tokenizer_name
    self._tok = tokenizer
    self._bos = None  # [bos_id or None] once known
    self.cuts: list[tuple[bool, bool]] = []

  @property
  def tokenizer(self):
    """The tokenizer, loaded on first use (token-id data never needs one)."""
    if self._tok is None:
      self._tok = load_tokenizer(self._name)
    return self._tok

  @property
  def has_tokenizer(self) -> bool:
    return self._tok is not None

  def bos_id(self) -> int | None:
    """BOS when the tokenizer adds one to plain text itself (Llama, Mistral), else None."""
    if self._tok is None:
      return None
    if self._bos is None:
      bos = self._tok.bos_token_id
      ids = self._tok('a')['input_ids']
      self._bos = [bos if bos is not None and ids and ids[0] == bos else None]
    return self._bos[0]

  def _use_template(self) -> bool:
    return self._data.chat_format == 'auto' and bool(self.tokenizer.chat_template)

  def _format(self, pair: TextPair) -> tuple[str, str, str] | str:
    if isinstance(pair.prompt, str):
      return pair.prompt, pair.chosen, pair.rejected
    if not self._use_template():
      return plain_prompt(pair.prompt), ' ' + pair.chosen, ' ' + pair.rejected
    tok = self.tokenizer
    try:
      prompt = tok.apply_chat_template(pair.prompt, tokenize=False, add_generation_prompt=True)
      fulls = [tok.apply_chat_template(pair.prompt + [{'role': 'assistant', 'content': text}],
                                       tokenize=False) for text in (pair.chosen, pair.rejected)]
    except jinja2.TemplateError:
      return 'chat_template_rejected'  # e.g. a template that demands strictly alternating roles
    for full in fulls:
      if not full.startswith(prompt):
        raise TokenizerError("the tokenizer's chat template does not render the conversation as "
                             'the prompt with its generation prompt followed by the response; set '
                             "config.data.chat_format='plain'")
    return prompt, fulls[0][len(prompt):].rstrip(), fulls[1][len(prompt):].rstrip()

  def _encode_texts(self, formatted: list[tuple[str, str, str]]) -> list[tuple[list[int], ...]]:
    tok = self.tokenizer
    eos = tok.eos_token_id
    if eos is None:
      raise TokenizerError(f'the tokenizer {self._name!r} has no EOS token to end responses with; '
                           'use a tokenizer that defines eos_token (config.data.tokenizer)')
    bos = self.bos_id()
    texts = [t for prompt, chosen, rejected in formatted
             for t in (prompt, prompt + chosen, prompt + rejected)]
    ids = tok(texts, add_special_tokens=False)['input_ids']
    prompts, responses, retry = [], [], []
    for k, (prompt, full_c, full_r) in enumerate(zip(ids[0::3], ids[1::3], ids[2::3])):
      prompts.append(prompt)
      for j, full in enumerate((full_c, full_r)):
        if full[:len(prompt)] == prompt:
          responses.append(full[len(prompt):])
        else:
          # A merge across the prompt/response boundary: encode the response alone instead.
          responses.append(None)
          retry.append((2 * k + j, formatted[k][1 + j]))
    if retry:
      alone = tok([text for _, text in retry], add_special_tokens=False)['input_ids']
      for (slot, _), resp in zip(retry, alone):
        responses[slot] = resp
    out = []
    for k, prompt in enumerate(prompts):
      sides = [r if r and r[-1] == eos else r + [eos] for r in responses[2 * k:2 * k + 2]]
      if bos is not None:
        while prompt[:2] == [bos, bos]:
          prompt = prompt[1:]
        if prompt[:1] != [bos]:
          prompt = [bos] + prompt
      out.append((prompt, *sides))
    return out

  def __call__(self, pairs: Sequence[TextPair | IdPair]) -> list[dict | str]:
    """One tokenized pair dict (`prompt_ids`, `chosen_ids`, `rejected_ids`, log-probs) or drop
    reason per input pair."""
    results: list = [None] * len(pairs)
    text_slots, formatted = [], []
    for k, pair in enumerate(pairs):
      if isinstance(pair, IdPair):
        results[k] = (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids)
        continue
      f = self._format(pair)
      if isinstance(f, str):
        results[k] = f
      else:
        text_slots.append(k)
        formatted.append(f)
    if formatted:
      for k, ids in zip(text_slots, self._encode_texts(formatted)):
        results[k] = ids
    bos = self.bos_id()
    finished = [(r, (False, False)) if isinstance(r, str) else self._finish(r, pair.logps, bos)
                for r, pair in zip(results, pairs)]
    self.cuts = [cuts for _, cuts in finished]
    return [r for r, _ in finished]

  def _finish(self, ids, logps: dict[str, float], bos: int | None):
    prompt, chosen, rejected = ids
    if not prompt:
      return 'empty_prompt', (False, False)
    prompt, chosen, rejected, prompt_cut, response_cut = truncate(
        prompt, chosen, rejected, self._data.max_length, self._data.max_prompt_length, bos)
    if (prompt_cut or response_cut) and logps:
      return 'too_long', (False, False)
    if chosen == rejected:
      return 'identical_after_truncation', (False, False)
    pair = dict(prompt_ids=prompt, chosen_ids=chosen, rejected_ids=rejected, **logps)
    return pair, (prompt_cut, response_cut)
