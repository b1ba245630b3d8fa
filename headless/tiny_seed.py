"""Small SEED v1 files with seeded random weights, in the official layout (AILab-CVC/seed-tokenizer-1 and LAVIS).

`write_official` writes seed_tokenizer.pth, causal_qformer.pth and eva_vit_g.pth side by side, with the official key
names, nesting ({'model': ...}) and the unused extras the real files carry, so the pack's SEED loader (checks,
conversion to safetensors, loading) runs unchanged. Used by the tests and by the workflow runner when the real files
are absent. Pure torch: nothing of the pack or of ComfyUI is imported here.
"""
import math
from pathlib import Path

import torch

# Small sizes, same classes and layout as the official files (ViT-g 1408/39, BERT-base 768/12, 8192 x 32).
W, VIT_LAYERS, VIT_MLP, PATCH, GRID = 176, 2, 256, 14, 16  # 2 heads of 88, 224 px like the real one
D, Q_LAYERS, Q_MLP, NQ = 128, 4, 256, 32  # 2 heads of 64; cross-attention in layers 0 and 2
N_EMBED, CDIM = 8192, 32
DEC_BLOCKS, DEC_MLP, R_LAYERS, R_MLP, NR, OUT = 2, 256, 2, 256, 77, 768


SMALL = dict(W=W, VIT_LAYERS=VIT_LAYERS, VIT_MLP=VIT_MLP, D=D, Q_LAYERS=Q_LAYERS, Q_MLP=Q_MLP, N_EMBED=N_EMBED,
             DEC_BLOCKS=DEC_BLOCKS, DEC_MLP=DEC_MLP, R_LAYERS=R_LAYERS, R_MLP=R_MLP)
# The released sizes: EVA-CLIP ViT-g/14 (the LAVIS file carries 40 blocks; SEED uses 39) and BERT-base Q-Formers.
FULL = dict(W=1408, VIT_LAYERS=40, VIT_MLP=6144, D=768, Q_LAYERS=12, Q_MLP=3072, N_EMBED=8192,
            DEC_BLOCKS=4, DEC_MLP=3072, R_LAYERS=4, R_MLP=3072)


class _Gen:
    def __init__(self, seed, meta=False):
        self.g = torch.Generator().manual_seed(seed)
        self.meta = meta

    def randn(self, *shape):
        return torch.empty(*shape, device="meta") if self.meta else torch.randn(*shape, generator=self.g)

    def mat(self, *shape, fan_in=None):
        fan_in = fan_in or shape[-1]
        return self.randn(*shape) / math.sqrt(fan_in)

    def vec(self, n, scale=0.1):
        return self.randn(n) * scale

    def norm(self, sd, prefix, n):
        sd[prefix + ".weight"] = 1 + self.vec(n)
        sd[prefix + ".bias"] = self.vec(n)

    def linear(self, sd, prefix, out_f, in_f):
        sd[prefix + ".weight"] = self.mat(out_f, in_f)
        sd[prefix + ".bias"] = self.vec(out_f)


def _bert_layers(g, sd, prefix, layers, d, mlp, enc_width, text_branch):
    g.norm(sd, f"{prefix}.embeddings.LayerNorm", d)
    for i in range(layers):
        p = f"{prefix}.encoder.layer.{i}"
        kinds = ["attention"] + (["crossattention"] if i % 2 == 0 else [])
        for kind in kinds:
            width = enc_width if kind == "crossattention" else d
            g.linear(sd, f"{p}.{kind}.self.query", d, d)
            g.linear(sd, f"{p}.{kind}.self.key", d, width)
            g.linear(sd, f"{p}.{kind}.self.value", d, width)
            g.linear(sd, f"{p}.{kind}.output.dense", d, d)
            g.norm(sd, f"{p}.{kind}.output.LayerNorm", d)
        g.linear(sd, f"{p}.intermediate_query.dense", mlp, d)
        g.linear(sd, f"{p}.output_query.dense", d, mlp)
        g.norm(sd, f"{p}.output_query.LayerNorm", d)
        if text_branch:
            g.linear(sd, f"{p}.intermediate.dense", mlp, d)
            g.linear(sd, f"{p}.output.dense", d, mlp)
            g.norm(sd, f"{p}.output.LayerNorm", d)


