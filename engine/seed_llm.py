"""Run a loaded SEED-LLM (loaders.seed_llm.LoadedSeedLLM): draw (words -> exactly 32 codes) and describe (codes ->
a caption or a short answer)."""
import torch

from ..bridges import llm_text
from ..bridges import seed as seed_bridge
from ..bridges import seed_llm as seed_llm_bridge
from ..bridges.errors import InputError
from ..loaders.handles import modules
from .llm import adapter_context


def _models(seed_llm):
    model, vocab = modules(seed_llm.llm, seed_llm)
    return model, vocab


def draw(seed_llm, text: str, *, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
         on_code=None) -> seed_bridge.SeedCodes:
    """'Generate an image: text' <img> -> exactly 32 codes, each chosen among the code tokens (greedy at temperature
    0, else seeded nucleus sampling). on_code(i) after each code."""
    if not text.strip():
        raise InputError("the prompt is empty: write what to draw")
    config = seed_llm.config
    ids = seed_llm_bridge.draw_prompt_ids(config, seed_llm.tokenizer, text)
    model, vocab = _models(seed_llm)
    seed_llm_bridge.check_context(len(ids), config.num_codes, llm_text.context_length(model), "Draw (SEED-LLM)")
    with adapter_context(seed_llm.llm, model):
        codes = seed_llm_bridge.draw_codes(model, vocab, ids, temperature=temperature, top_p=top_p, seed=seed,
                                           on_code=on_code)
    return seed_bridge.SeedCodes(codes[None], config.codebook_size)


def describe(seed_llm, codes: torch.Tensor, question: str = "", *, max_new_tokens: int = 32, on_token=None) -> list:
    """Each image's codes (N, 32) -> its caption ('A photo of' ...) or, with a question, the short answer (greedy, at
    most max_new_tokens, fewer where the LLM's context ends)."""
    config = seed_llm.config
    seed_bridge.check_codes(codes, seed_llm.seed.config)
    model, vocab = _models(seed_llm)
    tokenizer = seed_llm.tokenizer
    texts = []
    with adapter_context(seed_llm.llm, model):
        for row in codes:
            ids = seed_llm_bridge.describe_prompt_ids(config, tokenizer, row, question)
            context = llm_text.context_length(model)
            seed_llm_bridge.check_context(len(ids), 1, context, "Describe (SEED-LLM)")
            limit = min(max_new_tokens, context - len(ids))
            out = seed_llm_bridge.generate_text(model, vocab, ids, max_new_tokens=limit,
                                                stop_id=seed_llm_bridge.eos_id(tokenizer), on_token=on_token)
            texts.append(tokenizer.decode(out, skip_special_tokens=True).strip())
    return texts
