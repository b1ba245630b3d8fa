"""MUMU's bootstrapped dataset as nodes: Load Grounding DINO, Build MUMU Dataset (captioned pictures -> prompts
with crops before their words, in a dataset folder the MUMU trainers read), Preview MUMU Dataset."""
import hashlib
import os

from ..bridges.mumu_dataset import Settings
from ..engine import mumu_dataset as engine
from ..loaders import grounding_dino as detectors
from ..loaders import mumu_dataset as files
from ..loaders.errors import InputError
from .common import CATEGORY, MUMU_DATASET_TYPE, Progress

DETECTOR_TYPE = "BEYOND_CLIP_GROUNDING_DINO"


class LoadGroundingDINO:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "detector_name": (detectors.list_detectors(), {
                "tooltip": f"A Grounding DINO Hugging Face folder in models/{detectors.FOLDER} (e.g. "
                           f"IDEA-Research/grounding-dino-tiny: config.json, model.safetensors, processor and "
                           f"tokenizer files)"}),
            "dtype": (detectors.DTYPES, {"default": "fp32"}),
        }}

    RETURN_TYPES = (DETECTOR_TYPE,)
    RETURN_NAMES = ("detector",)
    FUNCTION = "load"
    CATEGORY = CATEGORY + "/MUMU"
    DESCRIPTION = ("Loads Grounding DINO (open-vocabulary object detection) offline, for building MUMU's dataset: "
                   "it finds the phrases of each caption in its picture.")

    @classmethod
    def VALIDATE_INPUTS(cls, detector_name):
        if detector_name not in detectors.list_detectors():
            return detectors.missing_message(detector_name)
        return True

    def load(self, detector_name, dtype):
        progress = Progress(3)
        return (detectors.load_grounding_dino(detector_name, dtype_choice=dtype, progress=progress.step),)


def _source_stamp(source):
    """Changes when a picture or caption of the source is added, removed or edited (names, sizes, times)."""
    try:
        root = files.resolve_source(source)
    except InputError:
        return source
    h = hashlib.sha1()
    paths = [root] if root.is_file() else []
    if root.is_dir():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            paths += [os.path.join(dirpath, f) for f in sorted(filenames)]
    for path in paths:
        try:
            st = os.stat(path)
            h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        except OSError:
            continue
    return h.hexdigest()


class BuildMUMUDataset:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "detector": (DETECTOR_TYPE,),
                "source": (files.list_sources(), {
                    "tooltip": "In ComfyUI's input folder: a folder of pictures with same-name .txt captions "
                               "(sub-folders too), or a .tsv 'picture<TAB>caption'"}),
                "dataset_name": ("STRING", {"default": "mumu_dataset", "tooltip": "Written as input/<name>/: the "
                                            "trainers' files (stage1_captions.txt, stage2_pairs.tsv), crops/ and "
                                            "manifest.jsonl (editable)"}),
                "box_threshold": ("FLOAT", {"default": 0.35, "min": 0.0, "max": 0.99, "step": 0.01,
                                            "tooltip": "A box is kept when its best word scores above this"}),
                "text_threshold": ("FLOAT", {"default": 0.25, "min": 0.0, "max": 0.99, "step": 0.01,
                                             "tooltip": "Words scoring above this belong to the box's phrase"}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1, "tooltip": "Seeds the head swap (70 %), "
                                 "augmentation (20 %) and control image (30 %) draws: the same seed rebuilds the "
                                 "same dataset"}),
                "crop_max_side": ("INT", {"default": 1024, "min": 16, "max": 8192,
                                          "tooltip": "Crops larger than this are scaled down before padding"}),
            },
        }

    RETURN_TYPES = (MUMU_DATASET_TYPE, "STRING")
    RETURN_NAMES = ("dataset", "summary")
    OUTPUT_NODE = True
    FUNCTION = "build"
    CATEGORY = CATEGORY + "/MUMU"
    DESCRIPTION = ("MUMU's bootstrapped dataset: Grounding DINO searches each picture for its caption's phrases; crops "
                   "(150x150 px to 75 % of the picture, at most 3, 70 % of person crops replaced by the head, 20 % "
                   "augmented, 30 % of prompts with a canny image of the whole picture) are placed before their words. "
                   "Writes input/<dataset_name>/ for Train Connector (MUMU) and Train MUMU, stage 2. Queue again after "
                   "adding pictures: only new or changed ones are searched.")

    @classmethod
    def VALIDATE_INPUTS(cls, source):
        if source not in files.list_sources():
            listed = ", ".join(files.list_sources()[:5]) or "none"
            return (f"source '{source}' is not a folder of captioned pictures or a .tsv in ComfyUI's input folder "
                    f"(found: {listed}). Put it there and refresh the page.")
        return True

    @classmethod
    def IS_CHANGED(cls, source, dataset_name, **kwargs):
        manifest = ""
        try:
            st = (files.dataset_dir(dataset_name) / files.MANIFEST).stat()
            manifest = f"{st.st_size}:{st.st_mtime_ns}"
        except (OSError, InputError):
            pass
        return f"{_source_stamp(source)}:{manifest}"

    def build(self, detector, source, dataset_name, box_threshold, text_threshold, seed, crop_max_side):
        settings = Settings(seed=seed, box_threshold=box_threshold, text_threshold=text_threshold,
                            crop_max_side=crop_max_side)
        progress = None

        def step(done, total):
            nonlocal progress
            if progress is None:
                progress = Progress(total)
            progress.step(done)

        result = engine.build_dataset(detector, source, dataset_name, settings, progress=step)
        if result.dataset is None:
            raise InputError(f"{dataset_name}: the build finished but its parts could not be merged (another build "
                             f"of this dataset is running?); queue again.")
        text = result.describe()
        return {"ui": {"text": [text]}, "result": (result.dataset, text)}


class PreviewMUMUDataset:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dataset": (MUMU_DATASET_TYPE,),
            "count": ("INT", {"default": 4, "min": 1, "max": 64, "tooltip": "Prompts to show"}),
            "start": ("INT", {"default": 0, "min": 0, "max": 10_000_000, "tooltip": "The first prompt shown "
                              "(pictures in name order)"}),
            "tile": ("INT", {"default": 192, "min": 32, "max": 1024, "tooltip": "Pixels per picture / crop"}),
        }}

    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("image", "prompts")
    FUNCTION = "preview"
    CATEGORY = CATEGORY + "/MUMU"
    DESCRIPTION = ("Shows built prompts as the stage-1 trainer will read them: each picture with its kept boxes, each "
                   "conditioning image (padded square) with its placeholder and the rule that made it, and the prompt.")

    def preview(self, dataset, count, start, tile):
        image, prompts = engine.preview(dataset, count, start, tile)
        return (image, "\n".join(prompts))


NODE_CLASS_MAPPINGS = {
    "BeyondCLIP_LoadGroundingDINO": LoadGroundingDINO,
    "BeyondCLIP_BuildMUMUDataset": BuildMUMUDataset,
    "BeyondCLIP_PreviewMUMUDataset": PreviewMUMUDataset,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "BeyondCLIP_LoadGroundingDINO": "Load Grounding DINO",
    "BeyondCLIP_BuildMUMUDataset": "Build MUMU Dataset",
    "BeyondCLIP_PreviewMUMUDataset": "Preview MUMU Dataset",
}
