"""Formatting, tokenization and truncation of parsed pairs with tokenizers trained in the tests."""

import json
import pathlib

import pytest
import transformers

import tokenizer_util
from isdaa_jax import defaults
from isdaa_jax.data import collate, sources, tokenize

BOS, EOS = 1, 2
HH_FIXTURE = pathlib.Path(__file__).parent / 'fixtures' / 'data' / 'hh_small.jsonl'
MESSAGES = [{'role': 'user', 'content': 'How do I bake bread?'},
            {'role': 'assistant', 'content': 'Do you have yeast?'},
            {'role': 'user', 'content': 'Yes, and flour. Café 東京 🙂'}]
PAIR = sources.TextPair(MESSAGES, 'Mix, knead, rise, bake.', 'Buy some bread.')


@pytest.fixture(scope='module')
def plain_tok(tmp_path_factory):
  path = tokenizer_util.build_tokenizer(tmp_path_factory.mktemp('plain'))
  return transformers.AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope='module')
def chat_tok(tmp_path_factory):
  path = tokenizer_util.build_tokenizer(tmp_path_factory.mktemp('chat'), chat_template=True)
  return transformers.AutoTokenizer.from_pretrained(path)


def _data(**overrides):
  data = defaults.data_config()
  data.max_length, data.max_prompt_length = 512, 256
  for key, value in overrides.items():
    data[key] = value
  return data


def _encode(tok, text):
  return tok(text, add_special_tokens=False)['input_ids']


def test_plain_format_one_bos_eos_and_joint_tokens(plain_tok):
  assert plain_tok('hi')['input_ids'][0] == BOS  # the tokenizer itself adds BOS
  pt = tokenize.PairTokenizer(_data(), '', plain_tok)
  (pair,) = pt([PAIR])
  prompt_text = tokenize.plain_prompt(MESSAGES)
  assert prompt_text == ('\n\nHuman: How do I bake bread?\n\nAssistant: Do you have yeast?'
                         '\n\nHuman: Yes, and flour. Café 東京 🙂\n\nAssistant:')
  assert pair['prompt_ids'] == [BOS] + _encode(plain_tok, prompt_text)
  assert pair['prompt_ids'].count(BOS) == 1
  for side, text in (('chosen', PAIR.chosen), ('rejected', PAIR.rejected)):
    ids = pair[f'{side}_ids']
    assert ids[-1] == EOS and ids.count(EOS) == 1
    # The token stream is the tokenization of the whole transcript.
    assert pair['prompt_ids'][1:] + ids[:-1] == _encode(plain_tok, prompt_text + ' ' + text)
    assert plain_tok.decode(ids[:-1]) == ' ' + text
  assert pt.cuts == [(False, False)]


def test_chat_template_no_doubled_bos_and_single_eos(chat_tok):
  pt = tokenize.PairTokenizer(_data(), '', chat_tok)
  (pair,) = pt([PAIR])
  prompt = pair['prompt_ids']
  assert prompt[0] == BOS and prompt.count(BOS) == 1  # the template writes BOS; no second one
  assert chat_tok.decode(prompt) == chat_tok.apply_chat_template(
      MESSAGES, tokenize=False, add_generation_prompt=True)
  assert chat_tok.decode(prompt).endswith('<|assistant|>\n')
  for side, text in (('chosen', PAIR.chosen), ('rejected', PAIR.rejected)):
    ids = pair[f'{side}_ids']
    # The template closes the turn with EOS (+ a newline that is stripped): no EOS appended twice.
    assert ids[-1] == EOS and ids.count(EOS) == 1
    assert chat_tok.decode(ids) == text + '</s>'
  # chat_format='plain' ignores the template.
  (plain,) = tokenize.PairTokenizer(_data(chat_format='plain'), '', chat_tok)([PAIR])
  assert chat_tok.decode(plain['prompt_ids'][1:]) == tokenize.plain_prompt(MESSAGES)


def test_raw_string_prompts_skip_the_template(chat_tok):
  pair = sources.TextPair('SUBREDDIT: r/x\n\nTITLE: t\n\nPOST: p\n\nTL;DR:', ' short', ' long one')
  (out,) = tokenize.PairTokenizer(_data(), '', chat_tok)([pair])
  assert out['prompt_ids'] == [BOS] + _encode(chat_tok, pair.prompt)
  assert chat_tok.decode(out['chosen_ids']) == ' short</s>'


def test_loss_mask_covers_exactly_the_response(plain_tok):
  (pair,) = tokenize.PairTokenizer(_data(), '', plain_tok)([PAIR])
  batch = collate.collate_pairs([pair], collate.bucket_for(collate.pair_length(pair), (64, 128)))
  for side in collate.SIDES:
    mask = batch[f'{side}_loss_mask'][0].astype(bool)
    assert batch[f'{side}_targets'][0][mask].tolist() == pair[f'{side}_ids']
    # No prompt token is ever a masked-in target.
    assert mask.sum() == len(pair[f'{side}_ids'])


