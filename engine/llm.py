"""Run a loaded LLM (loaders.llm.LoadedLLM): hidden states of a prompt, greedy chat replies."""
from contextlib import nullcontext

import torch

from ..bridges import llm_text
from ..bridges.conversation import chat_answer, chat_transcript, exchanges
from ..loaders.text_encoders import is_text_encoder


def host_version() -> str:
    try:
        import comfyui_version
        return comfyui_version.__version__
    except ImportError:
        return "of this version"


def adapter_context(llm, model):
    """The context to run the LLM in: its unmerged RepAdapter's hooks, or nothing."""
    return llm.adapter.attach(model) if llm.adapter is not None else nullcontext()


def hidden_states(llm, text: str, *, hidden_layer: int = -1, num_tokens: int = 0, template: str = "none",
                  allow_empty: bool = False, segments=None) -> llm_text.EncodedPrompt:
    """The LLM's (with its adapter) hidden states of `text` at `hidden_layer`, float32, on the LLM's device;
    num_tokens > 0 pads or cuts to exactly that many tokens (llm_text.prompt_ids). segments: the prompt with its
    weights (engine/prompt_weights.parse); the result then carries one weight per position."""
    model = llm.module()
    with torch.no_grad(), adapter_context(llm, model):
        return llm_text.encode(model, llm.tokenizer, text, hidden_layer=hidden_layer, num_tokens=num_tokens,
                               template=template, allow_empty=allow_empty, segments=segments)


def empty_hidden_states(llm, length: int, hidden_layer: int = -1) -> torch.Tensor:
    """(1, length, D) float32 hidden states of the empty prompt (its start token, then padding), as ComfyUI's
    CLIP encodes it for weighting."""
    model = llm.module()
    with torch.no_grad(), adapter_context(llm, model):
        return llm_text.encode_empty(model, llm.tokenizer, length, hidden_layer)


def prompt_ids(llm, text: str, *, num_tokens: int = 0, template: str = "none") -> llm_text.PromptIds:
    """The token ids hidden_states() feeds the LLM for `text` (for caches of ids that train through the LLM)."""
    if is_text_encoder(llm):
        raise llm.cannot("Training through the LLM", "ComfyUI's text encoder runs frozen inside ComfyUI")
    return llm_text.prompt_ids(llm.tokenizer, text, context=llm_text.context_length(llm.config),
                               num_tokens=num_tokens, template=template)


def chat(llm, prompt: str, *, max_new_tokens: int, template: str = "none", on_token=None) -> str:
    """The plain LLM (never its adapter) answers greedily. on_token(i) after each new token."""
    if is_text_encoder(llm):
        raise llm.cannot("A chat reply", f"ComfyUI's text-encoder classes hold the LLM without its output head "
                                         f"(ComfyUI {host_version()}), so it cannot generate text")
    base = llm.base or llm
    model = base.module()
    return llm_text.chat(model, base.tokenizer, prompt, max_new_tokens=max_new_tokens, template=template,
                         on_token=on_token)


def chat_after(llm, conversation, message: str, *, max_new_tokens: int, template: str = "none", on_token=None):
    """The plain LLM's answer to `message` after the conversation's earlier turns (bridges.conversation's
    transcript; its oldest exchanges left out until it fits the context with room for the answer). Returns
    (answer, exchanges left out). Without earlier turns this is chat() on the message itself."""
    base = llm.base or llm
    room = llm_text.context_length(base.config) - max_new_tokens
    skip, transcript = 0, None
    for skip in range(len(exchanges(conversation.turns)) + 1):
        transcript = chat_transcript(conversation, message, template, skip)
        if transcript is None or len(base.tokenizer(transcript)["input_ids"]) <= room:
            break
    if transcript is None:
        return chat(llm, message, max_new_tokens=max_new_tokens, template=template, on_token=on_token), skip
    answer = chat(llm, transcript, max_new_tokens=max_new_tokens, template="none", on_token=on_token)
    return chat_answer(answer, template, True), skip
