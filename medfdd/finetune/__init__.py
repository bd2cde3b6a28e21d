"""Hybrid mode's algorithm: one site's local DP-SGD from the global model (`dpsgd`, Abadi et al. 2016). The site's
round (plan, write-ahead charge, allow-listed update) is `medfdd.site.finetune`; the coordinator averages the updates
(`medfdd.coordinator.average`).
"""
