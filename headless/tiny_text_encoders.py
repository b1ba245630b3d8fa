"""Small LLM text-encoder files in the layout ComfyUI's own loader detects, built from ComfyUI's own classes.

ComfyUI (2025 on) reads decoder LLMs as text encoders from single safetensors files (comfy/sd.py: detect_te_model
decides by key names and shapes, load_clip builds the class from comfy/text_encoders/, the tokenizer is bundled with
ComfyUI or embedded in the file). The real files are 5-16 GB; these have the same keys, the same detection shapes
and the same tokenizers at a width of 64, with seeded random weights. Their model classes take the full-size
config from dataclass defaults, so `load_tiny_clip` reads them through comfy.sd.load_clip with the small config
passed as model_options["<name>_model_config"] (ComfyUI's own override), derived from the file's tensor shapes.

Import only after a ComfyUI host has been booted; needs ComfyUI with comfy/text_encoders/llama.py (2025 on).
"""
import io
from pathlib import Path

import torch

# kind -> (Load CLIP type, ComfyUI transformer class, model_options name, head_dim, extra config, vocab)
KINDS = {
    "omnigen2": ("omnigen2", "Qwen25_3B", "qwen25_3b", 128, {"num_key_value_heads": 2}, 151936),  # k bias 256 -> 3B
    "lumina2": ("lumina2", "Gemma2_2B", "gemma2_2b", 256, {"num_key_value_heads": 1}, 384),
    "hidream": ("hidream", "Llama2", "llama", 128, {"num_key_value_heads": 1}, 128256),
}
SPIECE_CORPUS = [
    "a photo of a red fox in the snow", "an oil painting of a lighthouse at dusk", "a cat and a dog on a sofa",
    "a watercolor of mountains and a lake", "portrait of an old man with a beard, studio lighting",
    "a bowl of fruit on a wooden table, still life", "a futuristic city at night with neon lights",
    "the quick brown fox jumps over the lazy dog", "a castle on a hill under a starry sky, cinematic",
]


def sentencepiece_model(vocab_size: int) -> torch.Tensor:
    """A SentencePiece model trained here (ids as Gemma's: pad 0, eos 1, bos 2, unk 3), as the uint8 tensor ComfyUI
    keeps under 'spiece_model' in a Gemma text-encoder file."""
    import sentencepiece as spm
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SPIECE_CORPUS * 20), model_writer=out,
                                   vocab_size=vocab_size, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                                   byte_fallback=True, character_coverage=1.0, minloglevel=2,
                                   hard_vocab_limit=False)
    return torch.frombuffer(bytearray(out.getvalue()), dtype=torch.uint8).clone()


def _config(kind, hidden=64, layers=3):
    _, _, _, head_dim, extra, vocab = KINDS[kind]
    return {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": extra["num_key_value_heads"], **extra}


def write_text_encoder(path, kind: str, seed: int = 0, dtype=torch.bfloat16, hidden: int = 64, layers: int = 3):
    """A text-encoder file for Load CLIP type KINDS[kind][0], keys as in ComfyUI's released files."""
    import comfy.ops
    import comfy.text_encoders.llama as llama

    cls = getattr(llama, KINDS[kind][1])
    with torch.device("cpu"):
        model = cls(_config(kind, hidden, layers), torch.float32, "cpu", comfy.ops.manual_cast)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, param in model.state_dict().items():
        if name.startswith("visual."):
            continue
        if param.ndim >= 2:
            value = torch.randn(param.shape, generator=generator) * param.shape[-1] ** -0.5
        elif name.endswith("bias"):
            value = torch.randn(param.shape, generator=generator) * 0.02
        else:  # norm scales (Gemma adds 1 to its own)
            value = (torch.zeros if "gemma" in kind or kind == "lumina2" else torch.ones)(param.shape)
        state[name] = value.to(dtype)
    if kind == "lumina2":
        state["spiece_model"] = sentencepiece_model(KINDS[kind][5])
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


def config_from_file(state: dict, head_dim: int) -> dict:
    """The small model's config from the tensor shapes of its file."""
    embed = state["model.embed_tokens.weight"]
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("model.layers."))
    q, k = state["model.layers.0.self_attn.q_proj.weight"], state["model.layers.0.self_attn.k_proj.weight"]
    return {"vocab_size": embed.shape[0], "hidden_size": embed.shape[1], "num_hidden_layers": layers,
            "intermediate_size": state["model.layers.0.mlp.gate_proj.weight"].shape[0],
            "num_attention_heads": q.shape[0] // head_dim, "num_key_value_heads": k.shape[0] // head_dim}


def load_tiny_clip(path, clip_type: str, model_options=None):
    """comfy.sd.load_clip as Load CLIP calls it, with the small config from the file (see the module docstring)."""
    import comfy.sd
    import comfy.utils

    kind = next(k for k, v in KINDS.items() if v[0] == clip_type)
    state = comfy.utils.load_torch_file(str(path), safe_load=True)
    options = dict(model_options or {})
    options[f"{KINDS[kind][2]}_model_config"] = config_from_file(state, KINDS[kind][3])
    del state
    return comfy.sd.load_clip([str(path)], clip_type=getattr(comfy.sd.CLIPType, clip_type.upper()),
                              model_options=options)


class TinyTextEncoderLoader:
    """Stands in for the stock Load CLIP in tests: the same file and type, read by comfy.sd.load_clip with the small
    config taken from the file (full-size configs are fixed in ComfyUI's classes)."""

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths
        return {"required": {"clip_name": (folder_paths.get_filename_list("text_encoders"),),
                             "type": ([v[0] for v in KINDS.values()],)}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "Beyond CLIP/testing"

    def load(self, clip_name, type):
        import folder_paths
        return (load_tiny_clip(folder_paths.get_full_path("text_encoders", clip_name), type),)


NODE_CLASS_MAPPINGS = {"BeyondCLIP_TinyTextEncoderLoader": TinyTextEncoderLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"BeyondCLIP_TinyTextEncoderLoader": "Tiny Text Encoder Loader (Beyond CLIP tests)"}