def _vit_block(g, sd, p, dim, mlp, eva):
    g.norm(sd, f"{p}.norm1", dim)
    sd[f"{p}.attn.qkv.weight"] = g.mat(3 * dim, dim)
    if eva:
        sd[f"{p}.attn.q_bias"], sd[f"{p}.attn.v_bias"] = g.vec(dim), g.vec(dim)
    else:
        sd[f"{p}.attn.qkv.bias"] = g.vec(3 * dim)
    g.linear(sd, f"{p}.attn.proj", dim, dim)
    g.norm(sd, f"{p}.norm2", dim)
    g.linear(sd, f"{p}.mlp.fc1", mlp, dim)
    g.linear(sd, f"{p}.mlp.fc2", dim, mlp)


def official_state(seed=0, dims=SMALL, meta=False):
    """(eva_vit_g, causal_qformer['model'], seed_tokenizer['model']) in the official key layout, with the
    unused extras the real files carry (the Q-Former's text branch, the training-only reconstruction head)."""
    g, s = _Gen(seed, meta), dims
    w, d = s["W"], s["D"]
    eva = {"cls_token": g.mat(1, 1, w), "pos_embed": g.mat(1, GRID * GRID + 1, w),
           "patch_embed.proj.weight": g.mat(w, 3, PATCH, PATCH, fan_in=3 * PATCH * PATCH),
           "patch_embed.proj.bias": g.vec(w)}
    for i in range(s["VIT_LAYERS"]):
        _vit_block(g, eva, f"blocks.{i}", w, s["VIT_MLP"], eva=True)
    qf = {"query_tokens": g.mat(1, NQ, d, fan_in=1) * 0.5}
    g.norm(qf, "ln_vision", w)
    sub = {}
    _bert_layers(g, sub, "bert", s["Q_LAYERS"], d, s["Q_MLP"], w, text_branch=True)
    qf.update({"Qformer." + k: v for k, v in sub.items()})
    qf["Qformer.bert.embeddings.word_embeddings.weight"] = g.mat(100, d)
    qf["Qformer.bert.embeddings.position_embeddings.weight"] = g.mat(64, d)
    g.linear(qf, "vision_proj", 256, d)
    g.linear(qf, "text_proj", 256, d)
    qf["temp"] = torch.tensor(0.07)
    tok = {"quantize.embedding.weight": g.randn(s["N_EMBED"], CDIM) * 0.6}
    g.linear(tok, "encode_task_layer.0", d, d)
    g.linear(tok, "encode_task_layer.2", CDIM, d)
    g.linear(tok, "decode_task_layer.0", CDIM, CDIM)
    g.linear(tok, "decode_task_layer.2", d, CDIM)
    tok["pos_embed_text"] = g.mat(1, NQ, d, fan_in=1) * 0.1
    for i in range(s["DEC_BLOCKS"]):
        _vit_block(g, tok, f"blocks_text.{i}", d, s["DEC_MLP"], eva=False)
    tok["reverse_tokens"] = g.mat(1, NR, d, fan_in=1) * 0.5
    sub = {}
    _bert_layers(g, sub, "bert", s["R_LAYERS"], d, s["R_MLP"], d, text_branch=False)
    tok.update({"Reverse_Qformer." + k: v for k, v in sub.items()})
    g.linear(tok, "distill_text_proj", OUT, d)
    tok["pos_embed"] = g.mat(1, NQ, d)  # training-only reconstruction head, unused at inference
    _vit_block(g, tok, "blocks.0", d, s["DEC_MLP"], eva=False)
    return eva, qf, tok


def write_official(folder, seed=0, **overrides):
    """seed_tokenizer.pth, causal_qformer.pth and eva_vit_g.pth in `folder`; returns the tokenizer's path.
    overrides: {'eva'|'qf'|'tok': {key: tensor, or None to leave the key out}} to make damaged file sets."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    eva, qf, tok = official_state(seed)
    for d, changes in zip((eva, qf, tok),
                          (overrides.get("eva", {}), overrides.get("qf", {}), overrides.get("tok", {}))):
        for k, v in changes.items():
            if v is None:
                d.pop(k)
            else:
                d[k] = v
    torch.save(eva, folder / "eva_vit_g.pth")
    torch.save({"model": qf, "epoch": 3}, folder / "causal_qformer.pth")
    torch.save({"model": tok, "epoch": 9}, folder / "seed_tokenizer.pth")
    return folder / "seed_tokenizer.pth"
