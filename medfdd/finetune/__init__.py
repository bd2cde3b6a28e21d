"""Hybrid mode: after the distillation rounds, DP fine-tuning of the global model at each site (DP-FedAvg rounds).

`dpsgd`: one site's local DP-SGD (Abadi et al. 2016). `site`: the site's fine-tuning round (plan, write-ahead charge,
local training, allow-listed update). The coordinator averages the updates (`medfdd.coordinator.average`).
"""
