"""A conversation of words and pictures, as one value that dialogue nodes pass along (GILL's dialogue and the Beyond
CLIP router share it), and the prompts made from it.

Pure python + torch. A Conversation is immutable: every turn gives a new value, so an earlier node's output (which
ComfyUI caches and may hand to several nodes) never changes under it. Pictures are IMAGE tensors (H, W, 3) float32 in
[0, 1] on the CPU; a picture the assistant asked to *generate* has no image until the sampler has drawn it
(`pending`), and gets it later from the graph (Conversation.with_generated).

Prompt formats:
- GILL (`gill_blocks`): the reference's dialogue format, each user turn 'Q: ...\\nA:' and each reply ' ...\\n', pictures
  between the text pieces (the model reads each picture as its visual tokens; each text piece is tokenized on its own,
  as the reference tokenizes each string of its interleaved list).
- text-only LLMs (`chat_transcript`): the same 'Q:/A:' turns, or Llama 2 chat's multi-turn format.
- Beyond CLIP drawing (`drawing_text`): the user's own turns, newest last, as many as fit the mapper's tokens.
"""
from dataclasses import dataclass, field

import torch

from .errors import InputError

PLACEHOLDER = "<image>"  # where a user's picture goes in their text (as in GILL Encode's prompt)
USER, ASSISTANT = "user", "assistant"
ROLES = (USER, ASSISTANT)
ORIGINS = ("user", "retrieved", "generated")
FORMAT = "beyond_clip.conversation"
VERSION = 1
PICTURE_IN_TEXT = "(picture)"  # how a picture reads in a text-only transcript


class ConversationError(InputError):
    """A turn or a conversation that cannot be used as it is; the message says what to change."""


@dataclass(frozen=True, eq=False)
class Picture:
    image: torch.Tensor = None  # (H, W, 3) float32 in [0, 1], CPU; None while a generated picture is being drawn
    origin: str = "user"  # user | retrieved | generated
    note: str = ""  # e.g. where a retrieved picture came from and its score

    @property
    def pending(self) -> bool:
        return self.image is None

    def describe(self) -> str:
        size = "not drawn yet" if self.pending else f"{self.image.shape[1]}x{self.image.shape[0]}"
        return f"[picture: {self.origin}, {size}{'; ' + self.note if self.note else ''}]"


@dataclass(frozen=True)
class Turn:
    role: str
    parts: tuple  # str and Picture, in reading order

    @property
    def text(self) -> str:
        return " ".join(p for p in self.parts if isinstance(p, str))

    @property
    def pictures(self) -> list:
        return [p for p in self.parts if isinstance(p, Picture)]


@dataclass(frozen=True)
class Conversation:
    turns: tuple = ()
    notes: tuple = field(default=(), compare=False)  # what happened to it (e.g. turns left out of a prompt)

    def __len__(self):
        return len(self.turns)

    def with_turns(self, *turns) -> "Conversation":
        return Conversation(turns=self.turns + tuple(turns))

    def pending(self) -> list:
        """(turn index, part index) of the last turn's pictures still waiting for the sampler, in order. (A picture
        of an earlier turn that was never drawn back stays pending: GILL then reads its own [IMG] tokens there.)"""
        if not self.turns:
            return []
        last = len(self.turns) - 1
        return [(last, p) for p, part in enumerate(self.turns[-1].parts) if isinstance(part, Picture) and part.pending]

    def with_generated(self, images) -> "Conversation":
        """The conversation with the last turn's pending pictures drawn: images[k] (H, W, 3) fills the k-th."""
        slots = self.pending()
        if len(images) != len(slots):
            raise ConversationError(f"the conversation waits for {len(slots)} generated picture(s) but "
                                    f"{len(images)} were given: connect the VAE Decode of the sampler that draws "
                                    f"this reply's conditioning (one picture per conditioning)")
        turns = [list(t.parts) for t in self.turns]
        for (t, p), image in zip(slots, images):
            old = turns[t][p]
            turns[t][p] = Picture(image=check_picture(image, "a generated picture"), origin=old.origin, note=old.note)
        return Conversation(turns=tuple(Turn(self.turns[i].role, tuple(parts)) for i, parts in enumerate(turns)),
                            notes=self.notes)

    def show(self) -> str:
        """A plain-text transcript for people (the node display)."""
        if not self.turns:
            return "(empty conversation)"
        lines = []
        for turn in self.turns:
            words = " ".join(p.describe() if isinstance(p, Picture) else p for p in turn.parts)
            lines.append(f"{'User' if turn.role == USER else 'Assistant'}: {words}")
        return "\n".join(lines + [f"({n})" for n in self.notes])


