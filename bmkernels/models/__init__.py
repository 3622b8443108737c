"""Reference models, each buildable with bmkernels kernels or stock torch modules
(kernels="bmkernels" | "torch", same parameters) for A/B comparison."""

from bmkernels.models.transformer import TransformerClassifier, TransformerLM

__all__ = ["TransformerClassifier", "TransformerLM"]
