"""Beyond CLIP: LLM hidden states -> mapper -> SD1.x or SDXL conditioning."""
import logging

import torch

from ..bridges import llm_text
from ..bridges import prompt_weights as weighting
from ..bridges.conversation import drawing_text
from ..bridges.errors import LoadError
from . import llm as llm_engine
from . import prompt_weights
from .cache import reuse_encoding
from .conditioning import check_fits_model, conditioning
from .encoder_identity import check_trained_on

log = logging.getLogger(__name__)


def check_mapper_fits(llm, mapper, model=None, template="none"):
    """Refuse a mapper made for another LLM (its width, or the text encoder its file records), or (with the MODEL
    it will condition) another model family."""
    cfg = mapper.config
    if cfg.in_dim != llm.hidden_size:
        raise LoadError(f"{mapper.describe()} ({mapper.source}) reads {cfg.in_dim}-wide hidden states, but "
                        f"{llm.describe()} produces {llm.hidden_size}. Use a mapper trained for this LLM.")
    check_trained_on(llm, mapper, "mapper", cfg.hidden_layer, template)
    if model is not None:
        check_fits_model(model, cfg.out_dim, cfg.pooled_dim, f"{mapper.describe()} ({mapper.source})")


def encode(llm, mapper, text: str, *, hidden_layer: int, template: str, allow_empty: bool = False):
    """(tokens (1, N, width), pooled (1, 1280) or None) of one text, float32. Weighted words ((word:1.3), ComfyUI's
    syntax) move their tokens from the empty prompt's mapped tokens toward their own; the pooled vector is the
    prompt's, as in ComfyUI."""
    segments = prompt_weights.parse(text)
    enc = llm_engine.hidden_states(llm, text, hidden_layer=hidden_layer, num_tokens=mapper.config.num_tokens,
                                   template=template, allow_empty=allow_empty, segments=segments)
    if enc.truncated_to:
        log.warning("Beyond CLIP: the prompt has %d tokens; only the first %d are used (%s). Prompt start: %r",
                    enc.prompt_tokens, enc.truncated_to,
                    "the mapper's token count" if enc.truncated_to == mapper.config.num_tokens else "the LLM's context",
                    text[:60])
    net = mapper.module()
    device = next(net.parameters()).device
    with torch.no_grad():
        tokens, pooled = net(enc.hidden.to(device), enc.last_token)
        if enc.weights is not None:
            empty = llm_engine.empty_hidden_states(llm, enc.hidden.shape[1], hidden_layer)
            tokens = weighting.apply(tokens, net(empty.to(device), 0)[0], enc.weights)
    return tokens, pooled


def encode_conditioning(llm, mapper, text: str, *, hidden_layer: int, template: str, allow_empty: bool = False,
                        disk_cache: bool = False):
    """LLM + mapper -> CONDITIONING for one text; identical requests from any graph are served from the caches."""
    def compute():
        tokens, pooled = encode(llm, mapper, text, hidden_layer=hidden_layer, template=template,
                                allow_empty=allow_empty)
        return {"conditioning": conditioning(tokens, pooled)}

    return reuse_encoding("beyond_clip", [llm.identity, mapper.identity], [text, hidden_layer, template, allow_empty],
                          compute, disk=disk_cache, about={"llm": llm.describe(), "mapper": mapper.source}
                          )["conditioning"]


def drawing_request(llm, mapper, conversation, request: str, template: str):
    """The text a drawing request is encoded from mid-conversation: the user's earlier turns and the request, as
    many of the newest earlier turns as fit the mapper's token count (bridges.conversation.drawing_text). Returns
    (text, earlier user turns used)."""
    limit = mapper.config.num_tokens or llm_text.context_length(llm.config)

    def fits(text):
        return llm_engine.prompt_ids(llm, text, template=template).prompt_tokens <= limit

    return drawing_text(conversation, request, fits)
