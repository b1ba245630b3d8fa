"""Small MUMU models with seeded random weights, in the layouts users have: an Idefics2 folder (as released, with
LM head, perceiver, tokenizer and processor files), a MUMU connector (the pack's bridge format), an Idefics2 LoRA
(a peft folder, written by peft itself) and the MUMU UNet LoRA (kohya SDXL keys, for the stock LoRA loaders).

Used by the tests and by the workflow runner when the real files are absent, so the real loaders run unchanged.
The pack's classes are imported inside the functions (relative imports: call these through the loaded pack).
"""
from pathlib import Path

import torch

TEXT_WIDTH = 64  # the small Idefics2's text model (Mistral) width: what the connector reads


def write_idefics2_folder(folder, seed=0, text_width=TEXT_WIDTH, context=512, image_size=64, patch_size=4,
                          image_seq_len=8, text_layers=2, vision_width=32, vision_layers=2, heads=4) -> Path:
    """A small random Idefics2 folder: config.json, model.safetensors (with LM head and perceiver, as released),
    tokenizer and processor files built locally. `image_size` / `patch_size` set the largest picture and the pixels
    per token (the tests use 64 / 4; idefics2-8b has 980 / 14); the benchmarks choose larger widths and depths."""
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2ImageProcessor, Idefics2Processor

    from .tiny_llm import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<image>",
                                                                "<end_of_utterance>"]})
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    config = Idefics2Config(
        vision_config=dict(hidden_size=vision_width, intermediate_size=2 * vision_width,
                           num_hidden_layers=vision_layers, num_attention_heads=heads, image_size=image_size,
                           patch_size=patch_size),
        text_config=dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=text_width,
                         intermediate_size=2 * text_width, num_hidden_layers=text_layers, num_attention_heads=heads,
                         num_key_value_heads=2, max_position_embeddings=context, **ids),
        perceiver_config=dict(hidden_size=text_width, resampler_n_latents=8, resampler_depth=1, resampler_n_heads=2,
                              resampler_head_dim=16, num_key_value_heads=1),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), **ids)
    torch.manual_seed(seed)
    model = Idefics2ForConditionalGeneration(config)
    folder = Path(folder)
    model.save_pretrained(str(folder))
    image_processor = Idefics2ImageProcessor(do_image_splitting=False,
                                             size={"longest_edge": image_size, "shortest_edge": image_size // 2})
    Idefics2Processor(image_processor=image_processor, tokenizer=tokenizer,
                      image_seq_len=image_seq_len).save_pretrained(str(folder))
    return folder


def random_connector(in_dim=TEXT_WIDTH, seed=5, width=64, depth=2, heads=4):
    """A random MUMU connector (the pack's MUMUConnector) reading the last hidden layer of an Idefics2 this wide."""
    from ..bridges import mumu

    torch.manual_seed(seed)
    connector = mumu.MUMUConnector(mumu.ConnectorConfig(in_dim=in_dim, width=width, depth=depth, heads=heads,
                                                        hidden_layer=-1))
    return connector.eval()


def write_connector(path, seed=5, **sizes) -> Path:
    from ..loaders.mumu import save_connector

    save_connector(path, random_connector(seed=seed, **sizes))
    return Path(path)


def write_idefics2_lora(folder, idefics2_folder, seed=6) -> Path:
    """A peft LoRA folder (adapter_config.json + adapter_model.safetensors, written by peft) on the Idefics2 in
    `idefics2_folder`: its vision tower, projection and text model, with random B too, so it changes the output."""
    import peft
    from transformers import Idefics2ForConditionalGeneration

    model = Idefics2ForConditionalGeneration.from_pretrained(str(idefics2_folder))
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                             init_lora_weights=False)
    peft.get_peft_model(model, config).save_pretrained(str(folder))
    return Path(folder)


def write_unet_lora(path, model, seed=7, rank=4) -> Path:
    """A MUMU UNet LoRA for `model` (a ComfyUI SDXL ModelPatcher) in kohya's SDXL key format, random factors
    scaled so the LoRA visibly changes the picture."""
    from ..loaders import mumu as files

    state = model.model.state_dict()
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for key in files.unet_lora_targets(state):
        out_features, in_features = state[key].shape
        factors[key] = (torch.randn(rank, in_features, generator=generator) * in_features ** -0.5,
                        torch.randn(out_features, rank, generator=generator) * 0.5)
    files.save_unet_lora(path, factors, alpha=float(rank))
    return Path(path)
