"""The shipped Beyond CLIP workflows, end to end in the real host with small models."""
import copy
from pathlib import Path

import pytest
import torch

from conftest import PACK_DIR, pack_module

WORKFLOWS = PACK_DIR / "workflows"


def workflow_prompt(host, pack, name, *, arch, llm, mapper, prompt_text=None, seed=None, prefix=None):
    """The shipped UI-format workflow as an API prompt, pointed at the small test models."""
    wf = pack_module(pack, "headless.workflow")
    prompt = wf.to_api(wf.load_workflow(WORKFLOWS / name), host.nodes.NODE_CLASS_MAPPINGS)
    for node_id, node in prompt.items():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            prompt[node_id] = {"class_type": "BeyondCLIP_TinyCheckpoint", "inputs": {"arch": arch}}
        elif kind == "BeyondCLIP_LLMLoader":
            inputs["llm_name"] = llm
        elif kind == "BeyondCLIP_MapperLoader":
            inputs["mapper_name"] = mapper
        elif kind == "EmptyLatentImage":
            inputs.update(width=64, height=64)
        elif kind == "KSampler":
            inputs["steps"] = 10
            if seed is not None:
                inputs["seed"] = seed
        elif kind == "BeyondCLIP_TextEncode" and prompt_text is not None:
            inputs["prompt"] = prompt_text
        elif kind == "SaveImage" and prefix:
            inputs["filename_prefix"] = prefix
    return prompt


def node_of(prompt, class_type):
    return next(i for i, n in prompt.items() if n["class_type"] == class_type)


def run_image(host, prompt):
    host.reset_cache()  # a fresh executor: every node really runs
    images = host.saved_images(host.run(prompt))
    assert len(images) == 1
    return images[0].read_bytes()


@pytest.mark.parametrize("name,arch,target,width", [
    ("beyond_clip_sd15.json", "sd15", "sd1", 768),
    ("beyond_clip_sdxl.json", "sdxl", "sdxl", 2048),
])
def test_shipped_workflow_end_to_end(host, pack, tiny_llama, mapper_files, name, arch, target, width):
    prompt = workflow_prompt(host, pack, name, arch=arch, llm=tiny_llama, mapper=mapper_files[target],
                             prefix=f"t_{arch}")
    first = run_image(host, prompt)
    encode_id = node_of(prompt, "BeyondCLIP_TextEncode")
    positive, negative = host.node_output(encode_id)
    tokens, extra = positive[0]
    assert tokens.shape == (1, 77, width) and tokens.dtype == torch.float32
    assert torch.isfinite(tokens).all()
    if arch == "sdxl":
        assert extra["pooled_output"].shape == (1, 1280)
    assert negative[0][0].shape == (1, 77, width)
    assert not torch.equal(negative[0][0], tokens)

    again = run_image(host, prompt)
    assert again == first, "same seed and prompt must give a byte-identical image"

    other = copy.deepcopy(prompt)
    other[encode_id]["inputs"]["prompt"] = "an oil painting of a red fox in the snow"
    assert run_image(host, other) != first, "a different prompt must change the image"
