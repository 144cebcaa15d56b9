"""Members -> Hugging Face model directories (``AutoModelForMaskedLM.from_pretrained`` loads them).

Two ways in: from live engines at the end of a run (ZeRO-3 weights are gathered first), or offline
from a joint checkpoint (``ctcd-ds export``), where ZeRO partitions are merged into fp32 weights.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

import deepspeed
import torch
import yaml
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedModel

from ctcd_ds import dist
from ctcd_ds.config import FinetuneConfig, PretrainConfig, PretrainMemberConfig, from_dict
from ctcd_ds.errors import UserError
from ctcd_ds.layout import CONFIG_FILE, STATE_FILE, is_checkpoint, run_dir_of
from ctcd_ds.models import build_model, count_parameters, save_hf
from ctcd_ds.pruning.masks import PruneMasks
from ctcd_ds.pruning.minidisc import rebuild_choice
from ctcd_ds.pruning.surgery import prune_bert
from ctcd_ds.resume import resume_point
from ctcd_ds.task_data import head_settings
from ctcd_ds.tokenizer import load_tokenizer, save_tokenizer

PREFIX = "hf."  # every engine's module holds its Hugging Face model as ``.hf``
MASKS_PREFIX = "masks."  # ... and a member gated by masks (pruned, sandwich) its masks as ``.masks``


def _hf_state(module_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(PREFIX) :]: v for k, v in module_state.items() if k.startswith(PREFIX)}


def export_member(engine: Any, tokenizer, out_dir: Path) -> None:
    """Collective: every rank calls it; rank 0 writes ``out_dir`` (weights in fp32 + tokenizer)."""
    params = list(engine.module.parameters())
    zero3 = any(hasattr(p, "ds_id") for p in params)
    gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero3 else contextlib.nullcontext()
    masks = getattr(engine.module, "pruned_masks", None)  # a member pruned while training (HomoDistil)
    with gather:
        small = (
            prune_bert(engine.module.hf, masks) if masks is not None else None
        )  # every rank: errors raise everywhere
        if dist.is_rank0():
            if small is not None:
                _write(small, small.state_dict(), tokenizer, out_dir)
                print(
                    f"{out_dir.name}: pruned to {small.config.num_hidden_layers}L-{small.config.hidden_size} "
                    f"({small.config.num_attention_heads} heads, "
                    f"FFN {small.config.intermediate_size}): {count_parameters(small) / 1e6:.2f}M parameters (from "
                    f"{count_parameters(engine.module.hf) / 1e6:.2f}M)",
                    flush=True,
                )
            else:
                state = {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}
                _write(engine.module.hf, _hf_state(state), tokenizer, out_dir)
    dist.barrier()


def _write(model, state: dict[str, torch.Tensor], tokenizer, out_dir: Path) -> None:
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf(model, state, tmp)
    save_tokenizer(tokenizer, tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def _checkpoint_state(ckpt: Path, member: str) -> dict[str, torch.Tensor]:
    """fp32 module weights of one member from a DeepSpeed checkpoint of any ZeRO stage."""
    tag_dir = ckpt / member
    if any(tag_dir.glob("*optim_states.pt")) and any(tag_dir.glob("zero_pp_rank_*")):
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=member)
    (model_file,) = tag_dir.glob("mp_rank_00_model_states.pt")
    return torch.load(model_file, map_location="cpu", weights_only=False)["module"]


def _fresh_model(
    cfg: PretrainConfig | FinetuneConfig, name: str, recorded: dict[str, Any], tokenizer
) -> PreTrainedModel:
    """A model of member ``name``'s shape, as its run built it (its trained weights are loaded after)."""
    m = cfg.members[name]
    if isinstance(cfg, FinetuneConfig):
        directory = recorded["model_dir"]
        if not m.trainable:  # a frozen classifier is exported as it was given
            return AutoModelForSequenceClassification.from_pretrained(directory, dtype=torch.float32)
        hf_config = AutoConfig.from_pretrained(directory, **head_settings(recorded["kind"], recorded["labels"]))
        return AutoModelForSequenceClassification.from_config(hf_config)
    model = build_model(m.model, len(tokenizer), tokenizer.pad_token_id)
    if m.minidisc.sparsities:  # the chosen teacher assistant's shape, recorded in the checkpoint
        model = rebuild_choice(model, recorded["minidisc"])
    return model


def export_checkpoint(ckpt: Path, out_root: Path) -> dict[str, str]:
    """Export every trained member of a joint checkpoint, pre-training or fine-tuning (a frozen member is an
    unchanged input: it is named, not exported again)."""
    ckpt = Path(ckpt)
    if is_checkpoint(ckpt):
        ckpt = resume_point(run_dir_of(ckpt), str(ckpt))  # verified against its manifest
    else:
        found = resume_point(ckpt)  # a run directory: its newest intact checkpoint
        if found is None:
            raise UserError(
                f"--checkpoint={ckpt}: neither a checkpoint (trainer_state.json) nor a run directory with "
                "checkpoints/latest"
            )
        ckpt = found
    data = yaml.safe_load((ckpt / CONFIG_FILE).read_text())
    cfg = from_dict(data, FinetuneConfig if "task" in data else PretrainConfig)
    recorded = json.loads((ckpt / STATE_FILE).read_text()).get("task", {})
    tokenizer = load_tokenizer(run_dir_of(ckpt) / "tokenizer")
    written = {}
    for name, m in cfg.members.items():
        if not m.trainable:
            print(f"{name}: frozen, an unchanged input ({m.model}); not exported again")
            continue
        model = _fresh_model(cfg, name, recorded.get(name, {}), tokenizer)
        full_state = _checkpoint_state(ckpt, name)
        missing, unexpected = model.load_state_dict(_hf_state(full_state), strict=False)
        missing = [k for k in missing if not k.endswith("decoder.weight")]  # tied to the embeddings
        if missing or unexpected:
            raise UserError(
                f"--checkpoint={ckpt}: member '{name}' does not match the model its config.yaml builds "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        if isinstance(m, PretrainMemberConfig) and m.prune.enabled:
            masks = PruneMasks(model.config)
            masks.load_state_dict(
                {k[len(MASKS_PREFIX) :]: v for k, v in full_state.items() if k.startswith(MASKS_PREFIX)}
            )
            model = prune_bert(model, masks)
        out = Path(out_root) / name
        _write(model, model.state_dict(), tokenizer, out)
        written[name] = str(out)
        print(f"{name}: {count_parameters(model) / 1e6:.2f}M parameters -> {out}")
    return written
