"""Small GILL files with seeded random weights, in the layout of the official release (jykoh/gill on the Hub:
pretrained_ckpt.pth.tar, decision_model.pth.tar, model_args.json), and the small OPT folder they belong to.

Used by the tests and by the workflow runner when the real files are absent, so the pack's GILL loader (pickle
checks, key checks, model_args.json) runs unchanged. Nothing of the pack is imported at module level (the tests
load this file by path); the functions that need the pack's classes import them inside.
"""
import json
from pathlib import Path

import torch

LLM_WIDTH = 64  # the small OPT's hidden size (GILL's [IMG] rows and visual tokens are this wide)
MODEL_ARGS = {"opt_version": "facebook/opt-6.7b", "visual_encoder": "openai/clip-vit-large-patch14",
              "n_visual_tokens": 4, "ret_emb_dim": 256, "gen_emb_dim": 768, "text_emb_layers": [-1],
              "text_fc_mode": "gill_mapper", "ret_text_fc_mode": "linear", "num_gen_tokens": 8, "num_ret_tokens": 8,
              "num_clip_tokens": 77, "share_ret_gen": True}


def write_release(folder, state_dict: dict, **args_override) -> Path:
    """The official layout from a GILL state dict with the reference's names (no 'model.' prefix): the decision
    model's tensors go to decision_model.pth.tar (without its prefix), the rest to pretrained_ckpt.pth.tar
    (with 'model.'), and model_args.json with the release's arguments (args_override changes some)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    decision = "decision_model."
    main = {f"model.{k}": v.detach().clone() for k, v in state_dict.items() if not k.startswith(decision)}
    torch.save({"state_dict": main}, folder / "pretrained_ckpt.pth.tar")
    picked = {k[len(decision):]: v.detach().clone() for k, v in state_dict.items() if k.startswith(decision)}
    if picked:
        torch.save({"state_dict": picked}, folder / "decision_model.pth.tar")
    args = dict(MODEL_ARGS, **args_override)
    (folder / "model_args.json").write_text(json.dumps(args, indent=4))
    return folder


def random_state(llm_width=LLM_WIDTH, vision_width=64, seed=0, mapper_hidden=64) -> dict:
    """Random GILL weights for a small OPT and CLIP tower, from the pack's own GILLModel: input-sensitive (at the
    default N(0, 1) the [IMG] rows swamp the OPT's 0.02-sized residual stream, and learnt queries swamp the
    mapper's output), with a decision model on the [IMG0] state. The GILLMapper is narrower than the released
    one (512): its width is read from the weights."""
    import math

    from ..bridges.gill import GILLConfig, GILLModel

    config = GILLConfig(llm_dim=llm_width, vision_dim=vision_width, mapper_hidden=mapper_hidden,
                        mapper_ffn=4 * mapper_hidden, decision_in=llm_width)
    torch.manual_seed(seed)
    model = GILLModel(config)
    with torch.no_grad():
        model.input_embeddings.weight.normal_(0.0, 0.02)
        model.mapper.query_embs.normal_(0.0, 0.02)
        model.logit_scale.fill_(math.log(1 / 0.07))
    return model.state_dict()


def write_opt_folder(folder, seed=0) -> Path:
    """A small OPT folder (tiny_llm.write_llm_folder) whose attention outputs are 10x the default init: otherwise
    each position's state is mostly its own input embedding, and the [IMG] states hardly depend on the prompt or
    the pictures before them."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from .tiny_llm import write_llm_folder

    folder = write_llm_folder(folder, arch="opt", seed=seed, hidden_size=LLM_WIDTH)
    weights = folder / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        metadata = f.metadata()
        sd = {k: f.get_tensor(k) * (10 if k.endswith("self_attn.out_proj.weight") else 1) for k in f.keys()}  # noqa: SIM118 - safe_open handles are not iterable
    save_file(sd, str(weights), metadata=metadata)
    return folder
