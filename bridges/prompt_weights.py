"""Prompt weights in ComfyUI's syntax -- `(word:1.3)`, `(word)` = 1.1, `\\(` for a literal parenthesis -- for
bridges that keep one output token per LLM token (the Beyond CLIP mapper, the MUMU connector).

ComfyUI's own parser splits the text into (segment, weight) pairs (engine/prompt_weights.py calls it; nothing of
ComfyUI is imported here). Unlike ComfyUI's CLIP tokenizer, which tokenizes each segment on its own, the LLM
reads the whole text without the syntax, tokenized in one piece: a weight never changes which tokens the LLM
sees, so `(cat:1.0)` gives exactly the ids of `cat`, and a weight changes only the rows of its own tokens. Each
token takes the weight of its first non-space character. The weighted rows then move from the encoding of the
empty prompt toward their own, as ComfyUI's CLIP does: row = empty + weight * (row - empty).
"""
import math

import torch

from .errors import InputError

MAX_WEIGHT = 100.0  # beyond this a row leaves any range a UNet has seen; ComfyUI's nodes offer 0..2
MAX_NESTING = 32  # ComfyUI's parser recurses once per level of parentheses


class PromptWeightError(InputError):
    """A prompt whose weights cannot be used as written."""


def nesting_depth(text: str) -> int:
    depth = deepest = 0
    for char in text:
        if char == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif char == ")":
            depth = max(0, depth - 1)
    return deepest


def check_weights(segments, text: str):
    """Refuse weights that would turn the conditioning into inf/nan or past any meaningful range."""
    for segment, weight in segments:
        if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
            raise PromptWeightError(f"the weight {weight!r} of {segment[:40]!r} in the prompt {text[:60]!r} is not "
                                    f"a usable number; write a weight between -{MAX_WEIGHT:g} and {MAX_WEIGHT:g}, "
                                    f"e.g. (word:1.3)")


def plain_text(segments) -> tuple:
    """(the text without the syntax, the weight of each of its characters)."""
    text = "".join(s for s, _ in segments)
    weights = [w for s, w in segments for _ in s]
    return text, weights


def is_weighted(segments) -> bool:
    return any(w != 1.0 for _, w in segments)


def token_weights(offsets, char_weights, text: str) -> list:
    """One weight per token: the weight of the first non-space character in its (start, end) character span of
    `text`; 1.0 for tokens that cover no character (BOS, template and special tokens)."""
    out = []
    for start, end in offsets:
        weight = 1.0
        for i in range(max(0, start), min(end, len(text))):
            if not text[i].isspace():
                weight = char_weights[i]
                break
        out.append(weight)
    return out


def apply(tokens: torch.Tensor, empty: torch.Tensor, weights) -> torch.Tensor:
    """tokens, empty: (1, N, D) encodings of the prompt and of the empty prompt at the same positions; weights: one
    per position (len <= N; missing ones are 1.0). Rows with weight 1.0 are returned untouched (the same bytes)."""
    out = tokens.clone()
    for j, weight in enumerate(weights[: tokens.shape[1]]):
        if weight != 1.0:
            out[:, j] = (tokens[:, j] - empty[:, j]) * weight + empty[:, j]
    return out
