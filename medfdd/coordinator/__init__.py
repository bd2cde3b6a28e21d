"""The coordinator: validate offers, merge, train and evaluate the global model, rounds with checkpoints."""
