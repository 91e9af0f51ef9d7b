"""Tiny Hugging Face tokenizers trained inside the tests (no network, no real tokenizer files).

`build_tokenizer(out_dir)` trains a byte-level BPE with the `tokenizers` library on text written
here, wraps it in `PreTrainedTokenizerFast` and saves it as a folder that
`transformers.AutoTokenizer.from_pretrained(out_dir)` loads offline. Special tokens: `<pad>`=0,
`<s>`=1 (BOS, added by the post-processor when `add_special_tokens=True`), `</s>`=2 (EOS). Byte-level,
so any unicode text encodes without unknown tokens. With `chat_template=True` the folder also holds
`CHAT_TEMPLATE`, which starts with the BOS text and closes every message with EOS and a newline
(the shape of many real templates, and the case that tempts a pipeline to double BOS or EOS).
"""

import pathlib

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
import transformers

PAD, BOS, EOS = '<pad>', '<s>', '</s>'

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

# Written for these tests: dialogue-shaped English plus some accents, CJK and emoji so that the
# merges cover the fixtures' vocabulary reasonably.
_CORPUS = [
    'Human: How do I bake a loaf of bread at home?',
    'Assistant: Mix flour, water, salt and yeast, let it rise, then bake it in a hot oven.',
    'Human: What is the capital of the moon colony in my story?',
    'Assistant: You could call it Tranquility Harbor, after the first landing site.',
    'SUBREDDIT: r/cooking TITLE: my soup is too salty POST: I added too much salt. TL;DR:',
    'The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat.',
    'Please summarize the following post in one short sentence for a busy reader.',
    'Café, naïve, façade, jalapeño, über, smörgåsbord — accents appear in many words.',
    '東京は日本の首都です。 こんにちは世界。 你好，世界。 🙂🚀✨ emoji and symbols ∑ ∫ √ ≤ ≥.',
    'system user assistant message content role answer question thanks sure sorry help',
    'Numbers like 0 1 2 3 4 5 6 7 8 9 10 100 2024 and punctuation: ; , . ! ? ( ) [ ] { } " \'',
]


def build_tokenizer(out_dir, *, chat_template: bool = False, vocab_size: int = 384) -> str:
  """Trains and saves the tiny tokenizer; returns the folder as a string."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
  bos_id = tok.token_to_id(BOS)
  tok.post_processor = processors.TemplateProcessing(
      single=f'{BOS} $A', pair=f'{BOS} $A $B', special_tokens=[(BOS, bos_id)])
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
      chat_template=CHAT_TEMPLATE if chat_template else None)
  fast.save_pretrained(str(out))
  return str(out)
