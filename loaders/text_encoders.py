"""A stock ComfyUI CLIP that holds a decoder LLM, as the pack's LLM.

ComfyUI (2025 on) loads LLMs from single files in models/text_encoders through the stock Load CLIP / DualCLIP
nodes (comfy/sd.py load_clip; Llama 3.1 for HiDream, Gemma 2 for Lumina 2, Qwen2.5-VL for OmniGen2 and Qwen-Image
in 0.3.64), and other packs build the same CLIP object from other files (ComfyUI-GGUF from .gguf). Here that CLIP
is used as it is: ComfyUI's own model (its comfy.ops layers: fp8 "scaled" weights, GGUF's or anyone's custom
operations, partial loading and offload), ComfyUI's own tokenizer (bundled with ComfyUI or embedded in the file,
never fetched) and ComfyUI's memory manager (the CLIP's own patcher, LoRA patches included). Nothing is loaded a
second time. Nothing here knows where the weights came from.

What the pack runs is `TextEncoderDecoder`: the few methods of a transformers causal LM the pack calls (the input
embeddings, one hidden layer, the states of all layers), answered by ComfyUI's module.
"""
import difflib
import hashlib
import logging
from dataclasses import dataclass
from types import SimpleNamespace

import comfy.model_management as mm
import torch

from ..bridges.errors import InputError
from .handles import Handle
from .llm import LoadedLLM

log = logging.getLogger(__name__)

# ComfyUI's transformer class -> (the architecture as transformers names it, what a person calls it)
KNOWN = {
    "Llama2": ("llama", "Llama 3.1 8B (HiDream)"),
    "Gemma2_2B": ("gemma2", "Gemma 2 2B (Lumina 2)"),
    "Gemma3_4B": ("gemma3", "Gemma 3 4B"),
    "Qwen25_3B": ("qwen2_5_vl", "Qwen2.5-VL 3B (OmniGen2)"),
    "Qwen25_7BVLI": ("qwen2_5_vl", "Qwen2.5-VL 7B (Qwen-Image)"),
}
QUALIFY = ("a decoder LLM: Llama 3.1 8B (Load CLIP type 'hidream'), Gemma 2 2B ('lumina2'), Qwen2.5-VL 3B "
           "('omnigen2') or Qwen2.5-VL 7B ('qwen_image') from models/text_encoders, or a GGUF of one of them through "
           "ComfyUI-GGUF's CLIP loader")


class NotADecoderError(InputError):
    """A CLIP that holds no decoder LLM (CLIP-L/G, T5, ...)."""


def _is_decoder(module) -> bool:
    """ComfyUI's decoder-LLM text encoders (comfy/text_encoders/llama.py) are an SDClipModel whose transformer has
    a `model` with embed_tokens, layers and a final norm; CLIP-L/G and T5 have none of that."""
    inner = getattr(getattr(module, "transformer", None), "model", None)
    return all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "config"))


def _holds(clip) -> str:
    parts = [f"{name} ({type(getattr(child, 'transformer', child)).__name__})"
             for name, child in clip.cond_stage_model.named_children()]
    return ", ".join(parts) or type(clip.cond_stage_model).__name__


def find_decoder(clip):
    """(name, ComfyUI SDClipModel) of the decoder LLM a CLIP holds, or NotADecoderError saying what it holds and
    which text encoders qualify."""
    model = getattr(clip, "cond_stage_model", None)
    if model is None or not hasattr(clip, "tokenize"):
        raise NotADecoderError(f"the input is not a ComfyUI CLIP ({type(clip).__name__}); connect the CLIP output "
                               f"of Load CLIP or DualCLIPLoader")
    for name, child in model.named_children():
        if _is_decoder(child):
            return name, child
    try:
        import comfy.text_encoders.llama  # noqa: F401  (ComfyUI from 2025 on)
        host = ""
    except ImportError:
        host = (" This ComfyUI predates LLM text encoders (they arrived in 2025): update ComfyUI, or load the LLM "
                "from models/LLM with Load LLM.")
    raise NotADecoderError(f"this CLIP holds {_holds(clip)}: no decoder LLM, so it has no hidden states for Beyond "
                           f"CLIP. A CLIP qualifies when it holds {QUALIFY}.{host}")


def _sd_tokenizer(clip, name):
    tokenizer = getattr(clip.tokenizer, name, None)
    if tokenizer is None or not hasattr(tokenizer, "tokenizer"):
        raise NotADecoderError(f"this CLIP's tokenizer ({type(clip.tokenizer).__name__}) has no tokenizer for its "
                               f"'{name}' text encoder; load the text encoder with Load CLIP")
    return tokenizer


