"""The Llama model, its Hugging Face I/O and log-prob computation.

Shape legend, used in array names (`x_BTD`, `logits_MV`) across the package:
  B  batch rows                       G  preference pairs of a batch
  T  query length (tokens per row)    S  key length (cached or attended tokens)
  D  hidden size                      F  MLP width
  N  query heads                      K  key/value heads (N % K == 0)
  H  head dimension                   V  vocabulary
  L  layers (stacked parameters)      R  packed rows
  M  flattened rows B*T
  C  sequence chunk of the log-prob computation
"""
