"""Learning from data: datasets, training, meta-parameter distillation, evaluation."""
