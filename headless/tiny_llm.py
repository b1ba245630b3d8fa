"""Small random language models in the exact on-disk layout of real ones, built locally.

Used where no real weights exist (the demo with nothing downloaded, and the tests): a Hugging Face folder
with config.json, safetensors weights and a tokenizer trained here on a few sentences, so the real loading
code runs unchanged. The outputs mean nothing; the shapes, files and code paths are the real ones.
"""
from pathlib import Path

import torch

CORPUS = [
    "a photo of a red fox in the snow", "an oil painting of a lighthouse at dusk", "a cat and a dog on a sofa",
    "draw a castle on a hill under a starry sky", "what is the capital of france", "explain how a rainbow forms",
    "a watercolor of mountains and a lake", "portrait of an old man with a beard, studio lighting",
    "write a poem about the sea", "a bowl of fruit on a wooden table, still life", "how do i bake bread",
    "a futuristic city at night with neon lights", "the quick brown fox jumps over the lazy dog",
]
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def build_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer (any text encodes) that prepends <s> like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    bos = tok.token_to_id(SPECIAL["bos_token"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)


def write_llm_folder(folder, arch: str = "llama", seed: int = 0, hidden_size: int = 64, layers: int = 2,
                     context: int = 128, vocab_size: int = None) -> Path:
    """A small causal LM folder (config.json, model.safetensors, tokenizer files) for `arch` llama, mistral or opt.
    vocab_size: rows of the embeddings (default: the tokenizer's size; more, as models that pad their vocabulary
    have, gives the embeddings a real LLM's share of the weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, OPTConfig, OPTForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    ids = {k.replace("_token", "_token_id"): tokenizer.convert_tokens_to_ids(v) for k, v in SPECIAL.items()
           if k != "unk_token"}
    vocab = vocab_size or len(tokenizer)
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=context, **ids)
        model = LlamaForCausalLM(config)
    elif arch == "mistral":  # the same shapes as llama: only the architecture and the weights differ
        config = MistralConfig(vocab_size=vocab, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=context, **ids)
        model = MistralForCausalLM(config)
    elif arch == "opt":
        config = OPTConfig(vocab_size=vocab, hidden_size=hidden_size, ffn_dim=2 * hidden_size,
                           num_hidden_layers=layers, num_attention_heads=4, word_embed_proj_dim=hidden_size,
                           max_position_embeddings=context, **ids)
        model = OPTForCausalLM(config)
    else:
        raise ValueError(f"unknown arch {arch!r}")
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder


def random_mapper(in_dim: int, target: str = "sd1", seed: int = 0, **config):
    """A Beyond CLIP mapper with seeded random weights, scaled so its tokens look like CLIP's in size."""
    from ..bridges.mapper import BeyondCLIPMapper, MapperConfig

    torch.manual_seed(seed)
    mapper = BeyondCLIPMapper(MapperConfig(in_dim=in_dim, target=target, **config))
    return mapper.eval()


def random_repadapters(llm_folder, seed: int = 0, scale: float = 0.5):
    """RepAdapters for every linear of the LLM in `llm_folder`, randomised so they are not the identity."""
    from transformers import AutoModelForCausalLM

    from ..bridges.repadapter import build_adapters, find_linear_targets

    model = AutoModelForCausalLM.from_pretrained(str(llm_folder), local_files_only=True)
    torch.manual_seed(seed)
    adapters = build_adapters(model, find_linear_targets(model), hidden_dim=8, groups=2, scale=scale)
    with torch.no_grad():
        for _, adapter in adapters.items():
            adapter.conv_B.weight.normal_(0, 0.3)
            adapter.conv_B.bias.normal_(0, 0.1)
            adapter.conv_A.bias.normal_(0, 0.1)
    return adapters.eval()
