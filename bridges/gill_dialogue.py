"""GILL writes a reply and decides by itself when to show a picture: the decoding of the reference
(kohjingyu/gill, gill/models.py: GILLModel.generate and GILL.generate_for_images_and_texts), with a KV cache.

The reference's rules, step by step (a step writes one token, or the eight [IMG] tokens):
- the logits of [IMG1]..[IMG7] are -inf (never chosen on their own);
- before step `min_word_tokens` every [IMG] logit is -inf; from then on the [IMG0] logit becomes
  |logit| * ret_scale_factor when that factor is > 1, then |that| * gen_scale_factor when that one is > 1 (the
  reference scales the same token twice, [IMG0] being both its retrieval and its generation token);
- greedy (temperature 0, top_p must stay 1) or temperature then top-p (the smallest set of tokens whose probability
  reaches top_p, the first token past it kept), sampled from the exponentiated logits;
- choosing [IMG0] appends [IMG0]..[IMG7] at once; their last-layer hidden states are the picture's [IMG] states;
- the reply ends at the newline token or after max_new_tokens steps.

The vocabulary is the reference's: the reference adds '<|image|>' (id len(tokenizer)) and [IMG0]..[IMG7] (the next
eight ids) to the tokenizer and resizes the LLM's embedding matrix, whose row len(tokenizer) is then OPT's first
padding row (OPT-6.7B has 50272 rows for 50265 tokens) and whose last eight rows become the release's learnt [IMG]
rows. Here the LLM is never resized: its own logits give ids < n_text (the tokens, and '<|image|>' when the LLM has that
row), and OPT ties its output head to its input embeddings, so the [IMG] logits are h . e_IMGk with the release's rows,
exactly what the reference's resized head computes. No file beyond the official release is needed.

Where this differs from the reference, on purpose:
- a KV cache: each step runs the new token(s) only (the reference re-runs the whole sequence every step). The tokens
  and [IMG] states are the same (tests/test_gill_dialogue.py compares them with a transcription of the reference);
- the newline id is the token that decodes to '\\n' (the reference takes the first id of tokenizer('\\n'), which is
  the same token for OPT's tokenizer but a bare space for tokenizers that add a prefix space);
- a newline as the very first token ends an (empty) reply; the reference's cut `if trunc_idx > 0` misses it there
  and keeps every token up to max_new_tokens;
- [IMG0] chosen at the last step still gets its [IMG] states (the reference's loop stops before running them);
- after `max_pictures` pictures [IMG0] is -inf (the reference keeps writing [IMG] groups and ignores them);
- sampling weights are exp(logit - max logit) (the reference's exp(logit) overflows for large scaled logits), drawn
  on the CPU from a generator seeded with `seed`, so a seed gives the same reply on any device.
"""
import inspect
import math
from dataclasses import dataclass, field

import torch

from .errors import InputError


class DialogueError(InputError):
    """Decoding settings or an LLM that GILL's dialogue cannot use."""


