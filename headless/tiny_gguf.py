"""Small GGUF LLM files written with the gguf package's own writer in llama.cpp's layout (its tensor names, its q/k
row order, its tokenizer metadata), from a small Hugging Face Llama folder (headless/tiny_llm.py): what tests and
benchmarks read through transformers' GGUF support. Needs the optional gguf package."""


def _permute(w, heads):
    """llama.cpp's convert_hf_to_gguf order of q/k rows (transformers undoes it while reading)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, llm_folder, *, arch="llama", quant="Q8_0", with_tokenizer=True, name="tiny-llama", tied=False,
               leave_out=(), extra=None):
    """quant: a ggml type name for the 2-D weights (1-D ones stay F32, as llama.cpp keeps norms). tied: no
    output.weight (llama.cpp leaves it out when the head is the embeddings; transformers then ties them). name:
    general.name (llama.cpp names Mistral files 'mistral...' under the llama architecture). leave_out: tensor names
    not written (a damaged conversion). extra: {name: tensor} written after the model's (llama.cpp adds
    rope_freqs.weight to Llama 3 files, which transformers has no parameter for)."""
    import gguf
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(llm_folder), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(llm_folder), local_files_only=True)
    c = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(float(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]))
    writer.add_vocab_size(c.vocab_size)
    if with_tokenizer:
        vocab = tokenizer.get_vocab()
        tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        special = set(tokenizer.all_special_ids)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
        import json
        merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
        writer.add_bos_token_id(tokenizer.bos_token_id)
        writer.add_eos_token_id(tokenizer.eos_token_id)
        writer.add_pad_token_id(tokenizer.pad_token_id)
        writer.add_add_bos_token(True)
    qtype = getattr(gguf.GGMLQuantizationType, quant)

    def add(tensor_name, tensor):
        if tensor_name in leave_out:
            return
        array = tensor.detach().float().numpy()
        if array.ndim == 2 and quant != "F32":
            writer.add_tensor(tensor_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(tensor_name, array.astype(np.float32))

    sd = model.state_dict()
    add("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        add(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
        add(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        add(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        add(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        add(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        add(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
        add(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        add(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    if not tied:
        add("output.weight", sd["lm_head.weight"])
    for tensor_name, tensor in (extra or {}).items():
        add(tensor_name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model, tokenizer
