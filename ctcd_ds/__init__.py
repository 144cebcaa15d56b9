"""ctcd-ds: co-training and co-distillation of language models on DeepSpeed."""

__version__ = "0.2.0"
