"""Prompt -> LLM hidden states, and greedy chat replies, on any transformers causal LM.

Pure torch/transformers: the caller puts the model on its device, handles progress and interruption
through the callbacks, and turns the result into conditioning.
"""
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from . import prompt_weights
from .errors import InputError

TEMPLATES = ("none", "llama-2-chat")
# template -> (text before the prompt, text after it); the prompt is stripped inside a template.
TEMPLATE_FORMS = {"llama-2-chat": ("[INST] ", " [/INST]")}


class PromptError(InputError):
    """A prompt the LLM cannot encode as asked."""


@dataclass
class EncodedPrompt:
    hidden: torch.Tensor  # (1, N, hidden_size), float32
    last_token: int  # index of the last real (not padding) token
    prompt_tokens: int  # tokens of the prompt before any cut or padding
    truncated_to: int = 0  # non-zero when the prompt was cut to this many tokens
    weights: list = None  # one per position (prompt_weights); None when the prompt has no weights


def check_text(text: str, what: str = "the prompt", error=PromptError) -> str:
    """`text` when a tokenizer can read it. A lone UTF-16 surrogate (what a broken copy and paste, or JSON's
    "\\ud800", leaves in a string) is no character at all: the tokenizers refuse it with a TypeError that names
    nothing, so it is refused here by position."""
    if not isinstance(text, str):
        raise error(f"{what} is a {type(text).__name__}, not text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise error(f"{what} holds U+{ord(text[e.start]):04X} at character {e.start}, half of a character pair that "
                    f"lost its other half (a broken copy and paste?): delete it, or paste the text again.") from None
    return text


def apply_template(text: str, template: str) -> str:
    return _templated(text, template)[0]


def _templated(text: str, template: str):
    """(templated text, index in it of the prompt's first character, characters stripped from the prompt's start)."""
    if template == "none":
        return text, 0, 0
    if template in TEMPLATE_FORMS:
        # The tokenizer adds <s>; llama-2-chat is Meta's single-turn format without a system prompt.
        before, after = TEMPLATE_FORMS[template]
        stripped = text.strip()
        return before + stripped + after, len(before), len(text) - len(text.lstrip())
    raise PromptError(f"unknown prompt template {template!r}; choose one of {TEMPLATES}")


def context_length(model) -> int:
    """The LLM's context in tokens, from a model or its config."""
    config = getattr(model, "config", model)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def input_device(model):
    """Where a model's inputs go: its own answer when it has one (a ComfyUI text encoder, whose weights may be
    partly offloaded), else the device of its first parameter."""
    device = getattr(model, "input_device", None)
    return device if device is not None else next(model.parameters()).device


def pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if tid is not None:
            return tid
    return 0


def tokenize(tokenizer, text: str, max_tokens: int):
    """Token ids (1, n) with the tokenizer's own special tokens; cut to max_tokens keeping the start.
    Returns (ids, prompt_tokens, truncated_to)."""
    ids = tokenizer(check_text(text), return_tensors="pt", add_special_tokens=True)["input_ids"]
    n = ids.shape[1]
    if n > max_tokens:
        return ids[:, :max_tokens], n, max_tokens
    return ids, n, 0


@dataclass
class PromptIds:
    ids: torch.Tensor  # (1, T) long
    last_token: int  # index of the last real (not padding) token
    prompt_tokens: int  # tokens of the prompt before any cut or padding
    truncated_to: int = 0  # non-zero when the prompt was cut to this many tokens
    weights: list = None  # one per id (1.0 for special, template and pad tokens); None: the prompt has no weights


def weighted_ids(tokenizer, segments, template: str):
    """(ids (1, n), one weight per id) of a prompt given as ComfyUI's (segment, weight) pairs: the plain text is
    tokenized in one piece, each token weighted by its characters (bridges/prompt_weights.py)."""
    text, char_weights = prompt_weights.plain_text(segments)
    templated, at, stripped = _templated(text, template)
    weights = [1.0] * len(templated)
    span = len(templated) - at - len(TEMPLATE_FORMS.get(template, ("", ""))[1])
    weights[at:at + span] = char_weights[stripped:stripped + span]
    try:
        encoded = tokenizer(templated, add_special_tokens=True, return_offsets_mapping=True)
        offsets = encoded["offset_mapping"]
    except (NotImplementedError, KeyError, TypeError, ValueError):
        raise PromptError("prompt weights like (word:1.3) need a tokenizer that knows which characters each token "
                          "came from (a 'fast' tokenizer with a tokenizer.json); this LLM's tokenizer does not. "
                          "Write the prompt without weights.") from None
    ids = torch.tensor([list(encoded["input_ids"])], dtype=torch.long)
    return ids, prompt_weights.token_weights(offsets, weights, templated)


