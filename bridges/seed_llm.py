"""SEED-LLM: any causal LM reads and writes SEED's 32 discrete codes (the SEED paper's SEED-OPT recipe).

The LLM stays frozen. It gets 8192 code tokens plus the begin/end markers, written as SEED-LLaMA writes them
(<img>, <img_00000>..<img_08191>, </img>; bridges/seed.py). Their input rows are the SEED codebook vectors through
one learnt Linear layer (the paper's FC layer: "we use a fully-connected layer to linearly project the causal
codes ... into the same dimension as the word embeddings"), the two markers' input rows are learnt, and the output
rows of all 8194 tokens are learnt; LoRA on the LLM's linear layers does the rest. Nothing of the LLM is modified:
new ids (>= the LLM's vocabulary) are embedded here, the decoder runs on input embeddings, and the logits of the
new tokens are computed here beside the LLM's own head.

Sequences (the paper's two tasks, and its VQA prompt):
  image to text  [BOS] <img> c1..c32 </img> A photo of | a red fox in the snow [EOS]     (loss after the |)
  text to image  [BOS] Generate an image: a red fox in the snow <img> | c1..c32 </img>
  question       [BOS] <img> c1..c32 </img> Question: what animal? Short answer. | fox [EOS]
Drawing decodes exactly 32 codes after the prompt and <img>, each chosen among the code tokens only (greedy or
seeded sampling); describing decodes text tokens only. Both run the decoder with its KV cache, one token a step.
Pure torch/transformers: the caller puts models on their device and turns results into nodes' outputs.
"""
import inspect
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config_record import ConfigRecord
from .errors import InputError
from .seed import NUM_CODES

CAPTION_PROMPT = "A photo of"
DRAW_TEMPLATE = "Generate an image: {}"
QUESTION_TEMPLATE = "Question: {} Short answer."
IGNORE = -100  # label of positions without loss (as transformers' losses use it)


