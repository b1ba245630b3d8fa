"""Prompt weights parsed by ComfyUI's own parser (comfy/sd1_clip.py: escape_important, token_weights,
unescape_important; the same three functions in the 2024 and the 2025 hosts), so `(word:1.3)`, `(word)` and `\\(`
mean here what they mean in CLIPTextEncode. What the weights do: bridges/prompt_weights.py."""
import logging

from comfy import sd1_clip

from ..bridges import prompt_weights

log = logging.getLogger(__name__)


def parse(text: str):
    """The prompt as [(segment, weight)], or None when it has no syntax at all (the text is used as written, byte
    for byte as before weights existed). Refuses nesting ComfyUI's recursive parser cannot take and weights that
    are not usable numbers."""
    if "(" not in text and ")" not in text and "\\" not in text:
        return None
    if prompt_weights.nesting_depth(text) > prompt_weights.MAX_NESTING:
        raise prompt_weights.PromptWeightError(
            f"the prompt {text[:60]!r} nests parentheses more than {prompt_weights.MAX_NESTING} deep; write "
            f"(word:1.5) instead of many nested parentheses, or escape literal ones as \\( and \\)")
    segments = [(sd1_clip.unescape_important(s), float(w))
                for s, w in sd1_clip.token_weights(sd1_clip.escape_important(text), 1.0)]
    prompt_weights.check_weights(segments, text)
    return segments


def warn_ignored(text: str, where: str):
    """Bridges with learnt queries (GILL's mapper) read no per-token states: weights cannot act there."""
    try:
        segments = parse(text)
    except prompt_weights.PromptWeightError:
        segments = [(text, 0.0)]  # unusable weights are still weights the reader meant
    if segments is not None and prompt_weights.is_weighted(segments):
        log.warning("%s: prompt weights such as (word:1.3) are ignored: its mapper reads learnt query tokens, not "
                    "one state per prompt token, so the prompt is read as written", where)
