"""ctcd-ds: co-training and co-distillation of masked language models on DeepSpeed."""

__version__ = "0.1.0"