class HostTokenizer:
    """The part of a transformers tokenizer the pack calls, answered by ComfyUI's own tokenizer of the text
    encoder (an SDTokenizer around a transformers tokenizer or ComfyUI's SentencePiece wrapper). Ids are the ones
    ComfyUI's CLIPTextEncode feeds the model for the same text: its start token, then the text's tokens."""

    def __init__(self, sd_tokenizer):
        self.sd = sd_tokenizer
        self.raw = sd_tokenizer.tokenizer
        self.bos_token_id = sd_tokenizer.start_token
        self.pad_token_id = sd_tokenizer.pad_token
        self.eos_token_id = getattr(sd_tokenizer, "end_token", None)
        self.unk_token_id = None

    def _text_ids(self, text, offsets):
        start = self.sd.tokens_start  # ComfyUI drops the start token the raw tokenizer adds, then adds its own
        processor = _sentencepiece_processor(self.raw)
        if offsets and processor is not None:
            return _sentencepiece_offsets(processor, text, start)
        if offsets:
            if not getattr(self.raw, "is_fast", False):
                raise NotImplementedError("no offsets")
            out = self.raw(text, return_offsets_mapping=True)
            return list(out["input_ids"][start:]), [tuple(o) for o in out["offset_mapping"][start:]]
        return list(self.raw(text)["input_ids"][start:]), None

    def __call__(self, text, add_special_tokens=True, return_tensors=None, return_offsets_mapping=False, **_):
        ids, offsets = self._text_ids(text, return_offsets_mapping)
        if add_special_tokens and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
            offsets = None if offsets is None else [(0, 0)] + offsets
        out = {"input_ids": torch.tensor([ids], dtype=torch.long) if return_tensors == "pt" else ids}
        if return_offsets_mapping:
            out["offset_mapping"] = offsets
        return out


def _sentencepiece_processor(raw):
    """The SentencePieceProcessor inside ComfyUI's SentencePiece wrapper (Gemma's tokenizer), else None."""
    try:
        import sentencepiece
    except ImportError:
        return None
    inner = getattr(raw, "tokenizer", None)
    return inner if isinstance(inner, sentencepiece.SentencePieceProcessor) else None


def _sentencepiece_offsets(processor, text, start):
    """Ids as ComfyUI's Gemma tokenizer gives them, with character spans: SentencePiece's own span API needs
    protobuf, so each token's span is where the decoding of the ids up to it ends, aligned back onto the text
    (SentencePiece normalizes whitespace)."""
    ids = processor.encode(text)
    if start and ids and ids[0] == processor.bos_id():  # the processor adds BOS itself, as ComfyUI asks it to
        ids = ids[1:]
    ends = [len(processor.decode(ids[:k + 1])) for k in range(len(ids))]
    decoded = processor.decode(ids)
    to_text = [0] * (len(decoded) + 1)
    matcher = difflib.SequenceMatcher(None, decoded, text, autojunk=False)
    for a, b, size in matcher.get_matching_blocks():
        for i in range(size + 1):
            if a + i <= len(decoded):
                to_text[a + i] = b + i
    for i in range(1, len(to_text)):  # characters SentencePiece changed map to the last matched position
        to_text[i] = max(to_text[i], to_text[i - 1])
    spans, previous = [], 0
    for end in ends:
        end = min(end, len(decoded))
        spans.append((to_text[previous], to_text[end]))
        previous = end
    return ids, spans


class _FloatEmbedding(torch.nn.Module):
    """ComfyUI's input embedding (any precision or quantization) answering in float32 on the model's input
    device. `weight` is an empty (0, width) float32 tensor there: callers read only the dtype, device and width
    from it (GILL's input builder casts its [IMG] rows to match)."""

    def __init__(self, embedding, width, device):
        super().__init__()
        object.__setattr__(self, "embedding", embedding)  # not a submodule: no second owner of its weights
        self.weight_like = torch.empty(0, width, dtype=torch.float32, device=device)

    @property
    def weight(self):
        return self.weight_like

    def forward(self, ids):
        return self.embedding(ids.to(self.weight_like.device), out_dtype=torch.float32)


