"""Models built on Hugging Face Mamba backbones and the pretrained model zoo."""

from mambalrp.models.classifier import MambaSequenceClassifier

__all__ = ["MambaSequenceClassifier"]
