"""tunelab: Hydra-configured fine-tuning of Hugging Face Transformers models, tracked in MLflow."""

__version__ = "0.1.0"
