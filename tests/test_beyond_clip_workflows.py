"""The shipped Beyond CLIP workflows, end to end in the real host with small models."""
import copy

import pytest
import torch
from conftest import (
    PACK_DIR,
    SavedImage,
    api_workflow,
    check_golden_pixels,
    node_of,
    pixel_change,
    run_saved_image,
)
from PIL import Image

WORKFLOWS = PACK_DIR / "workflows"


def workflow_prompt(host, pack, name, *, arch, llm, mapper, adapter=None, prompt_text=None, seed=None, prefix=None):
    """The shipped UI-format workflow as an API prompt, pointed at the small test models."""
    prompt = api_workflow(host, pack, name)
    for node_id, node in prompt.items():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            prompt[node_id] = {"class_type": "BeyondCLIP_TinyCheckpoint", "inputs": {"arch": arch}}
        elif kind == "BeyondCLIP_LLMLoader":
            inputs["llm_name"] = llm
        elif kind == "BeyondCLIP_MapperLoader":
            inputs["mapper_name"] = mapper
        elif kind == "BeyondCLIP_RepAdapterLoader":
            inputs["adapter_name"] = adapter
        elif kind == "EmptyLatentImage":
            inputs.update(width=64, height=64)
        elif kind == "KSampler":
            inputs["steps"] = 10
            if seed is not None:
                inputs["seed"] = seed
        elif kind in ("BeyondCLIP_TextEncode", "BeyondCLIP_Assistant") and prompt_text is not None:
            inputs["prompt"] = prompt_text
        elif kind == "SaveImage" and prefix:
            inputs["filename_prefix"] = prefix
    return prompt


@pytest.mark.parametrize("name,arch,target,width", [
    ("beyond_clip_sd15.json", "sd15", "sd1", 768),
    ("beyond_clip_sdxl.json", "sdxl", "sdxl", 2048),
])
def test_shipped_workflow_end_to_end(host, pack, tiny_llama, mapper_files, name, arch, target, width):
    prompt = workflow_prompt(host, pack, name, arch=arch, llm=tiny_llama, mapper=mapper_files[target],
                             prefix=f"t_{arch}")
    first = run_saved_image(host, prompt)
    check_golden_pixels(host, name, first)
    encode_id = node_of(prompt, "BeyondCLIP_TextEncode")
    positive, negative = host.node_output(encode_id)
    tokens, extra = positive[0]
    assert tokens.shape == (1, 77, width) and tokens.dtype == torch.float32
    assert torch.isfinite(tokens).all()
    if arch == "sdxl":
        assert extra["pooled_output"].shape == (1, 1280)
    assert negative[0][0].shape == (1, 77, width)
    assert not torch.equal(negative[0][0], tokens)

    again = run_saved_image(host, prompt)
    assert again.png == first.png, "same seed and prompt must give a byte-identical image"

    other = copy.deepcopy(prompt)
    other[encode_id]["inputs"]["prompt"] = "an oil painting of a red fox in the snow"
    change = pixel_change(run_saved_image(host, other).pixels, first.pixels)
    print(f"\n{name}: another prompt changes the pixels by {change:.2f} levels on average")
    assert change > 0.5, "a different prompt must change the image"


def test_router_workflow_draws_a_picture_request_and_answers_a_question(host, pack, tiny_llama, mapper_files,
                                                                         adapter_file):
    def run(text):
        prompt = workflow_prompt(host, pack, "beyond_clip_router_sd15.json", arch="sd15", llm=tiny_llama,
                                 mapper=mapper_files["sd1"], adapter=adapter_file, prompt_text=text, prefix="router")
        for node in prompt.values():
            if node["class_type"] == "BeyondCLIP_Assistant":
                node["inputs"]["max_new_tokens"] = 6
        host.reset_cache()
        ui = host.run(prompt)
        return prompt, ui, host.node_output(node_of(prompt, "BeyondCLIP_Assistant"))

    prompt, ui, (positive, _, answer, route, p_draw, _) = run("Draw a cozy cabin in a snowy pine forest at night")
    assert route == "draw" and p_draw > 0.5 and positive[0][0].shape == (1, 77, 768)
    assert len(host.saved_images(ui)) == 1
    with Image.open(host.saved_images(ui)[0]) as drawn:
        check_golden_pixels(host, "beyond_clip_router_sd15.json",
                            SavedImage(png=b"", pixels=drawn.convert("RGB").tobytes(), path=None, ui=ui))
    # The adapter is merged into the encoder: the conditioning differs from the plain LLM's.
    apply_id = node_of(prompt, "BeyondCLIP_ApplyRepAdapter")
    assert host.node_output(apply_id)[0].adapter.mode == "merged"

    prompt, ui, (_, _, answer, route, p_draw, _) = run("How many moons does Mars have?")
    assert route == "chat" and p_draw < 0.5 and isinstance(answer, str)
    assert ui[node_of(prompt, "BeyondCLIP_Assistant")]["text"] == [answer]
    assert bool(host.saved_images(ui)) != host.supports_execution_blocker()