def prompt_ids(tokenizer, text: str, *, context: int, num_tokens: int = 0, template: str = "none",
               segments=None) -> PromptIds:
    """The token ids an LLM reads for `text`: the template applied, cut to the context (and to num_tokens), and
    with num_tokens > 0 padded on the right to exactly that many with the pad token, which is attended to (as
    CLIP pads with end-of-text tokens that SD's UNet attends to: in a causal LM those positions see the whole
    prompt and carry its summary, and no attention mask is needed downstream, since SD ignores masks).
    segments: the prompt as ComfyUI's weighted (segment, weight) pairs, when it has weights other than 1.0
    (then `text` is not read); the result carries one weight per id."""
    limit = min(context, num_tokens) if num_tokens else context
    weights = None
    if segments is not None and prompt_weights.is_weighted(segments):
        ids, weights = weighted_ids(tokenizer, segments, template)
        n = ids.shape[1]
        truncated_to = limit if n > limit else 0
        ids, weights = ids[:, :limit], weights[:limit]
    else:
        if segments is not None:
            text = prompt_weights.plain_text(segments)[0]
        ids, n, truncated_to = tokenize(tokenizer, apply_template(text, template), limit)
    last_token = ids.shape[1] - 1
    if num_tokens and ids.shape[1] < num_tokens:
        pad = torch.full((1, num_tokens - ids.shape[1]), pad_id(tokenizer), dtype=ids.dtype)
        ids = torch.cat([ids, pad], dim=1)
        if weights is not None:
            weights = weights + [1.0] * pad.shape[1]
    return PromptIds(ids=ids, last_token=last_token, prompt_tokens=n, truncated_to=truncated_to, weights=weights)


def empty_ids(tokenizer, length: int) -> torch.Tensor:
    """(1, length) ids of the empty prompt at a given length, as ComfyUI builds it for weighting
    (sd1_clip.gen_empty_tokens): the start token when the tokenizer has one, then padding."""
    bos = tokenizer.bos_token_id
    ids = ([] if bos is None else [bos]) + [pad_id(tokenizer)] * length
    return torch.tensor([ids[:length]], dtype=torch.long)


def hidden_states(model, *, ids: torch.Tensor = None, embeds: torch.Tensor = None, layer: int = -1) -> torch.Tensor:
    """The hidden states at `layer` (an index into hidden_states: -1 is the last layer, 0 the embeddings) of a
    causal LM for token ids or input embeddings (B, T[, D]), every position attended to. Runs the decoder alone
    where the model has one: the same states, without logits over the whole vocabulary. A model that computes
    one layer by itself (`hidden_state`, a ComfyUI text encoder) is asked for that layer only."""
    if hasattr(model, "hidden_state"):
        return model.hidden_state(ids=ids, embeds=embeds, layer=layer)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    source = ids if ids is not None else embeds
    mask = torch.ones(source.shape[:2], dtype=torch.long, device=source.device)
    inputs = {"input_ids": ids} if ids is not None else {"inputs_embeds": embeds}
    out = (decoder or model)(**inputs, attention_mask=mask, output_hidden_states=True, use_cache=False)
    layers = len(out.hidden_states)
    if not -layers <= layer < layers:
        raise PromptError(f"hidden_layer {layer} is out of range: this LLM has {layers} hidden states "
                          f"(0 = embeddings, {layers - 1} or -1 = last layer)")
    return out.hidden_states[layer]


def encode(model, tokenizer, text: str, *, hidden_layer: int = -1, num_tokens: int = 0,
           template: str = "none", allow_empty: bool = False, segments=None) -> EncodedPrompt:
    """Hidden states (float32) of `text` at `hidden_layer`; num_tokens > 0 gives exactly that many tokens
    (see prompt_ids). segments: the prompt with its weights (prompt_ids)."""
    plain = text if segments is None else prompt_weights.plain_text(segments)[0]
    if not plain.strip() and not allow_empty:
        raise PromptError("the prompt is empty: write a prompt (for an empty negative use the 'zeros' or "
                          "encoded-empty negative choice)")
    p = prompt_ids(tokenizer, text, context=context_length(model), num_tokens=num_tokens, template=template,
                   segments=segments)
    hidden = hidden_states(model, ids=p.ids.to(input_device(model)), layer=hidden_layer).float()
    return EncodedPrompt(hidden=hidden, last_token=p.last_token, prompt_tokens=p.prompt_tokens,
                         truncated_to=p.truncated_to, weights=p.weights)


def encode_empty(model, tokenizer, length: int, hidden_layer: int = -1) -> torch.Tensor:
    """Hidden states (1, length, D) float32 of the empty prompt at that length (empty_ids): what weighted rows
    move away from."""
    return hidden_states(model, ids=empty_ids(tokenizer, length).to(input_device(model)), layer=hidden_layer).float()


def chat(model, tokenizer, text: str, *, max_new_tokens: int = 256, template: str = "none",
         on_token=None) -> str:
    """Greedy reply. on_token(i) is called after each new token (progress bar, interruption)."""
    class _Callback(StoppingCriteria):
        def __init__(self):
            self.count = 0

        def __call__(self, input_ids, scores, **kwargs):
            self.count += 1
            if on_token is not None:
                on_token(self.count)
            return False

    prompt = apply_template(text, template)
    ids, _, _ = tokenize(tokenizer, prompt, max(1, context_length(model) - max_new_tokens))
    device = input_device(model)
    generated = model.generate(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                               max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                               pad_token_id=pad_id(tokenizer),
                               stopping_criteria=StoppingCriteriaList([_Callback()]))
    return tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True).strip()