def check_picture(image, what: str) -> torch.Tensor:
    """One picture as (H, W, 3) float32 on the CPU: from (H, W, C) or (1, H, W, C) IMAGE tensors, C = 3 or 4 (alpha
    dropped). Anything a vision tower cannot read (another shape, one channel, empty, NaN) is refused by name."""
    if not torch.is_tensor(image):
        raise ConversationError(f"{what} is not an image tensor ({type(image).__name__})")
    x = image[0] if image.ndim == 4 and image.shape[0] == 1 else image
    if x.ndim != 3 or x.shape[-1] not in (3, 4) or x.shape[0] < 1 or x.shape[1] < 1:
        raise ConversationError(f"{what} has shape {tuple(image.shape)}: a picture must be one RGB image (height, "
                                f"width, 3); convert masks or other tensors to an RGB image first")
    x = x[..., :3].detach().to("cpu", torch.float32)
    if not torch.isfinite(x).all():
        raise ConversationError(f"{what} holds NaN or infinite values; the vision tower cannot read it")
    return x.clamp(0, 1).contiguous()


def user_turn(text: str, images=None) -> Turn:
    """The user's turn: text, with their pictures (an IMAGE batch) where the text says <image>, or, without any
    <image>, before the text (as GILL's demo shows an uploaded picture before the question)."""
    text = text if isinstance(text, str) else ""
    pictures = [] if images is None else [Picture(check_picture(images[i], f"picture {i + 1} of this turn"), "user")
                                          for i in range(images.shape[0])]
    pieces = text.split(PLACEHOLDER)
    if not "".join(pieces).strip():
        raise ConversationError("the turn is empty: write what you want to say (a picture alone needs a few words "
                                "too, e.g. 'look at this')")
    marks = len(pieces) - 1
    if marks and marks != len(pictures):
        raise ConversationError(f"the text has {marks} {PLACEHOLDER} placeholder(s) but {len(pictures)} picture(s) "
                                f"are connected; write one {PLACEHOLDER} per picture, or none to show the pictures "
                                f"before the text")
    parts = [] if marks else list(pictures)
    for i, piece in enumerate(pieces):
        if piece.strip():
            parts.append(piece.strip())
        if i < marks:
            parts.append(pictures[i])
    return Turn(USER, tuple(parts))


# ---- prompts ----------------------------------------------------------------------------------------------------

def _framed(parts, head: str, tail: str) -> list:
    """`head` joined to the first piece of text, `tail` to the last part (as its own piece after a picture)."""
    out, headed = [], False
    for part in parts:
        if isinstance(part, str) and not headed:
            out.append(head + part)
            headed = True
        else:
            out.append(part)
    if not headed:
        out.append(head.rstrip())
    if out and isinstance(out[-1], str):
        out[-1] = out[-1] + tail
    else:
        out.append(tail)
    return out


def _gill_parts(turn: Turn) -> list:
    if turn.role == USER:
        return _framed(turn.parts, "Q: ", "\nA:")
    # a reply reads as the model wrote it: a space before each piece of text, a newline at the end
    parts = [" " + p if isinstance(p, str) else p for p in turn.parts]
    if parts and isinstance(parts[-1], str):
        parts[-1] += "\n"
    else:
        parts.append("\n")
    return parts


def exchanges(turns) -> list:
    """Turns grouped into exchanges (a user turn and the replies that follow it), oldest first: the unit that is left
    out when a prompt is too long (a reply is never kept without the question it answers)."""
    groups = []
    for turn in turns:
        if turn.role == USER or not groups:
            groups.append([])
        groups[-1].append(turn)
    return groups


def gill_blocks(conversation: Conversation, turn: Turn) -> list:
    """GILL's prompt for the next reply: one list of parts (str | Picture) per exchange, oldest first, the new user
    turn last."""
    blocks = [[p for t in group for p in _gill_parts(t)] for group in exchanges(conversation.turns)]
    return blocks + [_gill_parts(turn)]


def _text_of(turn: Turn) -> str:
    return " ".join(PICTURE_IN_TEXT if isinstance(p, Picture) else p for p in turn.parts)


def chat_transcript(conversation: Conversation, message: str, template: str, skip: int = 0) -> str:
    """What a text-only LLM reads to answer `message` after the conversation (its oldest `skip` exchanges left out).
    Without earlier turns: None (the chat nodes then send the message as they always did). 'none': 'Q: ...\\nA: ...'
    turns; 'llama-2-chat': Meta's multi-turn format ([INST] q [/INST] a </s><s>[INST] ...; the tokenizer adds the
    first <s>). Pictures read as '(picture)'."""
    groups = exchanges(conversation.turns)[skip:]
    if not groups:
        return None
    if template == "llama-2-chat":
        out = []
        for group in groups:
            question = " ".join(_text_of(t) for t in group if t.role == USER)
            answer = " ".join(_text_of(t) for t in group if t.role == ASSISTANT)
            out.append(f"[INST] {question.strip()} [/INST] {answer.strip()} </s><s>")
        return "".join(out) + f"[INST] {message.strip()} [/INST]"
    if template != "none":
        raise ConversationError(f"unknown prompt template {template!r}")
    lines = []
    for group in groups:
        for t in group:
            lines.append(("Q: " if t.role == USER else "A: ") + _text_of(t).strip())
    return "\n".join(lines + [f"Q: {message.strip()}", "A:"])


