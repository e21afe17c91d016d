"""Using a reward model: where a reward comes from and how a text is scored, apart from training one (:mod:`hhrm.rm`).

One concern a module: ``conventions`` (how each tool builds, tokenizes and reads a reward model's input: plain data,
low enough for data preparation to use), ``scoring`` (RewardScorer: a model in this process), ``sources`` (the seam:
every place that needs rewards builds one source from its settings), ``client`` (HTTP clients of reward servers:
hhrm's, OpenRLHF's ``/get_reward``, vLLM's ``/classify``), ``server`` with ``protocol`` and ``watch`` (the
LitServe reward server), and ``score_file`` with ``score_output`` (``make score``: a file of rows in, rewards out).
"""
