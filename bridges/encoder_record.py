"""Which text encoder a bridge was trained on, kept in the bridge file so it is refused on another one.

A record names the encoder, its architecture (as transformers names it: llama, mistral, qwen2, gemma2, ...), its
width, the hidden layer and the prompt template, and identifies its weights two ways:
- `signature`: a few values of the input-embedding rows of a fixed probe sentence's tokens, as the model's own
  embedding computes them. The same model in another precision or quantization (bf16, fp8 scaled, a GGUF) gives
  nearly the same values (cosine near 1); another model -- even one of the same architecture and width, such as
  LLaMA-2-7B and Mistral-7B, both 4096 wide -- gives unrelated ones (cosine near 0), and another tokenizer other
  tokens altogether. This decides.
- `weights`: a hash of the same rows at full precision: it tells "the very same weights" from "the same model in
  another precision, or a fine-tune that kept its embeddings" (a note, not a refusal).
"""
import base64
from dataclasses import asdict, dataclass, fields

import torch

PROBE = "a photograph of a red fox sitting in fresh snow beside a wooden fence at sunrise"
SIGNATURE_TOKENS = 16
SIGNATURE_DIMS = 32
SAME_MODEL = 0.9  # cosine of the signatures above which two encoders hold the same model


@dataclass
class EncoderRecord:
    name: str  # what a person calls it (the folder, the file, or the text encoder's kind)
    arch: str
    width: int
    hidden_layer: int
    template: str
    signature: str  # base64 of float16 values (signature_values)
    weights: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d) -> "EncoderRecord":
        if not isinstance(d, dict):
            raise ValueError(f"the text-encoder record is a {type(d).__name__}, not an object")
        known = {f.name for f in fields(cls)}
        missing = {f.name for f in fields(cls) if f.name != "weights"} - set(d)
        if missing or set(d) - known:
            raise ValueError(f"the text-encoder record has fields {sorted(d)}; expected {sorted(known)}")
        record = cls(**d)
        decode_signature(record.signature)
        return record

    def describe(self) -> str:
        return f"'{self.name}' ({self.arch}, {self.width} wide)"


def signature_values(rows: torch.Tensor) -> torch.Tensor:
    """rows: (tokens, width) embedding rows of the probe's tokens -> up to SIGNATURE_TOKENS x SIGNATURE_DIMS values
    (evenly spaced dimensions), float32."""
    rows = rows[:SIGNATURE_TOKENS].float()
    step = max(1, rows.shape[1] // SIGNATURE_DIMS)
    return rows[:, ::step][:, :SIGNATURE_DIMS].reshape(-1)


def encode_signature(values: torch.Tensor) -> str:
    return base64.b64encode(values.to(torch.float16).numpy().tobytes()).decode("ascii")


def decode_signature(text: str) -> torch.Tensor:
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError, AttributeError) as e:
        raise ValueError(f"the text-encoder signature is not base64 ({e})") from None
    if not raw or len(raw) % 2:
        raise ValueError("the text-encoder signature is empty or truncated")
    return torch.frombuffer(bytearray(raw), dtype=torch.float16).float()


def similarity(a: str, b: str) -> float:
    """Cosine of two signatures; -1 when they hold different numbers of values (another tokenizer)."""
    x, y = decode_signature(a), decode_signature(b)
    if x.shape != y.shape or not torch.isfinite(x).all() or not torch.isfinite(y).all():
        return -1.0
    return float(torch.nn.functional.cosine_similarity(x, y, dim=0))


def difference(trained: EncoderRecord, current: EncoderRecord) -> str:
    """Why `current` is another encoder than the one a bridge was `trained` on, or "" when it is the same model."""
    if trained.arch != current.arch:
        return f"another architecture ({current.arch}, not {trained.arch})"
    if trained.width != current.width:
        return f"another width ({current.width}, not {trained.width})"
    cos = similarity(trained.signature, current.signature)
    if cos < SAME_MODEL:
        return (f"other weights of the same architecture and width (their input embeddings of a probe sentence "
                f"agree to a cosine of {cos:.2f}; the same model in any precision gives above {SAME_MODEL})")
    return ""
