"""What every node family shares: the menu, socket types, progress and the disk-cache input."""
import comfy.model_management as mm
import comfy.utils
import torch

from ..loaders import encode_cache

CATEGORY = "Beyond CLIP"
# Socket types: what the node families hand each other (one place, so node modules never import each other).
LLM_TYPE = "BEYOND_CLIP_LLM"
MAPPER_TYPE = "BEYOND_CLIP_MAPPER"
REPADAPTER_TYPE = "BEYOND_CLIP_REPADAPTER"
GILL_TYPE = "BEYOND_CLIP_GILL"
GILL_IMG_STATES_TYPE = "BEYOND_CLIP_GILL_IMG_STATES"  # the (1, 8, llm_dim) [IMG] hidden states of one prompt
GILL_INDEX_TYPE = "BEYOND_CLIP_GILL_INDEX"
SEED_MODEL_TYPE = "BEYOND_CLIP_SEED"
SEED_TOKENS_TYPE = "SEED_TOKENS"  # kept unprefixed: saved workflows name it
SEED_LLM_TYPE = "BEYOND_CLIP_SEED_LLM"
SEED_SDXL_HEAD_TYPE = "BEYOND_CLIP_SEED_SDXL_HEAD"
VLM_TYPE = "BEYOND_CLIP_MUMU_VLM"
CONNECTOR_TYPE = "BEYOND_CLIP_MUMU_CONNECTOR"
MUMU_IMAGES_TYPE = "BEYOND_CLIP_MUMU_IMAGES"
MUMU_DATASET_TYPE = "BEYOND_CLIP_MUMU_DATASET"  # a built MUMU dataset folder (Build MUMU Dataset -> the MUMU trainers)
CONVERSATION_TYPE = "BEYOND_CLIP_CONVERSATION"  # bridges.conversation.Conversation: turns of words and pictures
# Every encoder's disk-cache input: the last optional input of the nodes that got it after their first release
# (ComfyUI's workflow files store widget values by position); LLM Text Encode had it from the start.
CACHE_TO_DISK = ("BOOLEAN", {"default": False, "tooltip": "also keep the encoding in output/"
                             f"{encode_cache.DISK_FOLDER} so it survives a restart"})


class Progress:
    """A ComfyUI progress bar whose every step is also a place where the user's interrupt stops the work."""

    def __init__(self, total: int):
        self.bar = comfy.utils.ProgressBar(total)
        self.total = total

    def step(self, value: int = None):
        mm.throw_exception_if_processing_interrupted()
        if value is None:
            self.bar.update(1)
        else:
            self.bar.update_absolute(min(value, self.total))


class LazyProgress:
    """A progress bar made when the total is first known: callback(done, total)."""

    def __init__(self):
        self.progress = None

    def __call__(self, done: int, total: int):
        if self.progress is None:
            self.progress = Progress(total)
        self.progress.step(done)


def ui_text(text, *result):
    """A node return that shows `text` on the node and outputs `result`."""
    return {"ui": {"text": [text]}, "result": result}


def execution_blocker():
    """ComfyUI (Aug 2024 on) skips every node downstream of an ExecutionBlocker; older hosts have none (None)."""
    try:
        from comfy_execution.graph import ExecutionBlocker
    except ImportError:
        return None
    return ExecutionBlocker(None)


def placeholder_image():
    """What an IMAGE output holds when there is nothing to give on a host that cannot skip the nodes after it: a
    black 64x64 picture (valid for every stock image node)."""
    return torch.zeros(1, 64, 64, 3)
