"""Preference-pair sources, tokenization and the Grain input pipeline.

  sources.py   reading rows (files, folders, saved datasets, the hub) and parsing them per source
  tokenize.py  chat-template / plain formatting, BOS/EOS, truncation
  collate.py   the fixed-shape batch layout every consumer uses
  prefix.py    the prefix-shared layout (data.prefix_sharing): prompt, chosen, rejected in one row
  pipeline.py  `load` (parse + tokenize + drop summary), `train_iterator`, `eval_iterator`
  __main__.py  `python -m isdaa_jax.data --config=... --dump=OUT.jsonl`: preview what the model sees
"""
