"""Tasks: what each model family supplies to the one training loop (loss, data, evaluation)."""
