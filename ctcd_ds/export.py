"""Members -> Hugging Face model directories (``AutoModelForMaskedLM.from_pretrained`` loads them).

Two ways in: from live engines at the end of a run (ZeRO-3 weights are gathered first), or offline
from a joint checkpoint (``ctcd-ds export``), where ZeRO partitions are merged into fp32 weights.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from ctcd_ds import checkpoint, dist
from ctcd_ds.config import ConfigError, from_dict
from ctcd_ds.models import build_model, count_parameters, save_hf
from ctcd_ds.minidisc import recorded_choice
from ctcd_ds.pruning import PruneMasks, prune_bert
from ctcd_ds.tokenizer import load_tokenizer

PREFIX = "hf."  # every engine's module holds its Hugging Face model as ``.hf``
MASKS_PREFIX = "masks."  # ... and a member gated by masks (pruned, sandwich) its masks as ``.masks``


def _hf_state(module_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(PREFIX) :]: v for k, v in module_state.items() if k.startswith(PREFIX)}


def export_member(engine: Any, tokenizer, out_dir: Path) -> None:
    """Collective: every rank calls it; rank 0 writes ``out_dir`` (weights in fp32 + tokenizer)."""
    import deepspeed

    params = list(engine.module.parameters())
    zero3 = any(hasattr(p, "ds_id") for p in params)
    gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero3 else contextlib.nullcontext()
    masks = getattr(engine.module, "pruned_masks", None)  # a member pruned while training (HomoDistil)
    with gather:
        small = prune_bert(engine.module.hf, masks) if masks is not None else None  # every rank: errors raise everywhere
        if dist.is_rank0():
            if small is not None:
                _write(small, small.state_dict(), tokenizer, out_dir)
                print(f"{out_dir.name}: pruned to {small.config.num_hidden_layers}L-{small.config.hidden_size} ({small.config.num_attention_heads} heads, "
                      f"FFN {small.config.intermediate_size}): {count_parameters(small) / 1e6:.2f}M parameters (from {count_parameters(engine.module.hf) / 1e6:.2f}M)", flush=True)
            else:
                state = {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}
                _write(engine.module.hf, _hf_state(state), tokenizer, out_dir)
    dist.barrier()


def _write(model, state: dict[str, torch.Tensor], tokenizer, out_dir: Path) -> None:
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf(model, state, tmp)
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def _checkpoint_state(ckpt: Path, member: str) -> dict[str, torch.Tensor]:
    """fp32 module weights of one member from a DeepSpeed checkpoint of any ZeRO stage."""
    tag_dir = ckpt / member
    if any(tag_dir.glob("*optim_states.pt")) and any(tag_dir.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=member)
    (model_file,) = tag_dir.glob("mp_rank_00_model_states.pt")
    return torch.load(model_file, map_location="cpu", weights_only=False)["module"]


def export_checkpoint(ckpt: Path, out_root: Path) -> dict[str, str]:
    """Export every member of a joint checkpoint (frozen members are re-exported from their source)."""
    ckpt = Path(ckpt)
    if not checkpoint.is_checkpoint(ckpt):
        latest = checkpoint.latest(ckpt)  # a run directory was given
        if latest is None:
            raise ConfigError([f"--checkpoint={ckpt}: neither a checkpoint (trainer_state.json) nor a run directory with checkpoints/latest"])
        ckpt = latest
    cfg = from_dict(yaml.safe_load((ckpt / "config.yaml").read_text()))
    run_dir = ckpt.parent.parent
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    written = {}
    for name, m in cfg.members.items():
        model = build_model(m.model, len(tokenizer), tokenizer.pad_token_id)
        if m.minidisc.sparsities:  # the chosen teacher assistant's shape, recorded in the run directory
            model = recorded_choice(model, run_dir, name)
        if m.trainable:
            full_state = _checkpoint_state(ckpt, name)
            state = _hf_state(full_state)
            missing, unexpected = model.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.endswith("decoder.weight")]  # tied to the embeddings
            assert not missing and not unexpected, (missing, unexpected)
            if m.prune.enabled:
                masks = PruneMasks(model.config)
                masks.load_state_dict({k[len(MASKS_PREFIX) :]: v for k, v in full_state.items() if k.startswith(MASKS_PREFIX)})
                model = prune_bert(model, masks)
        out = Path(out_root) / name
        _write(model, model.state_dict(), tokenizer, out)
        written[name] = str(out)
        print(f"{name}: {count_parameters(model) / 1e6:.2f}M parameters -> {out}")
    return written