@dataclass
class SeedLLMConfig(ConfigRecord):
    FIELDS_LABEL = "SEED-LLM config fields"
    base_vocab: int  # rows of the LLM's input embedding: the new tokens' ids start here
    width: int  # the LLM's embedding width
    codebook_size: int = 8192
    code_dim: int = 32
    num_codes: int = NUM_CODES
    rank: int = 8
    alpha: float = 16.0
    caption_prompt: str = CAPTION_PROMPT
    draw_template: str = DRAW_TEMPLATE
    question_template: str = QUESTION_TEMPLATE

    def __post_init__(self):
        if min(self.base_vocab, self.width, self.codebook_size, self.code_dim, self.num_codes, self.rank) < 1:
            raise ValueError(f"invalid SEED-LLM config {asdict(self)}")
        for name in ("draw_template", "question_template"):
            if getattr(self, name).count("{}") != 1:
                raise ValueError(f"{name} must hold one {{}} for the text, got {getattr(self, name)!r}")

    @property
    def boi(self) -> int:
        return self.base_vocab + self.codebook_size

    @property
    def eoi(self) -> int:
        return self.base_vocab + self.codebook_size + 1

    @property
    def new_tokens(self) -> int:
        return self.codebook_size + 2

    def code_ids(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.to(torch.long) + self.base_vocab


class VisualVocabulary(nn.Module):
    """The new tokens' rows. Input: code i -> proj(codebook[i]) (the FC layer, so a code never seen in training
    still lands near the codes whose codebook vectors are near its own), <img> and </img> -> learnt rows.
    Output: one learnt row per new token, scored against the decoder's last hidden state like the LM head's rows.
    The codebook is the SEED tokenizer's (a buffer, not saved: the file names the tokenizer instead)."""

    def __init__(self, config: SeedLLMConfig, codebook: torch.Tensor):
        super().__init__()
        self.config = config
        if tuple(codebook.shape) != (config.codebook_size, config.code_dim):
            raise ValueError(f"the codebook is {tuple(codebook.shape)}, the config says "
                             f"({config.codebook_size}, {config.code_dim})")
        self.proj = nn.Linear(config.code_dim, config.width)
        self.markers = nn.Parameter(torch.zeros(2, config.width))
        self.out_rows = nn.Parameter(torch.zeros(config.new_tokens, config.width))
        self.register_buffer("codebook", codebook.detach().float().clone(), persistent=False)

    @torch.no_grad()
    def initialise(self, input_embedding: torch.Tensor, output_embedding: torch.Tensor, generator: torch.Generator):
        """Start where the LLM's own rows are: code rows spread around the mean input embedding with its per-element
        spread, the markers at that mean, every output row at the mean output row (no new token is favoured)."""
        emb = input_embedding.detach().float().cpu()
        mean, spread = emb.mean(0), emb.std().clamp(min=1e-6)
        code_rms = self.codebook.cpu().pow(2).mean().sqrt().clamp(min=1e-6)
        weight = torch.randn(self.proj.weight.shape, generator=generator)
        self.proj.weight.copy_(weight * spread / (code_rms * self.config.code_dim ** 0.5))
        self.proj.bias.copy_(mean)
        self.markers.copy_(mean.expand_as(self.markers))
        self.out_rows.copy_(output_embedding.detach().float().cpu().mean(0).expand_as(self.out_rows))
        return self

    def rows(self, new: torch.Tensor) -> torch.Tensor:
        """Input rows of new-token indices (0..8191 codes, 8192 <img>, 8193 </img>) -> (..., width)."""
        cs = self.config.codebook_size
        new = new.to(self.codebook.device)
        coded = self.proj(self.codebook[new.clamp(max=cs - 1)])
        marker = self.markers[(new - cs).clamp(0, 1)]
        return torch.where((new < cs)[..., None], coded, marker)

    def embed(self, embedding: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of ids that mix the LLM's tokens (< base_vocab) and the new ones."""
        base = self.config.base_vocab
        is_new = ids >= base
        x = embedding(torch.where(is_new, torch.zeros_like(ids), ids))
        if bool(is_new.any()):
            x = x.clone()
            x[is_new] = self.rows(ids[is_new] - base).to(x.dtype)
        return x

    def new_logits(self, hidden: torch.Tensor, count: int = None) -> torch.Tensor:
        """Scores of the new tokens (the first `count` of them: the codes alone with count=codebook_size)."""
        rows = self.out_rows if count is None else self.out_rows[:count]
        return hidden.float() @ rows.t().to(hidden.device)

    def logits(self, head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Scores over the LLM's vocabulary followed by the new tokens."""
        return torch.cat([head(hidden).float(), self.new_logits(hidden)], dim=-1)


# ---- running the decoder ---------------------------------------------------------------------------------------

def decoder_of(model):
    """The transformer under a causal LM's head (LlamaModel, OPTDecoder, ...): it takes input embeddings and returns
    the states the head reads, without logits over the whole vocabulary."""
    get = getattr(model, "get_decoder", None)
    decoder = get() if get is not None else None
    return decoder if decoder is not None and decoder is not model else None


def _cache_keyword(module) -> str:
    """transformers 5.x renamed the decoder's past_key_values argument (and output) to cache."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def last_states(model, embeds, attention_mask=None, cache=None, use_cache=False):
    """(last-layer states (B, T, W), the KV cache or None) of input embeddings."""
    decoder = decoder_of(model)
    runner = decoder if decoder is not None else model
    kwargs = {"inputs_embeds": embeds, "use_cache": use_cache}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if cache is not None:
        kwargs[_cache_keyword(runner)] = cache
    if decoder is None:
        kwargs["output_hidden_states"] = True
    out = runner(**kwargs)
    hidden = out.last_hidden_state if decoder is not None else out.hidden_states[-1]
    if not use_cache:
        return hidden, None
    return hidden, out["cache"] if "cache" in out else out["past_key_values"]


# ---- sequences -------------------------------------------------------------------------------------------------

def text_ids(tokenizer, text: str) -> list:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def start_ids(tokenizer) -> list:
    """The special tokens the tokenizer puts before a text (Llama's <s>, OPT's </s>; none for GPT-2)."""
    plain = text_ids(tokenizer, "a")
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return full[:i]
    return []


def eos_id(tokenizer):
    return tokenizer.eos_token_id


def _continuation(tokenizer, prompt: str, answer: str):
    """Token ids of 'prompt answer' and how many of them are the prompt's (tokenized together, as text reads; the
    prompt's own tokens are a prefix of them whenever the answer starts a new word)."""
    joint = text_ids(tokenizer, f"{prompt} {answer.strip()}")
    alone = text_ids(tokenizer, prompt)
    k = 0
    while k < min(len(joint), len(alone)) and joint[k] == alone[k]:
        k += 1
    return joint, k


@dataclass
class Sequence:
    ids: torch.Tensor  # (T,) long: LLM tokens and new-token ids
    labels: torch.Tensor  # (T,) long: the token to predict at each position (IGNORE where no loss)
    kind: str = ""  # "caption", "draw" or "question": the losses are reported per kind


def _image_ids(config: SeedLLMConfig, codes) -> list:
    return [config.boi] + config.code_ids(torch.as_tensor(codes)).tolist() + [config.eoi]


def image_to_text(config: SeedLLMConfig, tokenizer, codes, prompt: str, answer: str) -> Sequence:
    """[BOS] <img> codes </img> prompt | answer [EOS]; the loss on the answer and the EOS."""
    head = start_ids(tokenizer) + _image_ids(config, codes)
    joint, k = _continuation(tokenizer, prompt, answer)
    end = [eos_id(tokenizer)] if eos_id(tokenizer) is not None else []
    ids = head + joint + end
    labels = [IGNORE] * (len(head) + k) + joint[k:] + end
    return Sequence(torch.tensor(ids), torch.tensor(labels), "caption")


def text_to_image(config: SeedLLMConfig, tokenizer, caption: str, codes) -> Sequence:
    """[BOS] Generate an image: caption <img> | codes </img>; the loss on the codes (Draw writes <img> itself and
    stops after the last code)."""
    head = start_ids(tokenizer) + text_ids(tokenizer, config.draw_template.format(caption.strip()))
    image = _image_ids(config, codes)
    labels = [IGNORE] * (len(head) + 1) + image[1:-1] + [IGNORE]
    return Sequence(torch.tensor(head + image), torch.tensor(labels), "draw")


def caption_sequence(config, tokenizer, codes, caption) -> Sequence:
    return image_to_text(config, tokenizer, codes, config.caption_prompt, caption)


def question_sequence(config, tokenizer, codes, question, answer) -> Sequence:
    s = image_to_text(config, tokenizer, codes, config.question_template.format(question.strip()), answer)
    s.kind = "question"
    return s


def draw_prompt_ids(config: SeedLLMConfig, tokenizer, text: str) -> list:
    """What Draw feeds before the first code: [BOS] Generate an image: text <img>."""
    return start_ids(tokenizer) + text_ids(tokenizer, config.draw_template.format(text.strip())) + [config.boi]


def describe_prompt_ids(config: SeedLLMConfig, tokenizer, codes, question: str = "") -> list:
    """What Describe feeds: [BOS] <img> codes </img> A photo of (or the question prompt)."""
    prompt = config.question_template.format(question.strip()) if question.strip() else config.caption_prompt
    return start_ids(tokenizer) + _image_ids(config, codes) + text_ids(tokenizer, prompt)


def pad_batch(sequences, pad_id: int):
    """(ids (B, T), attention mask (B, T), labels (B, T)) padded on the right."""
    length = max(len(s.ids) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s.ids)] = s.ids
        labels[i, :len(s.labels)] = s.labels
        mask[i, :len(s.ids)] = 1
    return ids, mask, labels


def sequence_losses(model, vocab: VisualVocabulary, ids, mask, labels) -> torch.Tensor:
    """Mean next-token cross-entropy of each sequence over its labelled positions (B,). Each position's softmax runs
    over the kind of token it holds, as decoding chooses among that kind only: a code among the codes (Draw), a
    word among the LLM's own tokens (Describe). So the code loss is comparable with log(codebook size), the loss of
    guessing, and no logits are computed where there is no label."""
    device = vocab.out_rows.device
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
    embeds = vocab.embed(model.get_input_embeddings(), ids)
    hidden, _ = last_states(model, embeds, attention_mask=mask)
    target, hidden = labels[:, 1:], hidden[:, :-1]
    base = vocab.config.base_vocab
    ce = torch.zeros(target.shape, device=device)
    words = (target != IGNORE) & (target < base)
    codes = target >= base
    if bool(words.any()):
        logits = model.get_output_embeddings()(hidden[words]).float()
        ce = ce.masked_scatter(words, F.cross_entropy(logits, target[words], reduction="none"))
    if bool(codes.any()):
        logits = vocab.new_logits(hidden[codes], vocab.config.codebook_size)
        ce = ce.masked_scatter(codes, F.cross_entropy(logits, target[codes] - base, reduction="none"))
    counted = (target != IGNORE).sum(1)
    if bool((counted == 0).any()):
        raise ValueError("a sequence has no labelled token")
    losses = ce.sum(1) / counted
    if not bool(codes.any()) and vocab.out_rows.requires_grad:
        # a batch without codes to write still involves every trained parameter (DDP waits for each one's gradient)
        losses = losses + 0.0 * vocab.out_rows.sum()
    return losses


# ---- decoding --------------------------------------------------------------------------------------------------

def choose(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Greedy when temperature is 0; else a draw from softmax(logits / temperature) cut to the smallest set of
    tokens holding top_p of the probability (nucleus sampling), from `generator` on the CPU (a seed gives the same
    draw on every device)."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = (sorted_probs.cumsum(-1) - sorted_probs) < top_p  # the first token is always kept
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def check_context(prompt_tokens: int, new_tokens: int, context: int, what: str):
    if prompt_tokens + new_tokens > context:
        raise InputError(f"{what}: the prompt takes {prompt_tokens} tokens and {new_tokens} more are needed, but the "
                         f"LLM's context is {context} tokens. Shorten the prompt.")


@torch.no_grad()
def draw_codes(model, vocab: VisualVocabulary, prompt_ids: list, *, temperature=0.0, top_p=1.0, seed=0,
               on_code=None) -> torch.Tensor:
    """Exactly num_codes codes after the prompt (which ends with <img>): one decoder step per code with the KV
    cache, each code chosen among the code tokens only. on_code(i) after each (it may raise to stop)."""
    config = vocab.config
    device = vocab.out_rows.device
    generator = torch.Generator().manual_seed(int(seed))
    ids = torch.tensor([prompt_ids], device=device)
    hidden, cache = last_states(model, vocab.embed(model.get_input_embeddings(), ids), use_cache=True)
    codes = []
    for i in range(config.num_codes):
        code = choose(vocab.new_logits(hidden[0, -1], config.codebook_size), temperature, top_p, generator)
        codes.append(code)
        if on_code is not None:
            on_code(i + 1)
        if i + 1 < config.num_codes:
            row = vocab.rows(torch.tensor([[code]], device=device))
            hidden, cache = last_states(model, row.to(hidden.dtype), cache=cache, use_cache=True)
    return torch.tensor(codes, dtype=torch.long)


@torch.no_grad()
def generate_text(model, vocab: VisualVocabulary, prefix_ids: list, *, max_new_tokens: int, stop_id=None,
                  on_token=None) -> list:
    """Greedy text after the prefix, among the LLM's own tokens only (the new tokens are never written), with the
    KV cache; stops at stop_id (not returned) or after max_new_tokens."""
    device = vocab.out_rows.device
    head = model.get_output_embeddings()
    ids = torch.tensor([prefix_ids], device=device)
    hidden, cache = last_states(model, vocab.embed(model.get_input_embeddings(), ids), use_cache=True)
    out = []
    for i in range(max_new_tokens):
        token = int(head(hidden[:, -1]).float().argmax())
        if on_token is not None:
            on_token(i + 1)
        if token == stop_id:
            break
        out.append(token)
        if i + 1 < max_new_tokens:
            hidden, cache = last_states(model, model.get_input_embeddings()(torch.tensor([[token]], device=device)),
                                        cache=cache, use_cache=True)
    return out