def chat_answer(text: str, template: str, had_turns: bool) -> str:
    """The answer cut where a 'Q:/A:' transcript makes the model start the user's next turn."""
    if template == "none" and had_turns:
        text = text.split("\nQ:")[0]
    return text.strip()


def drawing_text(conversation: Conversation, request: str, fits) -> tuple:
    """The text a drawing request mid-conversation is encoded from: the user's earlier turns (their words only),
    oldest first, one per line, ending with the request; the oldest left out first until fits(text) holds. The
    request itself is always kept, as it is when no earlier turn fits (the encoder then cuts it as it cuts any
    prompt). Returns (text, number of earlier user turns used)."""
    earlier = [t.text.strip() for t in conversation.turns if t.role == USER and t.text.strip()]
    for start in range(len(earlier)):
        text = "\n".join(earlier[start:] + [request.strip()])
        if fits(text):
            return text, len(earlier) - start
    return request, 0


# ---- plain data (the file format's content) ---------------------------------------------------------------------

def to_data(conversation: Conversation, picture_ref) -> dict:
    """A JSON-able dict; picture_ref(Picture) -> a string naming the stored picture (or None while pending)."""
    turns = []
    for turn in conversation.turns:
        parts = []
        for p in turn.parts:
            if isinstance(p, Picture):
                parts.append({"picture": {"origin": p.origin, "note": p.note,
                                          "image": None if p.pending else picture_ref(p)}})
            else:
                parts.append({"text": p})
        turns.append({"role": turn.role, "parts": parts})
    return {"format": FORMAT, "version": VERSION, "turns": turns}


def _expect(value, kind, where):
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ConversationError(f"{where} must be a {name}, found {type(value).__name__}")
    return value


def _keys(d, required, optional, where):
    _expect(d, dict, where)
    missing = [k for k in required if k not in d]
    unknown = sorted(set(d) - set(required) - set(optional))
    if missing or unknown:
        raise ConversationError(f"{where}: " + "; ".join(
            ([f"missing {missing}"] if missing else []) + ([f"unexpected {unknown[:5]}"] if unknown else [])))


def from_data(data, read_picture) -> Conversation:
    """The conversation of a dict made by to_data, checked strictly (ConversationError names what is wrong).
    read_picture(ref, where) -> (H, W, 3) tensor."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ConversationError(f"it is not a Beyond CLIP conversation (format {found!r}, expected {FORMAT!r})")
    _keys(data, ("format", "version", "turns"), (), "the file")
    if data["version"] != VERSION:
        raise ConversationError(f"it is a conversation of format version {data['version']!r}; this pack reads "
                                f"version {VERSION}")
    turns = []
    for i, turn in enumerate(_expect(data["turns"], list, "'turns'")):
        where = f"turn {i + 1}"
        _keys(turn, ("role", "parts"), (), where)
        if turn["role"] not in ROLES:
            raise ConversationError(f"{where}: role {turn['role']!r} is not one of {ROLES}")
        parts = []
        for j, part in enumerate(_expect(turn["parts"], list, f"{where} 'parts'")):
            at = f"{where}, part {j + 1}"
            _expect(part, dict, at)
            if set(part) == {"text"}:
                parts.append(_expect(part["text"], str, at + " 'text'"))
                continue
            _keys(part, ("picture",), (), at)
            pic = part["picture"]
            _keys(pic, ("origin", "note", "image"), (), at + " 'picture'")
            if pic["origin"] not in ORIGINS:
                raise ConversationError(f"{at}: picture origin {pic['origin']!r} is not one of {ORIGINS}")
            note = _expect(pic["note"], str, at + " 'note'")
            if pic["image"] is None:
                if pic["origin"] != "generated":
                    raise ConversationError(f"{at}: only a generated picture may be without an image")
                parts.append(Picture(None, "generated", note))
                continue
            image = check_picture(read_picture(_expect(pic["image"], str, at + " 'image'"), at), f"{at}'s picture")
            parts.append(Picture(image, pic["origin"], note))
        turns.append(Turn(turn["role"], tuple(parts)))
    return Conversation(turns=tuple(turns))
