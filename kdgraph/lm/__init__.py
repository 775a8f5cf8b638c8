"""Causal language models (issue 36): the ``transformers:`` model source (``source``), the
torch.export front end (``export_trace``), depth pairing of decoder stacks (``pairing``) and
the token-level distillation losses (``token_losses``). transformers is an optional extra
(``pip install 'kdgraph[lm]'``), imported only when such a model is built."""
