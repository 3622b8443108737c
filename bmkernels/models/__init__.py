"""Reference models, each buildable with bmkernels kernels or stock torch modules
(kernels="bmkernels" | "torch", same parameters) for A/B comparison."""

from bmkernels.models.transformer import TransformerClassifier, TransformerLM

__all__ = ["TransformerClassifier", "TransformerLM"]

from bmkernels.models.cnn import CNN, ConvAutoencoder  # noqa: E402
from bmkernels.models.gru import GRULM  # noqa: E402

__all__ += ["CNN", "ConvAutoencoder", "GRULM"]