@dataclass(frozen=True)
class DecodeOptions:
    max_new_tokens: int = 32  # steps (the reference's num_words / max_len)
    min_word_tokens: int = 0
    ret_scale_factor: float = 1.0
    gen_scale_factor: float = 1.0
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    max_pictures: int = 1

    def check(self):
        if self.max_new_tokens < 1:
            raise DialogueError(f"max_new_tokens must be at least 1 (got {self.max_new_tokens})")
        if self.min_word_tokens < 0 or self.max_pictures < 0:
            raise DialogueError("min_word_tokens and max_pictures cannot be negative")
        if not self.temperature >= 0 or not math.isfinite(self.temperature):
            raise DialogueError(f"temperature must be 0 (greedy) or more (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise DialogueError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.temperature == 0 and self.top_p != 1:
            raise DialogueError("top_p cannot be set with temperature 0 (greedy decoding): raise the temperature "
                                "or set top_p to 1 (GILL's reference refuses this too)")
        if not (self.ret_scale_factor >= 0 and self.gen_scale_factor >= 0):
            raise DialogueError("the scale factors cannot be negative")
        return self

    @property
    def picture_steps(self) -> int:
        """The most pictures a reply can hold."""
        return min(self.max_pictures, self.max_new_tokens)

    def positions(self) -> int:
        """The most positions a reply can add to the prompt (a picture is eight tokens in one step)."""
        return self.max_new_tokens + 7 * self.picture_steps


@dataclass(frozen=True)
class Vocabulary:
    n_text: int  # ids below come from the LLM's own output head
    newline: int
    tokenizer_size: int  # len(tokenizer): ids from here to n_text are '<|image|>' (no text)
    num_img: int = 8

    @property
    def img0(self) -> int:
        return self.n_text

    @property
    def img_ids(self) -> list:
        return list(range(self.n_text, self.n_text + self.num_img))


def newline_id(tokenizer) -> int:
    ids = tokenizer("\n", add_special_tokens=False)["input_ids"]
    for i in ids:
        if tokenizer.decode([i]) == "\n":
            return i
    if not ids:
        raise DialogueError("the LLM's tokenizer has no token for a newline, where GILL's replies end")
    return ids[-1]


def vocabulary(tokenizer, rows: int, num_img: int = 8) -> Vocabulary:
    """The reference's decoding vocabulary for an LLM whose embedding matrix has `rows` rows."""
    size = len(tokenizer)
    if size > rows:
        raise DialogueError(f"the tokenizer has {size} tokens but the LLM only {rows} embedding rows: they are not "
                            f"one model's; use the tokenizer files of the LLM's own release")
    known = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else tokenizer.get_vocab()
    for i in range(num_img):
        if f"[IMG{i}]" in known:
            raise DialogueError(f"the LLM's tokenizer already knows '[IMG{i}]' (a tokenizer saved from GILL's "
                                f"training); use the plain OPT tokenizer files: the pack adds GILL's [IMG] tokens "
                                f"itself, and a user typing '[IMG0]' must stay plain text")
    return Vocabulary(n_text=min(size + 1, rows), newline=newline_id(tokenizer), tokenizer_size=size,
                      num_img=num_img)


def process_logits(logits: torch.Tensor, step: int, pictures: int, vocab: Vocabulary, opts: DecodeOptions):
    """The reference's logit rules, in its order, on (1, n_text + 8) float logits (changed in place, returned)."""
    img0, end = vocab.img0, vocab.img0 + vocab.num_img
    logits[:, img0 + 1:end] = -math.inf
    if step < opts.min_word_tokens or pictures >= opts.max_pictures:
        logits[:, img0:end] = -math.inf
    else:
        if opts.ret_scale_factor > 1:
            logits[:, img0] = logits[:, img0].abs() * opts.ret_scale_factor
        if opts.gen_scale_factor > 1:
            logits[:, img0] = logits[:, img0].abs() * opts.gen_scale_factor
    return logits


def choose(logits: torch.Tensor, opts: DecodeOptions, generator: torch.Generator) -> int:
    """The next id from (1, V) processed logits: greedy, or temperature + top-p sampling with `generator` (CPU)."""
    if opts.temperature == 0:
        return int(logits.argmax(dim=-1))
    logits = logits.float().cpu() / opts.temperature
    if opts.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.cumsum(sorted_logits.softmax(dim=-1), dim=-1)
        remove = cumulative > opts.top_p
        remove[..., 1:] = remove[..., :-1].clone()  # keep the first token past the threshold too
        remove[..., 0] = False
        logits[0, order[0, remove[0]]] = -math.inf
    weights = (logits - logits.max()).exp()
    return int(torch.multinomial(weights, 1, generator=generator))


@dataclass
class Reply:
    tokens: list  # chosen ids in the decoding vocabulary, [IMG0]..[IMG7] included, the final newline not
    pictures: list = field(default_factory=list)  # (index of [IMG0] in tokens, (1, 8, width) float32 [IMG] states)
    stopped: str = "max_new_tokens"  # or "newline"
    steps: int = 0


class _Stepper:
    """One forward of the LLM's decoder on new input embeddings, reusing and growing its KV cache."""

    def __init__(self, model):
        if not hasattr(model, "get_decoder") or model.get_output_embeddings() is None:
            raise DialogueError(f"{type(model).__name__} has no separate decoder and output head; GILL's dialogue "
                                f"needs a causal LM such as OPT")
        self.decoder, self.head = model.get_decoder(), model.get_output_embeddings()
        self.keyword = "cache" if "cache" in inspect.signature(self.decoder.forward).parameters else "past_key_values"
        self.cache = None

    def __call__(self, embeds: torch.Tensor) -> torch.Tensor:
        out = self.decoder(inputs_embeds=embeds, use_cache=True, **{self.keyword: self.cache})
        self.cache = getattr(out, "cache", None) or out.past_key_values
        return out.last_hidden_state


def check_tied(model):
    """GILL's [IMG] logits are h . e_IMG because OPT's output head is its input embedding matrix."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text, "tie_word_embeddings", True):
        raise DialogueError(f"{type(model).__name__}'s output head is not tied to its input embeddings, so GILL's "
                            f"[IMG] embeddings give it no [IMG] logits and it cannot decide when to show a picture; "
                            f"use OPT (facebook/opt-6.7b), the LLM GILL was trained on")


def decode(model, prompt_embeds: torch.Tensor, img_embs: torch.Tensor, vocab: Vocabulary, opts: DecodeOptions,
           *, on_step=None) -> Reply:
    """GILL's reply to the prompt (1, T, width) in the model's dtype and device; img_embs: the release's (8, width)
    [IMG] rows. on_step(step) after each step (progress, interruption)."""
    opts.check()
    embed = model.get_input_embeddings()
    img = img_embs.to(device=prompt_embeds.device, dtype=prompt_embeds.dtype)
    step_model = _Stepper(model)
    generator = torch.Generator(device="cpu").manual_seed(int(opts.seed))
    reply = Reply(tokens=[])
    with torch.no_grad():
        last = step_model(prompt_embeds)[:, -1]
        for step in range(opts.max_new_tokens):
            reply.steps = step + 1
            logits = torch.cat([step_model.head(last)[:, :vocab.n_text], last @ img.T], dim=-1).float()
            token = choose(process_logits(logits, step, len(reply.pictures), vocab, opts), opts, generator)
            if on_step is not None:
                on_step(step + 1)
            if token == vocab.newline:
                reply.stopped = "newline"
                break
            picture = token == vocab.img0
            reply.tokens.extend(vocab.img_ids if picture else [token])
            if not picture and step == opts.max_new_tokens - 1:
                break  # nothing reads the last word's state
            hidden = step_model(img[None] if picture else embed(torch.tensor([[token]], device=img.device)))
            if picture:
                reply.pictures.append((len(reply.tokens) - vocab.num_img, hidden.float()))
            last = hidden[:, -1]
    return reply


def split_reply(tokenizer, reply: Reply, vocab: Vocabulary) -> list:
    """The reply as text pieces and picture numbers in order: ['a cat', 0, 'here it is'] (empty pieces dropped)."""
    parts, start = [], 0
    bounds = [(index, k) for k, (index, _) in enumerate(reply.pictures)] + [(len(reply.tokens), None)]
    for index, k in bounds:
        words = [t for t in reply.tokens[start:index] if t < vocab.tokenizer_size]  # '<|image|>' has no text
        text = tokenizer.decode(words, skip_special_tokens=True).strip() if words else ""
        if text:
            parts.append(text)
        if k is not None:
            parts.append(k)
        start = index + vocab.num_img
    return parts


# ---- the prompt -------------------------------------------------------------------------------------------------

def _bos_tokens(tokenizer) -> int:
    return len(tokenizer("a")["input_ids"]) - len(tokenizer("a", add_special_tokens=False)["input_ids"])


def plan_prompt(tokenizer, blocks, visual_tokens: int, num_img: int, budget: int) -> int:
    """How many of the oldest blocks to leave out so that the prompt fits `budget` positions. blocks: one list per
    exchange, oldest first, of str | int (a picture: visual_tokens positions) | None (a picture not drawn: GILL's own
    num_img [IMG] tokens). The newest block (the user's new turn) must fit on its own."""
    sizes = []
    for block in blocks:
        sizes.append(sum(len(tokenizer(p, add_special_tokens=False)["input_ids"]) if isinstance(p, str)
                         else num_img if p is None else visual_tokens for p in block))
    bos = _bos_tokens(tokenizer)
    first = keep_first_fitting(sizes, budget - bos)
    if first is None:
        raise DialogueError(f"the new turn takes {sizes[-1] + bos if sizes else 0} positions but only {budget} are "
                            f"free in the LLM's context after the room kept for the reply; shorten the message or "
                            f"lower max_new_tokens / max_pictures")
    return first


def prompt_embeds(embed_tokens, tokenizer, blocks, picture_rows, img_embs) -> torch.Tensor:
    """The LLM input (1, T, width) of the kept blocks (see plan_prompt): picture k reads picture_rows[k]
    (visual_tokens, width); None reads GILL's own [IMG0]..[IMG7] rows (as the reference's demo keeps a shown picture
    in its history). Each string is tokenized on its own, the tokenizer's BOS with the first one only (the
    reference's rule for its interleaved list)."""
    weight = embed_tokens.weight
    chunks, first_text = [], True
    for block in blocks:
        for part in block:
            if isinstance(part, str):
                ids = tokenizer(part, add_special_tokens=first_text)["input_ids"]
                first_text = False
                if ids:
                    chunks.append(embed_tokens(torch.tensor([ids], device=weight.device)))
            else:
                rows = img_embs if part is None else picture_rows[part]
                chunks.append(rows.to(device=weight.device, dtype=weight.dtype)[None])
    return torch.cat(chunks, dim=1)


def keep_first_fitting(sizes, budget):
    """Index of the oldest block kept when the newest blocks are kept while they fit; None if the last does not."""
    if not sizes or sizes[-1] > budget:
        return None
    total, first = 0, len(sizes)
    for size in reversed(sizes):
        if total + size > budget:
            break
        total += size
        first -= 1
    return first
