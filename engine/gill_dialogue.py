"""One GILL dialogue turn: the conversation so far and the user's new turn -> GILL's reply (words, and pictures where
the LLM writes [IMG0]), each picture retrieved from an image index and/or mapped into SD conditioning as the
decision model says, and the conversation with both turns added.

Every picture of the conversation (the user's, the retrieved and the generated ones) enters the prompt as GILL's
visual tokens (CLIP ViT-L/14 pooler_output -> visual_embeddings -> 4 tokens), through the same path as GILL Encode's
pictures (engine.gill.clip_features). A generated picture that was never drawn back into the conversation (see the
Reply Pictures node) enters as GILL's own [IMG0]..[IMG7], as the reference's demo keeps it in its history.
"""
import logging
from dataclasses import dataclass, field

import torch

from ..bridges import llm_text
from ..bridges.conversation import ASSISTANT, Conversation, Picture, Turn, exchanges, gill_blocks, user_turn
from ..bridges.errors import InputError
from ..bridges.gill import GENERATE, RETRIEVE
from ..bridges.gill_dialogue import (
    DecodeOptions,
    check_tied,
    decode,
    plan_prompt,
    prompt_embeds,
    split_reply,
    vocabulary,
)
from ..loaders.handles import modules
from . import gill as gill_engine
from . import llm as llm_engine
from .conditioning import conditioning

log = logging.getLogger(__name__)


@dataclass
class PictureResult:
    states: torch.Tensor  # (1, 8, width) float32 [IMG] hidden states, CPU
    decision: str  # generate | retrieve
    p_retrieve: float = None  # from the decision model (None without one)
    retrieved: torch.Tensor = None  # (1, H, W, 3) the index's best match (None without an index)
    retrieved_path: str = ""
    score: float = None  # its cosine similarity
    conditioning: list = None  # CONDITIONING for the sampler (a generated picture only)

    def describe(self) -> str:
        about = [self.decision]
        if self.p_retrieve is not None:
            about.append(f"p_retrieve={self.p_retrieve:.3f}")
        if self.retrieved_path:
            about.append(f"best match {self.retrieved_path} ({self.score:.3f})")
        return ", ".join(about)


@dataclass
class TurnResult:
    reply: str  # the reply's words, '[picture k]' where the k-th picture goes
    pictures: list  # PictureResult per picture, in order
    conversation: Conversation  # with the user's turn and the reply added
    dropped_turns: int = 0  # earlier turns left out of the prompt (the context was too short)
    stopped: str = ""
    steps: int = 0
    prompt_positions: int = 0
    tokens: list = field(default_factory=list)  # the reply's ids in GILL's vocabulary (bridges.gill_dialogue)


def _decide(gill, states, threshold, index):
    """(decision, P(retrieve) or None). Without an index there is nothing to retrieve: generate (as the reference
    does without its embedding matrix); without a decision model the reference shows the retrieved image."""
    if index is None:
        return GENERATE, None
    if gill.inner.decision_model is None:
        return RETRIEVE, None
    return gill_engine.decide(gill, states, threshold, index)


def _picture(gill, index, states, threshold, shown) -> tuple:
    """(PictureResult, the conversation's Picture) of one [IMG] group."""
    result = PictureResult(states=states, decision=GENERATE)
    if index is not None:
        batch, found = gill_engine.retrieve(gill, index, states, 1, shown)  # a reply prefers images not shown yet
        result.retrieved, result.retrieved_path, result.score = batch[:1], found[0][1], float(found[0][2])
        shown.append(result.retrieved_path)
    result.decision, result.p_retrieve = _decide(gill, states, threshold, index)
    if result.decision == GENERATE:
        tokens, pooled = gill_engine.generation(gill, states)
        result.conditioning = conditioning(tokens, pooled)
        return result, Picture(None, "generated", result.describe())
    return result, Picture(result.retrieved[0], "retrieved", result.describe())


def reply(llm, gill, conversation: Conversation, message: str, opts: DecodeOptions, *, images=None,
          clip_vision=None, index=None, threshold: float = 0.5, progress=None) -> TurnResult:
    """GILL's answer to `message` (with the user's `images`, an IMAGE batch) after `conversation`. progress(done,
    total) after each decoding step."""
    opts.check()
    conversation = conversation or Conversation()
    turn = user_turn(message, images)
    cfg = gill.config
    blocks = gill_blocks(conversation, turn)
    pictures = [p for block in blocks for p in block if isinstance(p, Picture) and not p.pending]
    number = {id(p): k for k, p in enumerate(pictures)}
    blocks = [[p if not isinstance(p, Picture) else None if p.pending else number[id(p)] for p in block]
              for block in blocks]
    reserve = opts.positions()
    budget = llm_text.context_length(llm.config) - reserve
    first = plan_prompt(llm.tokenizer, blocks, cfg.visual_tokens, cfg.num_img_tokens, budget)
    kept = sorted({p for block in blocks[first:] for p in block if isinstance(p, int)})
    pooled = {}
    if kept:  # CLIP first: loading it may move the LLM off its device, so the LLM is loaded after
        if clip_vision is None:
            raise InputError(f"the conversation holds {len(kept)} picture(s) (this turn's or earlier ones) but no "
                             f"clip_vision is connected: connect 'Load CLIP Vision' with clip-vit-large-patch14 "
                             f"(GILL reads each picture as 4 tokens made from CLIP ViT-L/14 features)")
        pooled = {k: gill_engine.clip_features(gill, clip_vision, pictures[k].image[None]) for k in kept}

    g, model = modules(gill, llm)
    gill_engine.check_llm(llm, gill, model)
    check_tied(model)
    embed = model.get_input_embeddings()
    vocab = vocabulary(llm.tokenizer, embed.weight.shape[0], cfg.num_img_tokens)
    img = g.img_embeddings().detach()
    with torch.no_grad(), llm_engine.adapter_context(llm, model):
        rows = {k: g.image_tokens(v.to(g.visual_fc.weight.device))[0] for k, v in pooled.items()}
        embeds = prompt_embeds(embed, llm.tokenizer, blocks[first:], rows, img)
        out = decode(model, embeds, img, vocab, opts,
                     on_step=None if progress is None else lambda step: progress(step, opts.max_new_tokens))
    dropped = sum(len(group) for group in exchanges(conversation.turns)[:first])
    if dropped:
        log.warning("GILL dialogue: the conversation is longer than %s's context; its oldest %d turn(s) are left "
                    "out of the prompt", llm.describe(), dropped)

    results, parts, words, shown = [], [], [], []
    for piece in split_reply(llm.tokenizer, out, vocab):
        if isinstance(piece, str):
            parts.append(piece)
            words.append(piece)
            continue
        result, picture = _picture(gill, index, out.pictures[piece][1].cpu(), threshold, shown)
        results.append(result)
        parts.append(picture)
        words.append(f"[picture {piece + 1}]")
    notes = (f"the oldest {dropped} turn(s) were left out of the last prompt: the conversation is longer than the "
             f"LLM's context",) if dropped else ()
    updated = Conversation(turns=conversation.turns + (turn, Turn(ASSISTANT, tuple(parts))), notes=notes)
    return TurnResult(reply=" ".join(words), pictures=results, conversation=updated, dropped_turns=dropped,
                      stopped=out.stopped, steps=out.steps, prompt_positions=embeds.shape[1], tokens=out.tokens)