class TextEncoderDecoder(torch.nn.Module):
    """ComfyUI's decoder text encoder seen as the causal LM the pack reads hidden states from. Hidden states are
    numbered as transformers numbers them: 0 = the embeddings (scaled as the model scales them), i = after layer
    i, the last one after the final norm. Computed in float32, as ComfyUI's own encode does."""

    def __init__(self, encoder, arch):
        super().__init__()
        object.__setattr__(self, "encoder", encoder)  # ComfyUI's module; the CLIP's patcher owns it
        inner = encoder.transformer.model.config
        self.config = SimpleNamespace(hidden_size=inner.hidden_size, num_hidden_layers=inner.num_hidden_layers,
                                      max_position_embeddings=inner.max_position_embeddings, model_type=arch,
                                      vocab_size=inner.vocab_size)

    @property
    def input_device(self):
        # what ComfyUI's SDClipModel.forward uses: the embedding's device (partly loaded models cast the rest)
        return self.encoder.transformer.get_input_embeddings().weight.device

    def get_input_embeddings(self):
        return _FloatEmbedding(self.encoder.transformer.get_input_embeddings(), self.config.hidden_size,
                               self.input_device)

    def get_decoder(self):
        return self

    def _run(self, ids, embeds, intermediate):
        if embeds is not None:
            embeds = embeds.to(self.input_device, torch.float32).clone()  # Gemma scales its input in place
        elif ids is not None:
            ids = ids.to(self.input_device)
        return self.encoder.transformer(ids if embeds is None else None, None, embeds=embeds,
                                        intermediate_output=intermediate, final_layer_norm_intermediate=False,
                                        dtype=torch.float32)

    def hidden_state(self, *, ids=None, embeds=None, layer=-1) -> torch.Tensor:
        """One hidden state (B, T, D) float32; only what ComfyUI computes for that layer."""
        count = self.config.num_hidden_layers + 1
        if not -count <= layer < count:
            from ..bridges.llm_text import PromptError
            raise PromptError(f"hidden_layer {layer} is out of range: this text encoder has {count} hidden states "
                              f"(0 = embeddings, {count - 1} or -1 = last layer)")
        index = layer % count
        if index == count - 1:
            return self._run(ids, embeds, None)[0].float()
        if index == 0:
            return self._run(ids, embeds, "all")[1][:, 0].float()
        return self._run(ids, embeds, index - 1)[1].float()

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, output_hidden_states=True, **_):
        """transformers' answer shape: `.hidden_states`, one (B, T, D) float32 tensor per layer (every position
        attended to)."""
        states = self._run(input_ids, inputs_embeds, "all")[1].float()
        return SimpleNamespace(hidden_states=tuple(states.unbind(1)))


@dataclass(eq=False)
class TextEncoderLLM(LoadedLLM):
    """What the LLM socket carries for a stock CLIP. patcher: the CLIP's own; module() loads it as ComfyUI's
    CLIPTextEncode does (partial loading allowed) and returns the TextEncoderDecoder."""
    clip: object = None
    decoder: object = None
    encoder_name: str = ""  # the CLIP's attribute holding the decoder ('llama', 'gemma2_2b', 'qwen25_3b', ...)
    arch: str = ""
    what = "text encoder"

    @property
    def inner(self):
        return self.decoder

    def module(self):
        self.clip.load_model()  # ComfyUI's own load of its CLIP: it frees memory, and may load only part of it
        return self.decoder

    def describe(self) -> str:
        return f"text encoder '{self.name}' (a stock CLIP)"

    def cannot(self, what: str, why: str) -> InputError:
        """The error for a use a stock CLIP cannot serve yet: what, why, and what to connect instead."""
        return InputError(f"{what} cannot use {self.describe()}: {why}. Connect an LLM from Load LLM (a Hugging "
                          f"Face folder or a .gguf file in models/LLM) for this.")


def _weights_identity(decoder) -> str:
    """Changes with the weights and their precision (fp8, a GGUF quantization): a hash of a few embedding rows as
    the model's own embedding computes them."""
    emb = decoder.get_input_embeddings()
    ids = torch.arange(0, decoder.config.vocab_size, max(1, decoder.config.vocab_size // 64))[:64]
    with torch.no_grad():
        rows = emb(ids).float().cpu().contiguous()
    return hashlib.sha1(rows.numpy().tobytes()).hexdigest()[:16]


def from_clip(clip) -> TextEncoderLLM:
    """The CLIP as the pack's LLM (NotADecoderError for a CLIP without a decoder LLM)."""
    name, encoder = find_decoder(clip)
    kind = type(encoder.transformer).__name__
    arch, label = KNOWN.get(kind, (str(getattr(encoder.transformer.model.config, "transformer_type", kind)), kind))
    decoder = TextEncoderDecoder(encoder, arch)
    tokenizer = HostTokenizer(_sd_tokenizer(clip, name))
    # LoRA patches on the CLIP change its outputs: their set is part of the identity (ComfyUI renews the uuid
    # whenever patches are added); hooks applied per step cannot be keyed, so such a CLIP is not cached.
    patches = getattr(clip.patcher, "patches_uuid", "?") if getattr(clip.patcher, "patches", None) else "plain"
    hooked = bool(getattr(clip.patcher, "forced_hooks", None)) or getattr(clip, "apply_hooks_to_conds", None)
    identity = "" if hooked else f"clip:{kind}:{_weights_identity(decoder)}:{patches}"
    dtype = next((p.dtype for p in encoder.parameters() if p.is_floating_point()), torch.float32)
    log.debug("Beyond CLIP: using the CLIP's %s (%s) as the LLM, on %s", name, kind, mm.text_encoder_device())
    return TextEncoderLLM(patcher=clip.patcher, config=decoder.config, source="", identity=identity, name=label,
                          tokenizer=tokenizer, dtype=dtype, hidden_size=decoder.config.hidden_size, clip=clip,
                          decoder=decoder, encoder_name=name, arch=arch)


def is_text_encoder(llm) -> bool:
    return isinstance(llm, TextEncoderLLM)


__all__ = ["Handle", "TextEncoderLLM", "from_clip", "find_decoder", "is_text_encoder", "NotADecoderError"]
