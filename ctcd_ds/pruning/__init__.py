"""Structured pruning of BERT masked LMs (HomoDistil, Liang et al., ICLR 2023) and MiniDisc's teacher-assistant
selection (Zhang et al.). Nothing is re-exported here: import the module that holds a name, so that
``ctcd_ds.pruning.widths`` (used by config validation) stays free of DeepSpeed.

Three kinds of structure are pruned: attention heads and FFN neurons, per layer, and the hidden width (one mask
over the residual stream, shared by the embeddings, every layer and the MLM head transform).

- :mod:`~ctcd_ds.pruning.widths`: shape arithmetic on a ``BertConfig`` (``Widths``, pruning targets and their
  problems, the widths at a sparsity, the pruned config). Imports neither DeepSpeed nor ``ctcd_ds.dist``.
- :mod:`~ctcd_ds.pruning.schedule`: the cubic sparsity schedule (``cubic_kept``).
- :mod:`~ctcd_ds.pruning.masks`: ``PruneMasks`` (bool masks and smoothed scores, as buffers), the forward hooks
  that gate a model by them (``attach``, ``masked_layer_norm``), and shrinking masks by scores (``prune_to``).
- :mod:`~ctcd_ds.pruning.importance`: sensitivities ``|theta * dL/dtheta|`` per structure, their moving average,
  and one-shot scores over a few batches.
- :mod:`~ctcd_ds.pruning.training`: what a member runs each step: ``Pruner`` (HomoDistil's schedule) and
  ``Sandwich`` (MiniDisc's weight-shared sub-networks).
- :mod:`~ctcd_ds.pruning.surgery`: ``prune_bert``, physical removal into a genuinely smaller ``BertForMaskedLM``.
- :mod:`~ctcd_ds.pruning.minidisc`: MiniDisc's teacher-assistant selection among one-shot pruned candidates.
"""