def test_truncate_rules():
  prompt, chosen, rejected = [BOS] + list(range(10, 30)), list(range(40, 50)), [7, 8]
  # Fits: nothing changes.
  assert tokenize.truncate(prompt, chosen, rejected, 64, 16, BOS) == (
      prompt, chosen, rejected, False, False)
  # Too long: the prompt keeps BOS and its end, then fits.
  p, c, r, pcut, rcut = tokenize.truncate(prompt, chosen, rejected, 28, 8, BOS)
  assert p == [BOS] + list(range(23, 30)) and (c, r) == (chosen, rejected) and (pcut, rcut) == (
      True, False)
  # Still too long: responses keep their start.
  p, c, r, pcut, rcut = tokenize.truncate(prompt, chosen, rejected, 12, 8, BOS)
  assert len(p) == 8 and c == list(range(40, 44)) and r == [7, 8] and (pcut, rcut) == (True, True)
  # Without a BOS the prompt simply keeps its end.
  p, *_ = tokenize.truncate(list(range(10, 30)), chosen, rejected, 12, 8, None)
  assert p == list(range(22, 30))
  # A long prompt is left whole when the pair fits anyway.
  assert tokenize.truncate(prompt, [3], [4], 64, 8, BOS)[0] == prompt


def test_long_fixture_pairs_are_truncated_like_the_field(plain_tok):
  rows = {r['note']: r for r in map(json.loads, HH_FIXTURE.open(encoding='utf-8'))}
  long_prompt = sources.parse_hh(rows['very long prompt'])
  long_resp = sources.parse_hh(rows['very long responses'])
  full = tokenize.PairTokenizer(_data(), '', plain_tok)([long_prompt, long_resp])
  data = _data(max_length=96, max_prompt_length=48)
  pt = tokenize.PairTokenizer(data, '', plain_tok)
  cut = pt([long_prompt, long_resp])
  assert pt.cuts == [(True, False), (False, True)]
  for whole, part in zip(full, cut):
    assert collate.pair_length(part) <= 96
    assert part['prompt_ids'][0] == BOS and len(part['prompt_ids']) <= 96
    n = len(part['prompt_ids']) - 1
    assert part['prompt_ids'][1:] == whole['prompt_ids'][len(whole['prompt_ids']) - n:]
    for side in ('chosen_ids', 'rejected_ids'):
      assert whole[side][:len(part[side])] == part[side]
  assert len(cut[0]['prompt_ids']) == 48
  assert len(cut[1]['chosen_ids']) == 96 - len(cut[1]['prompt_ids'])
  assert cut[1]['chosen_ids'][-1] != EOS  # cut responses lose their end, as in TRL


def test_drops_after_truncation(plain_tok):
  data = _data(max_length=12, max_prompt_length=4)
  same_start = sources.TextPair('Q', ' apple banana cherry damson one', ' apple banana cherry damson two')
  with_logps = sources.IdPair([BOS] + [5] * 10, [6, 2], [7, 2],
                              {'reference_chosen_logps': -1.0, 'reference_rejected_logps': -2.0})
  fits = sources.IdPair([BOS, 5], [6, 2], [7, 2], {'reference_chosen_logps': -1.0,
                                                   'reference_rejected_logps': -2.0})
  out = tokenize.PairTokenizer(data, '', plain_tok)([same_start, with_logps, fits])
  assert out[0] == 'identical_after_truncation'
  assert out[1] == 'too_long'  # log-probs of a cut pair would be wrong
  assert out[2] == dict(prompt_ids=[BOS, 5], chosen_ids=[6, 2], rejected_ids=[7, 2],
                        reference_chosen_logps=-1.0, reference_rejected_logps=-2.0)


def test_token_id_pairs_need_no_tokenizer():
  pt = tokenize.PairTokenizer(_data(), '')
  out = pt([sources.IdPair([1, 9], [4, 5, 2], [6, 2])])
  assert out == [dict(prompt_ids=[1, 9], chosen_ids=[4, 5, 2], rejected_ids=[6, 2])]
  assert not pt.has_tokenizer
  with pytest.raises(tokenize.TokenizerError, match='config.data.tokenizer'):
    pt([PAIR])


def test_tokenizer_errors_are_one_sentence(tmp_path, chat_tok):
  with pytest.raises(tokenize.TokenizerError) as e:
    tokenize.load_tokenizer(str(tmp_path / 'nowhere'))
  assert 'config.data.tokenizer' in str(e.value) and '\n' not in str(e.value)
  strict = transformers.AutoTokenizer.from_pretrained(chat_tok.name_or_path)
  strict.chat_template = ("{% if messages|length > 2 %}{{ raise_exception('roles must alternate') }}"
                          '{% endif %}{{ messages[0].content }}')
  assert tokenize.PairTokenizer(_data(), '', strict)([PAIR]) == ['chat_template_rejected']
  odd = transformers.AutoTokenizer.from_pretrained(chat_tok.name_or_path)
  odd.chat_template = ("{% for m in messages %}{{ m.content }}{% endfor %}"
                       '{% if add_generation_prompt %}<gen>{% endif %}')
  with pytest.raises(tokenize.TokenizerError, match="chat_format='plain'"):
    tokenize.PairTokenizer(_data(), '', odd)([PAIR])
