"""The record of which text encoder a bridge is trained on (bridges/encoder_record.py), computed from a loaded LLM
handle -- a Load LLM folder or GGUF file, or a stock CLIP -- through the model's own input embedding (so fp8,
GGUF and partly offloaded weights answer like any other), and the check that a bridge fits the encoder."""
import hashlib
import logging
import weakref

import torch

from ..bridges import encoder_record as records
from ..bridges.errors import LoadError

log = logging.getLogger(__name__)
_ROWS = weakref.WeakKeyDictionary()  # handle -> probe rows (float32, cpu): computed once per loaded LLM
_WARNED = set()


def _probe_rows(llm) -> torch.Tensor:
    rows = _ROWS.get(llm)
    if rows is None:
        ids = llm.tokenizer(records.PROBE, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        embedding = llm.inner.get_input_embeddings()  # where it is: no load onto the device for a few rows
        with torch.no_grad():
            device = getattr(embedding, "weight", ids).device
            rows = embedding(ids[:records.SIGNATURE_TOKENS].to(device)).float().cpu()
        _ROWS[llm] = rows
    return rows


def architecture(llm) -> str:
    return getattr(llm, "arch", "") or str(getattr(llm.config, "model_type", "") or "unknown")


def record_of(llm, hidden_layer: int, template: str) -> records.EncoderRecord:
    rows = _probe_rows(llm)
    return records.EncoderRecord(
        name=llm.name or llm.describe(), arch=architecture(llm), width=int(llm.hidden_size), hidden_layer=hidden_layer,
        template=template, signature=records.encode_signature(records.signature_values(rows)),
        weights=hashlib.sha1(rows.contiguous().numpy().tobytes()).hexdigest()[:16])


def check_trained_on(llm, bridge, what: str, hidden_layer: int, template: str):
    """Refuse a bridge whose record names another text encoder than `llm` (by name, with the reason); a bridge
    file without a record (written before the pack kept one) is used with a one-time warning."""
    stored = getattr(bridge.config, "encoder", None)
    where = f"{bridge.describe()} ({bridge.source or 'built in memory'})"
    if stored is None:
        if bridge.source not in _WARNED:
            _WARNED.add(bridge.source)
            log.warning("Beyond CLIP: %s does not record which text encoder it was trained on (it was written "
                        "before the pack kept that), so it cannot be checked against %s; train it again to have "
                        "it checked.", where, llm.describe())
        return
    trained = records.EncoderRecord.from_dict(stored)
    current = record_of(llm, hidden_layer, template)
    why = records.difference(trained, current)
    if why:
        raise LoadError(f"{where} was trained on the text encoder {trained.describe()}, but {llm.describe()} is "
                        f"{current.describe()}: {why}. Use a {what} trained on this encoder, or connect "
                        f"{trained.name}.")
    if trained.weights and trained.weights != current.weights:
        log.info("Beyond CLIP: %s is the model %s was trained on, in another precision or quantization (or a "
                 "fine-tune that kept its embeddings); its outputs may differ slightly", llm.describe(), where)
    if trained.template != template:
        log.warning("Beyond CLIP: %s was trained with the prompt template '%s', encoding with '%s'", where,
                    trained.template, template)
