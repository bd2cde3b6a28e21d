"""medfdd: federated dataset distillation for hospitals, under differential privacy, with membership audits."""

__version__ = "0.1.0"
