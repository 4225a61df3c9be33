"""Inference on trained checkpoints: evaluation, generation, vocoding, latent encoding (file I/O lives here)."""
