"""Preference-pair sources, tokenization and the Grain input pipeline.

  sources.py   reading rows (files, folders, saved datasets, the hub) and parsing them per source
  tokenize.py  chat-template / plain formatting, BOS/EOS, truncation
  collate.py   the padded layout: one fixed-shape row per sequence
  prefix.py    the prefix-shared layout (data.prefix_sharing): prompt, chosen, rejected in one row
  packing.py   the packed layout (data.packing): several pairs' sequences end to end in a row
  pipeline.py  `load` (parse + tokenize + drop summary), `train_iterator`, `eval_iterator`
  __main__.py  `python -m isdaa_jax.data --config=... --dump=OUT.jsonl`: preview what the model sees

Nothing here imports the model: the device halves of the layouts are in `model/pair_logps.py`, and
`isdaa_jax/layout.py` picks the layout from `config.data` once for every consumer.
"""
