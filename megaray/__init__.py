"""megaray: Ray-distributed multimodal training (Ray Data -> Ray Train + DeepSpeed -> MLflow)."""

__version__ = "0.1.0"
