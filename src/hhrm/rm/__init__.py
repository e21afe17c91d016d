"""RM stage: training a reward model, apart from using one (:mod:`hhrm.reward`).

One concern a module: ``stage`` (RewardConfig, the pairs, the trainer's setup, export), ``trainer`` (RewardTrainer with
grouped or padding-free batches), ``evaluation`` (honest held-out metrics) and ``card`` (the exported model card).
"""
