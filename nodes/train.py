"""Train nodes: every bridge the pack trains, for your own LLM / VLM and your own checkpoint. Beyond CLIP's mapper
(stage 1) and RepAdapters (stage 2), the chat/draw router, GILL's mapper and decision model, MUMU's connector
(stage 1) and MUMU stage 2. Results go where the loader nodes list them at once; runs keep their caches and
checkpoints in output/beyond_clip_training/<run>/ and resume after an interrupt."""
import logging

import comfy.model_management as mm
import comfy.sd
import comfy.utils

from ..bridges import llm_text
from ..bridges.errors import InputError
from ..bridges.gill import GENERATE, RETRIEVE
from ..bridges.mapper import ACTIVATIONS, MapperConfig
from ..bridges.mumu import ConnectorConfig
from ..bridges.seed_sdxl import SeedSDXLHeadConfig
from ..bridges.training.data import LOSSES, TrainConfig
from ..bridges.training.trainer import fell_by
from ..engine import train_beyond_clip, train_gill, train_mumu, train_seed_llm
from ..engine.beyond_clip import check_mapper_fits
from ..engine.conditioning import check_fits_model
from ..engine.training import (
    ComfyDenoiser,
    build_latent_cache,
    clone_norm_inputs,
    leave_inference_mode,
    target_of,
    training_context,
)
from ..loaders import folders, repadapters, routers, run_folder
from ..loaders import gill as gill_files
from ..loaders import mumu as mumu_files
from ..loaders import mumu_dataset as dataset_files
from ..loaders import seed_llm as seed_llm_files
from ..loaders import seed_sdxl as seed_sdxl_files
from ..loaders import training_inputs as inputs
from ..loaders.errors import LoadError
from ..loaders.mappers import KIND as MAPPER_KIND
from ..loaders.mappers import load_mapper
from ..loaders.patcher import load_for_training
from .common import (
    CATEGORY,
    CONNECTOR_TYPE,
    GILL_TYPE,
    LLM_TYPE,
    MAPPER_TYPE,
    MUMU_DATASET_TYPE,
    SEED_LLM_TYPE,
    SEED_MODEL_TYPE,
    SEED_SDXL_HEAD_TYPE,
    VLM_TYPE,
    LazyProgress,
    Progress,
    ui_text,
)

CATEGORY = CATEGORY + "/training"
log = logging.getLogger(__name__)
CACHE_PRECISIONS = tuple(run_folder.CACHE_DTYPES)


def _show(unique_id, text):
    """The loss under the node's progress bar (ComfyUI 2025+); older hosts only log it."""
    log.info("training: %s", text)
    try:
        from server import PromptServer
        PromptServer.instance.send_progress_text(text, unique_id)
    except (ImportError, AttributeError):
        pass


def _file_choice(name, choices, what):
    if name not in choices:
        return folders.not_found_message(what, name, choices, "ComfyUI's input folder")
    return True


def _dataset_file(name, file_name):
    """Whether `name` is a MUMU dataset's trainer file (input/<dataset>/<file_name>): the Build MUMU Dataset node
    writes it when the graph runs, so it may not exist yet when the graph is validated."""
    parts = str(name).split("/")
    return len(parts) == 2 and parts[1] == file_name and bool(parts[0])


def _train_settings(steps, batch_size, learning_rate, loss, val_fraction, seed, eval_every):
    return TrainConfig(steps=steps, batch_size=batch_size, lr=learning_rate, loss=loss, val_fraction=val_fraction,
                       seed=seed, eval_every=eval_every)


def _run_with_progress(unique_id, steps, train):
    """Progress bar 0..steps showing the loss; the interrupt button stops at the next step (after the
    checkpoint is written)."""
    progress = Progress(steps)

    def on_step(step, loss, val):
        progress.step(step)
        _show(unique_id, f"step {step}/{steps}  loss {loss:.5f}" + (f"  held-out {val:.5f}" if val is not None else ""))

    with training_context():
        return train(on_step)


def _summary(trainer, out_name, what="captions"):
    first, last = trainer.initial_val_loss, trainer.last_val_loss()
    return (f"wrote models/bridges/{out_name}: {trainer.step} steps, held-out loss {first:.5f} -> {last:.5f} "
            f"({fell_by(trainer.history):.1f}x lower) on {len(trainer.val_idx)} held-out / "
            f"{len(trainer.train_idx)} training {what}")


def _warn_left_out(pairs, left_out):
    """Pictures of a set that are not trained on are said so: in the log now, and in the node's summary."""
    if left_out:
        log.warning("training on '%s': %s", pairs, inputs.left_out_note(left_out))


def _cache(run, texts, spec, precision="fp32"):
    caching = Progress(len(texts))
    return run_folder.build_cache(run, texts, spec.input_fn, spec.teacher, spec.identity, precision,
                                  progress=lambda done, total: caching.step(done))


class ReadsCaptions:
    """Train nodes reading a caption file (one per line) from ComfyUI's input folder: its choice is checked,
    and an edited file makes the node run again."""

    @classmethod
    def VALIDATE_INPUTS(cls, captions):
        return _file_choice(captions, inputs.input_files(cls.CAPTION_EXTENSIONS), "caption file")

    @classmethod
    def IS_CHANGED(cls, captions, **kwargs):
        return inputs.file_stamp(captions)

    CAPTION_EXTENSIONS = inputs.TEXT_EXTENSIONS


class ReadsExamples:
    """Train nodes reading a labelled label<TAB>text file from ComfyUI's input folder."""

    @classmethod
    def VALIDATE_INPUTS(cls, examples):
        return _file_choice(examples, inputs.input_files(inputs.TABLE_EXTENSIONS), "examples file")

    @classmethod
    def IS_CHANGED(cls, examples, **kwargs):
        return inputs.file_stamp(examples)


class ReadsPairs:
    """Train nodes reading an image-caption set (a folder or a .tsv) from ComfyUI's input folder."""

    @classmethod
    def VALIDATE_INPUTS(cls, pairs):
        return _file_choice(pairs, inputs.pair_sources(), "image-caption set")

    @classmethod
    def IS_CHANGED(cls, pairs, **kwargs):
        try:
            return ";".join(f"{p}:{inputs.file_stamp(p)}:{c}" for p, c in inputs.read_pairs(pairs, crops=True))
        except LoadError:
            return pairs


# What every distillation run takes, in this order (workflow files store widget values by position).
RUN_INPUTS = {
    "val_fraction": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 0.5, "step": 0.01,
                               "tooltip": "Captions held out to report the validation loss"}),
    "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1}),
    "resume": ("BOOLEAN", {"default": True, "tooltip": "Continue from the run's last checkpoint"}),
    "checkpoint_every": ("INT", {"default": 200, "min": 1, "max": 1_000_000}),
    "eval_every": ("INT", {"default": 100, "min": 1, "max": 1_000_000}),
}


class TrainMapper(ReadsCaptions):
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "llm": (LLM_TYPE, {"tooltip": "The LLM whose hidden states the mapper will read"}),
                "clip": ("CLIP", {"tooltip": "The teacher: the CLIP of the checkpoint you will sample with"}),
                "captions": (inputs.input_files(), {"tooltip": "A .txt file in ComfyUI's input folder, one "
                                                                 "caption per line"}),
                "run_name": ("STRING", {"default": "beyond_clip_mapper", "tooltip": "output/beyond_clip_training/"
                                        "<run_name>/ keeps the target cache and the checkpoint to resume from"}),
                "output_name": ("STRING", {"default": "my_mapper",
                                           "tooltip": "Written as models/bridges/<name>.safetensors"}),
                "steps": ("INT", {"default": 2000, "min": 1, "max": 10_000_000}),
                "batch_size": ("INT", {"default": 32, "min": 1, "max": 4096}),
                "learning_rate": ("FLOAT", {"default": 1e-3, "min": 1e-7, "max": 1.0, "step": 1e-5}),
                "loss": (LOSSES, {"default": "mse", "tooltip": "mse: Beyond CLIP's caption loss; gill_l2: GILL's "
                                                               "mean per-token L2 distance"}),
                "hidden_dim": ("INT", {"default": 512, "min": 8, "max": 16384}),
                "depth": ("INT", {"default": 2, "min": 1, "max": 16, "tooltip": "Linear layers in the token MLP"}),
                "activation": (sorted(ACTIVATIONS), {"default": "gelu"}),
                "hidden_layer": ("INT", {"default": -1, "min": -128, "max": 128, "tooltip": "-1 = last layer"}),
                "template": (llm_text.TEMPLATES, {"default": "none"}),
                **RUN_INPUTS,
                "cache_precision": (CACHE_PRECISIONS, {"default": "fp32", "tooltip": "Precision of the cached LLM "
                                                       "states (fp16 halves the cache for big caption files)"}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = (MAPPER_TYPE, "STRING", "FLOAT")
    RETURN_NAMES = ("mapper", "mapper_name", "val_loss")
    OUTPUT_NODE = True
    FUNCTION = "train"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Beyond CLIP stage 1: trains a mapper so LLM(caption) -> mapper matches the checkpoint's own CLIP "
                   "encoding of the caption (SD1.x: 77x768; SDXL: 77x2048 + pooled 1280). Targets are cached in the "
                   "run folder; the held-out loss is reported; interrupt and run again to resume.")


    def train(self, llm, clip, captions, run_name, output_name, steps, batch_size, learning_rate, loss, hidden_dim,
              depth, activation, hidden_layer, template, val_fraction, seed, resume, checkpoint_every, eval_every,
              cache_precision, unique_id=None):
        texts = inputs.read_captions(inputs.resolve_input_file(captions))
        run = run_folder.run_dir(run_name)
        out_path = folders.bridge_output_path(output_name, kind=MAPPER_KIND)
        settings = _train_settings(steps, batch_size, learning_rate, loss, val_fraction, seed, eval_every)
        spec = train_beyond_clip.mapper_cache_spec(llm, clip, hidden_layer, template)
        data, cache_path = _cache(run, texts, spec, cache_precision)
        config = MapperConfig(in_dim=llm.hidden_size, target=target_of(data), hidden_dim=hidden_dim, depth=depth,
                              activation=activation, num_tokens=train_beyond_clip.MAPPER_TOKENS,
                              hidden_layer=hidden_layer, encoder=spec.identity["encoder"])
        _, trainer = _run_with_progress(unique_id, steps, lambda on_step: train_beyond_clip.train_mapper(
            run, data, config, settings, out_path, device=mm.get_torch_device(), resume=resume, on_step=on_step,
            checkpoint_every=checkpoint_every, cache_path=cache_path))
        return ui_text(_summary(trainer, out_path.name), load_mapper(out_path), out_path.name, trainer.last_val_loss())


class TrainRouter(ReadsExamples):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "examples": (inputs.input_files(inputs.TABLE_EXTENSIONS), {
                "tooltip": "A tab-separated file in ComfyUI's input folder with the header 'label<TAB>text' and "
                           "labels 'chat' or 'draw'"}),
            "output_name": ("STRING", {"default": "my_router",
                                       "tooltip": "Written as models/bridges/<name>.router.json"}),
            "alpha": ("FLOAT", {"default": 1.0, "min": 0.001, "max": 100.0, "step": 0.01,
                                "tooltip": "Laplace smoothing"}),
            "bigrams": ("BOOLEAN", {"default": True}),
            "val_fraction": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 0.5, "step": 0.01}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1}),
        }}

    RETURN_TYPES = ("STRING", "FLOAT")
    RETURN_NAMES = ("router_name", "val_accuracy")
    OUTPUT_NODE = True
    FUNCTION = "train"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Trains the Beyond CLIP chat/draw router (naive Bayes) on your labelled instructions, reports the "
                   "held-out accuracy, then refits on every example and writes it where the Router node lists it.")


    def train(self, examples, output_name, alpha, bigrams, val_fraction, seed):
        texts, labels = routers.read_labelled_tsv(inputs.resolve_input_file(examples))
        try:
            router, report, accuracy = train_beyond_clip.train_router(texts, labels, alpha=alpha, bigrams=bigrams,
                                                                      val_fraction=val_fraction, seed=seed)
        except InputError as e:
            raise InputError(f"{examples}: {e}") from None
        path = folders.bridge_output_path(output_name, extension=routers.EXTENSION)
        routers.save_router(path, router)  # the file holds the fit on every example
        text = report + f"wrote models/bridges/{path.name} ({len(texts)} examples)"
        return ui_text(text, path.name, accuracy)


class TrainGILLDecision(ReadsExamples):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "llm": (LLM_TYPE, {"tooltip": "The LLM the GILL model was trained on"}),
            "gill": (GILL_TYPE,),
            "examples": (inputs.input_files(inputs.TABLE_EXTENSIONS), {
                "tooltip": f"A tab-separated file in ComfyUI's input folder, header 'label<TAB>text', labels "
                           f"'{GENERATE}' or '{RETRIEVE}'"}),
            "output_name": ("STRING", {"default": "my_gill", "tooltip": "The GILL model with the new decision model, "
                                                                       "as models/bridges/<name>.safetensors"}),
            "steps": ("INT", {"default": 300, "min": 1, "max": 100000}),
            "learning_rate": ("FLOAT", {"default": 1e-2, "min": 1e-6, "max": 1.0, "step": 1e-4}),
            "val_fraction": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 0.5, "step": 0.01}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1}),
        }}

    RETURN_TYPES = (GILL_TYPE, "STRING", "FLOAT")
    RETURN_NAMES = ("gill", "gill_name", "val_f1")
    OUTPUT_NODE = True
    FUNCTION = "train"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Trains GILL's generate-or-retrieve decision model (Dropout + Linear on the [IMG0] state, as the "
                   "reference) on your labelled prompts, reports held-out F1 for 'retrieve', and writes the GILL "
                   "model with it into models/bridges.")


    def train(self, llm, gill, examples, output_name, steps, learning_rate, val_fraction, seed):
        texts, labels = routers.read_labelled_tsv(inputs.resolve_input_file(examples), (GENERATE, RETRIEVE))
        out_path = folders.bridge_output_path(output_name, kind=gill_files.KIND)
        progress = Progress(len(texts) + 1)
        report, f1 = train_gill.train_decision(llm, gill, texts, labels, out_path, steps=steps,
                                               learning_rate=learning_rate, val_fraction=val_fraction, seed=seed,
                                               source=examples, progress=progress.step)
        progress.step()
        text = report + f"wrote models/bridges/{out_path.name} ({len(texts)} examples)"
        return ui_text(text, gill_files.load_gill(out_path, out_path.name), out_path.name, f1)


class TrainGILLMapper(ReadsCaptions):
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "llm": (LLM_TYPE, {"tooltip": "The LLM the GILL model's [IMG] embeddings belong to"}),
                "gill": (GILL_TYPE, {"tooltip": "The base GILL model: its [IMG] embeddings, retrieval heads and "
                                                "decision model are kept; only the GILLMapper is trained"}),
                "clip": ("CLIP", {"tooltip": "The teacher: the CLIP of the checkpoint you will sample with"}),
                "captions": (inputs.input_files(), {"tooltip": "A .txt file in ComfyUI's input folder, one "
                                                                 "caption per line"}),
                "run_name": ("STRING", {"default": "gill_mapper"}),
                "output_name": ("STRING", {"default": "my_gill", "tooltip": "models/bridges/<name>.safetensors"}),
                "steps": ("INT", {"default": 2000, "min": 1, "max": 10_000_000}),
                "batch_size": ("INT", {"default": 32, "min": 1, "max": 4096}),
                "learning_rate": ("FLOAT", {"default": 1e-3, "min": 1e-7, "max": 1.0, "step": 1e-5}),
                "loss": (LOSSES, {"default": "gill_l2"}),
                **RUN_INPUTS,
            },
            # optional: graphs saved before it existed keep validating
            "optional": {"train_img_tokens": ("BOOLEAN", {"default": False, "tooltip": "Also train the 8 [IMG] input "
                                                          "embeddings (GILL trains them): the LLM then runs in every "
                                                          "step instead of once per caption"})},
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = (GILL_TYPE, "STRING", "FLOAT")
    RETURN_NAMES = ("gill", "gill_name", "val_loss")
    OUTPUT_NODE = True
    FUNCTION = "train"
    CATEGORY = CATEGORY
    DESCRIPTION = ("GILL's generation loss, text only: a fresh GILLMapper learns to turn the [IMG] states of a caption "
                   "into the checkpoint's own CLIP encoding of it (SD1.x, or SDXL with the pooled head). The [IMG] "
                   "embeddings stay as the base model has them, or train with the mapper (train_img_tokens). Writes "
                   "the GILL model with the new mapper.")


    def train(self, llm, gill, clip, captions, run_name, output_name, steps, batch_size, learning_rate, loss,
              val_fraction, seed, resume, checkpoint_every, eval_every, train_img_tokens=False, unique_id=None):
        texts = inputs.read_captions(inputs.resolve_input_file(captions))
        run = run_folder.run_dir(run_name)
        out_path = folders.bridge_output_path(output_name, kind=gill_files.KIND)
        settings = _train_settings(steps, batch_size, learning_rate, loss, val_fraction, seed, eval_every)
        if train_img_tokens:
            if hasattr(llm, "cannot"):  # a stock CLIP (loaders/text_encoders.py)
                raise llm.cannot("Train GILL Mapper with train_img_tokens", "the gradient would have to run "
                                 "through ComfyUI's own text-encoder weights, which the pack leaves as ComfyUI "
                                 "keeps them; switch train_img_tokens off to train the mapper on cached [IMG] "
                                 "states")
            if llm.adapter is not None:
                raise InputError(f"{llm.describe()} has an adapter: connect the plain LLM to train the [IMG] rows")
            spec = train_gill.token_cache_spec(llm, gill, clip, texts)
        else:
            spec = train_gill.img_states_cache_spec(llm, gill, clip)
        data, cache_path = _cache(run, texts, spec)
        llm_module, device = None, mm.get_torch_device()
        if train_img_tokens:  # the gradient runs back through the frozen LLM to its input rows
            device = load_for_training(llm.patcher)
            with training_context():
                llm_module = leave_inference_mode(llm.inner)
        _, trainer = _run_with_progress(unique_id, steps, lambda on_step: train_gill.train_gill_mapper(
            run, data, gill, settings, out_path, llm_module=llm_module, device=device, resume=resume,
            on_step=on_step, checkpoint_every=checkpoint_every, cache_path=cache_path))
        return ui_text(_summary(trainer, out_path.name), gill_files.load_gill(out_path, out_path.name), out_path.name,
                       trainer.last_val_loss())


class TrainMUMUConnector(ReadsCaptions):
    CAPTION_EXTENSIONS = inputs.TABLE_EXTENSIONS

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "idefics2": (VLM_TYPE, {"tooltip": "The Idefics2 the connector will read (MUMU: idefics2-8b)"}),
                "clip": ("CLIP", {"tooltip": "The teacher: the CLIP of the SDXL checkpoint you will sample with"}),
                "captions": (inputs.input_files(inputs.TABLE_EXTENSIONS), {
                    "tooltip": "A .txt/.tsv file in ComfyUI's input folder, one caption per line. Optionally "
                               "'a <image> man on a <image> horse<TAB>man.png<TAB>horse.png': crops in the input "
                               "folder placed at the <image> placeholders (CLIP reads the words only)"}),
                "run_name": ("STRING", {"default": "mumu_connector"}),
                "output_name": ("STRING", {"default": "my_mumu_connector",
                                           "tooltip": "Written as models/bridges/<name>.safetensors"}),
                "steps": ("INT", {"default": 2000, "min": 1, "max": 10_000_000}),
                "batch_size": ("INT", {"default": 32, "min": 1, "max": 4096}),
                "learning_rate": ("FLOAT", {"default": 3e-4, "min": 1e-7, "max": 1.0, "step": 1e-5}),
                "width": ("INT", {"default": 1024, "min": 8, "max": 8192}),
                "depth": ("INT", {"default": 16, "min": 1, "max": 64, "tooltip": "Transformer layers (MUMU: 16)"}),
                "heads": ("INT", {"default": 16, "min": 1, "max": 128}),
                "hidden_layer": ("INT", {"default": -1, "min": -128, "max": 128, "tooltip": "-1 = last layer"}),
                "image_resolution": ("INT", {"default": 252, "min": 1, "max": 4096,
                                             "tooltip": "Pixels per side of each crop "
                                                        "(MUMU stage 1: 252 -> 324 tokens)"}),
                "probes": ("INT", {"default": 64, "min": 1, "max": 4096, "tooltip": "Probe queries of the "
                                   "length-invariant token loss (the first one is the mean token)"}),
                **RUN_INPUTS,
                "cache_precision": (CACHE_PRECISIONS, {"default": "fp16"}),
            },
            # optional: graphs saved before it existed keep validating
            "optional": {"dataset": (MUMU_DATASET_TYPE, {
                "tooltip": "A dataset from Build MUMU Dataset: its stage-1 caption file is used instead of "
                           "'captions'"})},
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, captions):
        if _dataset_file(captions, dataset_files.STAGE1):
            return True  # a dataset's file, written when its Build node runs (before this one: it is linked)
        return super().VALIDATE_INPUTS(captions)

    RETURN_TYPES = (CONNECTOR_TYPE, "STRING", "FLOAT")
    RETURN_NAMES = ("connector", "connector_name", "val_loss")
    OUTPUT_NODE = True
    FUNCTION = "train"
    CATEGORY = CATEGORY
    DESCRIPTION = ("MUMU stage 1 as distillation: a fresh connector learns to turn Idefics2's states of each caption "
                   "(with its crops) into what the SDXL checkpoint's own CLIP gives for the words. Idefics2 gives "
                   "one token per word piece / patch, CLIP 77: the token loss compares what cross-attention reads "
                   "from the two token sets (fixed probe queries), the pooled vector directly.")

    def train(self, idefics2, clip, captions, run_name, output_name, steps, batch_size, learning_rate, width, depth,
              heads, hidden_layer, image_resolution, probes, val_fraction, seed, resume, checkpoint_every, eval_every,
              cache_precision, unique_id=None, dataset=None):
        if dataset is not None:
            captions = dataset.stage1
        lines = inputs.read_captions(inputs.resolve_input_file(captions))
        for i, line in enumerate(lines):
            inputs.parse_mumu_caption(line, f"{captions}, caption {i + 1}: ")
        run = run_folder.run_dir(run_name)
        out_path = folders.bridge_output_path(output_name, kind=mumu_files.KIND)
        config = ConnectorConfig(in_dim=idefics2.hidden_size, width=width, depth=depth, heads=heads,
                                 hidden_layer=hidden_layer)  # checks width % heads before anything is cached
        settings = _train_settings(steps, batch_size, learning_rate, "mse", val_fraction, seed, eval_every)
        spec = train_mumu.connector_cache_spec(idefics2, clip, lines, hidden_layer, image_resolution)
        data, cache_path = _cache(run, lines, spec, cache_precision)
        _, trainer = _run_with_progress(unique_id, steps, lambda on_step: train_mumu.train_connector(
            run, data, config, settings, out_path, probes=probes, device=mm.get_torch_device(), resume=resume,
            on_step=on_step, checkpoint_every=checkpoint_every, cache_path=cache_path))
        return ui_text(_summary(trainer, out_path.name), mumu_files.load_connector(out_path), out_path.name,
                       trainer.last_val_loss())


class TrainRepAdapter(ReadsPairs):
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "llm": (LLM_TYPE, {"tooltip": "The plain LLM (no adapter applied) the mapper was trained on"}),
                "mapper": (MAPPER_TYPE, {"tooltip": "A stage-1 mapper for this LLM and checkpoint; it stays frozen"}),
                "clip": ("CLIP", {"tooltip": "The teacher of the caption loss: the CLIP of the checkpoint"}),
                "model": ("MODEL", {"tooltip": "The SD1.x or SDXL MODEL whose denoising loss trains the adapter; "
                                               "frozen"}),
                "vae": ("VAE", {"tooltip": "The checkpoint's VAE: the images become latents once, cached"}),
                "pairs": (inputs.pair_sources(), {"tooltip": "In ComfyUI's input folder: a folder of images with "
                                                               "same-name .txt captions, "
                                                               "or a .tsv 'image<TAB>caption'"}),
                "run_name": ("STRING", {"default": "beyond_clip_repadapter", "tooltip": "output/beyond_clip_training/"
                                        "<run_name>/ keeps the caches and the checkpoint to resume from"}),
                "output_name": ("STRING", {"default": "my_repadapter",
                                           "tooltip": "Written as models/bridges/<name>.safetensors"}),
                "steps": ("INT", {"default": 1000, "min": 1, "max": 10_000_000}),
                "batch_size": ("INT", {"default": 4, "min": 1, "max": 4096}),
                "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-7, "max": 1.0, "step": 1e-5}),
                "lambda_diffusion": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 1000.0, "step": 0.01,
                                               "tooltip": "loss = L_cap + lambda * L_diffusion (Beyond CLIP: 0.1); "
                                                          "0 = caption loss only (the images are not read)"}),
                "hidden_dim": ("INT", {"default": 8, "min": 1, "max": 4096}),
                "groups": ("INT", {"default": 2, "min": 1, "max": 64}),
                "scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01}),
                "resolution": ("INT", {"default": 512, "min": 8, "max": 4096, "step": 8,
                                       "tooltip": "Each image's centre square is resized to this many pixels a side"}),
                "template": (llm_text.TEMPLATES, {"default": "none"}),
                **RUN_INPUTS,
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = (LLM_TYPE, "STRING", "FLOAT")
    RETURN_NAMES = ("llm", "repadapter_name", "val_loss")
    OUTPUT_NODE = True
    FUNCTION = "train"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Beyond CLIP stage 2: RepAdapters on every linear layer of the LLM learn, with the mapper frozen, "
                   "loss = MSE(mapper(LLM+adapters(caption)), CLIP(caption)) + lambda * the frozen UNet's denoising "
                   "loss of the caption's image under that conditioning (SD1.x, or SDXL with the pooled vector "
                   "and size "
                   "embeddings). Writes the adapter where Load "
                   "RepAdapter lists it and outputs the LLM with it applied (unmerged).")

    def train(self, llm, mapper, clip, model, vae, pairs, run_name, output_name, steps, batch_size, learning_rate,
              lambda_diffusion, hidden_dim, groups, scale, resolution, template, val_fraction, seed, resume,
              checkpoint_every, eval_every, unique_id=None):
        if hasattr(llm, "cannot"):  # a stock CLIP (loaders/text_encoders.py)
            raise llm.cannot("Train RepAdapter", "RepAdapters are trained inside the transformers layers of an LLM "
                                                 "loaded by the pack")
        if llm.adapter is not None:
            raise InputError(f"{llm.describe()} already has an adapter: connect the plain LLM (from Load LLM)")
        check_mapper_fits(llm, mapper, model, template)
        if hidden_dim % groups:
            raise InputError(f"groups={groups} must divide hidden_dim={hidden_dim}")
        found, left_out = inputs.read_pair_set(pairs)
        _warn_left_out(pairs, left_out)
        texts, images = [c for _, c in found], [p for p, _ in found]
        run = run_folder.run_dir(run_name)
        out_path = folders.bridge_output_path(output_name, kind=repadapters.KIND)
        settings = _train_settings(steps, batch_size, learning_rate, "mse", val_fraction, seed, eval_every)
        spec = train_beyond_clip.token_cache_spec(llm, clip, mapper.config.num_tokens, template)
        data, cache_path = _cache(run, texts, spec)
        latents = None
        if lambda_diffusion:
            latents = build_latent_cache(run, images, vae, model, resolution, progress=LazyProgress())
        # the LLM and the UNet on the device together: the UNet is frozen but the gradient runs through it
        device = load_for_training(llm.patcher, model, mapper.patcher)
        with training_context():
            llm_module = leave_inference_mode(llm.inner)
            leave_inference_mode(model.model)
            frozen_mapper = leave_inference_mode(mapper.inner)
        with clone_norm_inputs(model.model.diffusion_model):
            _, trainer = _run_with_progress(unique_id, steps, lambda on_step: train_beyond_clip.train_repadapter(
                run, data, latents, llm_module, frozen_mapper, ComfyDenoiser(model), settings, out_path,
                hidden_dim=hidden_dim, groups=groups, scale=scale, hidden_layer=mapper.config.hidden_layer,
                lambda_diffusion=lambda_diffusion, device=device, mapper_identity=mapper.identity, resume=resume,
                on_step=on_step, checkpoint_every=checkpoint_every, cache_path=cache_path))
        parts = trainer.task.last_parts
        text = _summary(trainer, out_path.name) + (f"; last step: caption {parts['caption']:.5f}, diffusion "
                                                   f"{parts['diffusion']:.5f}" if parts else "")
        text += f"\n{inputs.left_out_note(left_out)}" if left_out else ""
        adapted = repadapters.apply_repadapter(llm, repadapters.load_repadapter(out_path), "unmerged")
        return ui_text(text, adapted, out_path.name, trainer.last_val_loss())


class TrainMUMU(ReadsPairs):
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "idefics2": (VLM_TYPE, {"tooltip": "The plain Idefics2 (no LoRA applied) the connector reads"}),
                "connector": (CONNECTOR_TYPE, {"tooltip": "The stage-1 connector (Train Connector or Load Connector); "
                                                          "trained on from here"}),
                "model": ("MODEL", {"tooltip": "The SDXL MODEL whose denoising loss trains everything; its weights "
                                               "stay frozen, a LoRA learns beside them"}),
                "vae": ("VAE", {"tooltip": "The checkpoint's VAE: the pictures become latents once, cached"}),
                "pairs": (inputs.pair_sources(), {
                    "tooltip": "In ComfyUI's input folder: a .tsv 'picture<TAB>caption<TAB>crop.png...' whose "
                               "caption has an <image> (or <name> with name=crop.png) before each word a crop shows "
                               "(crops you cut, or Build MUMU Dataset's stage2_pairs.tsv), or a folder of pictures "
                               "with same-name .txt captions"}),
                "run_name": ("STRING", {"default": "mumu_stage2"}),
                "output_name": ("STRING", {"default": "my_mumu", "tooltip": "Writes models/bridges/<name>.safetensors "
                                           "(connector), models/LLM/<name>-idefics2-lora/ (peft) and "
                                           "models/loras/<name>-unet-lora.safetensors (kohya keys)"}),
                "steps": ("INT", {"default": 2000, "min": 1, "max": 10_000_000}),
                "batch_size": ("INT", {"default": 4, "min": 1, "max": 4096}),
                "connector_lr": ("FLOAT", {"default": 1e-5, "min": 0.0, "max": 1.0, "step": 1e-6,
                                           "tooltip": "MUMU: 1e-5 (0 = keep the connector as it is)"}),
                "idefics2_lora_lr": ("FLOAT", {"default": 3e-6, "min": 0.0, "max": 1.0, "step": 1e-6,
                                               "tooltip": "MUMU: 3e-6 (0 = no Idefics2 LoRA training)"}),
                "unet_lora_lr": ("FLOAT", {"default": 5e-6, "min": 0.0, "max": 1.0, "step": 1e-6,
                                           "tooltip": "MUMU: 5e-6 (0 = no UNet LoRA training)"}),
                "rank": ("INT", {"default": 8, "min": 1, "max": 512, "tooltip": "LoRA rank (MUMU: 8)"}),
                "resolution": ("INT", {"default": 1024, "min": 8, "max": 4096, "step": 8,
                                       "tooltip": "Each picture's centre square is resized "
                                                  "to this many pixels a side"}),
                "image_resolution": ("INT", {"default": 504, "min": 1, "max": 4096,
                                             "tooltip": "Pixels per side of each crop "
                                                        "(MUMU stage 2: 504 -> 1296 tokens)"}),
                **RUN_INPUTS,
            },
            "optional": {"dataset": (MUMU_DATASET_TYPE, {"tooltip": "A dataset from Build MUMU Dataset: its "
                                                                    "stage-2 .tsv is used instead of 'pairs'"})},
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, pairs):
        if _dataset_file(pairs, dataset_files.STAGE2):
            return True  # a dataset's file, written when its Build node runs (before this one: it is linked)
        return super().VALIDATE_INPUTS(pairs)

    RETURN_TYPES = (VLM_TYPE, CONNECTOR_TYPE, "MODEL", "STRING", "STRING", "FLOAT")
    RETURN_NAMES = ("idefics2", "connector", "model", "connector_name", "unet_lora_name", "val_loss")
    OUTPUT_NODE = True
    FUNCTION = "train"
    CATEGORY = CATEGORY
    DESCRIPTION = ("MUMU stage 2: the connector from stage 1 trains on, with rank-8 LoRAs on Idefics2's text attention "
                   "and on the SDXL UNet's attention, by the frozen UNet's denoising loss on your captioned pictures "
                   "(crops placed before their words). Outputs Idefics2 with its LoRA, the connector and "
                   "the MODEL with "
                   "its LoRA, ready for Encode (MUMU) and KSampler; the files are listed by the loaders at once.")

    def train(self, idefics2, connector, model, vae, pairs, run_name, output_name, steps, batch_size, connector_lr,
              idefics2_lora_lr, unet_lora_lr, rank, resolution, image_resolution, val_fraction, seed, resume,
              checkpoint_every, eval_every, unique_id=None, dataset=None):
        if dataset is not None:
            pairs = dataset.stage2
        if idefics2.lora is not None:
            raise InputError(f"{idefics2.describe()} already has a LoRA: connect the plain Idefics2 (Load Idefics2)")
        mumu_files.check_connector_fits(idefics2, connector)
        check_fits_model(model, connector.config.out_dim, connector.config.pooled_dim, connector.describe())
        found, left_out = inputs.read_pair_set(pairs, crops=True)
        _warn_left_out(pairs, left_out)
        captions, images = [c for _, c in found], [p for p, _ in found]
        run = run_folder.run_dir(run_name)
        out_paths = mumu_files.stage2_output_paths(output_name)
        settings = _train_settings(steps, batch_size, 1.0, "mse", val_fraction, seed, eval_every)
        examples = train_mumu.stage2_examples(idefics2, captions, image_resolution)
        latents = build_latent_cache(run, images, vae, model, resolution, progress=LazyProgress())
        device = load_for_training(idefics2.patcher, model, connector.patcher)
        with training_context():
            vlm_module = leave_inference_mode(idefics2.inner)
            leave_inference_mode(model.model)
            stage1 = leave_inference_mode(connector.inner)
        lrs = {"connector": connector_lr, "idefics2_lora": idefics2_lora_lr, "unet_lora": unet_lora_lr}
        with clone_norm_inputs(model.model.diffusion_model):
            _, _, _, trainer = _run_with_progress(unique_id, steps, lambda on_step: train_mumu.train_mumu(
                run, examples, latents, vlm_module, stage1, model, ComfyDenoiser(model), settings, out_paths,
                rank=rank, lrs=lrs, hidden_layer=connector.config.hidden_layer, device=device, resume=resume,
                on_step=on_step, checkpoint_every=checkpoint_every))
        text = _summary(trainer, out_paths["connector"].name, "pictures")
        text += f"\n{inputs.left_out_note(left_out)}" if left_out else ""
        lora = mumu_files.load_idefics2_lora(out_paths["idefics2_lora"], idefics2)
        adapted = mumu_files.apply_idefics2_lora(idefics2, lora, 1.0, "unmerged")
        hosted = mumu_files.load_connector(out_paths["connector"])
        # the UNet LoRA applied as the stock LoraLoaderModelOnly applies it
        unet_lora = comfy.utils.load_torch_file(str(out_paths["unet_lora"]), safe_load=True)
        patched, _ = comfy.sd.load_lora_for_models(model, None, unet_lora, 1.0, 0)
        return ui_text(text, adapted, hosted, patched, out_paths["connector"].name, out_paths["unet_lora"].name,
                       trainer.last_val_loss())


PAIRS_TOOLTIP = ("In ComfyUI's input folder: a folder of pictures with same-name .txt captions, or a .tsv "
                 "'image<TAB>caption'")
QUESTION_FILES_TOOLTIP = ("Optional: a .tsv in ComfyUI's input folder, 'image<TAB>question<TAB>answer' per line "
                          "(paths relative to it), trained with the paper's 'Question: {} Short answer.' prompt")


def _question_choices():
    return [inputs.NO_QUESTIONS] + inputs.input_files(inputs.QUESTIONS_EXTENSIONS)


class TrainSeedLLM(ReadsPairs):
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "llm": (LLM_TYPE, {"tooltip": "The plain LLM (Load LLM) that learns to read and write SEED codes; "
                                              "frozen, a LoRA and the new token rows learn"}),
                "seed_model": (SEED_MODEL_TYPE, {"tooltip": "The SEED tokenizer: each picture's 32 codes, computed "
                                                            "once and kept in the run folder"}),
                "pairs": (inputs.pair_sources(), {"tooltip": PAIRS_TOOLTIP}),
                "run_name": ("STRING", {"default": "seed_llm", "tooltip": "output/beyond_clip_training/<run_name>/ "
                                        "keeps the codes and the checkpoints (stage1/ and the run folder)"}),
                "output_name": ("STRING", {"default": "my_seed_llm", "tooltip": "Writes models/bridges/<name>"
                                           ".safetensors (new token rows) and models/LLM/<name>-seed-llm-lora/ "
                                           "(peft LoRA)"}),
                "stage1_steps": ("INT", {"default": 1000, "min": 0, "max": 10_000_000,
                                         "tooltip": "Stage 1, image to text ('A photo of' + caption); 0 skips it"}),
                "stage2_steps": ("INT", {"default": 2000, "min": 0, "max": 10_000_000,
                                         "tooltip": "Stage 2, both directions ('Generate an image: ' + caption -> 32 "
                                                    "codes, and image to text)"}),
                "batch_size": ("INT", {"default": 8, "min": 1, "max": 4096, "tooltip": "Pictures per step, each with "
                                       "its caption, its drawing and its questions"}),
                "learning_rate": ("FLOAT", {"default": 2e-4, "min": 1e-7, "max": 1.0, "step": 1e-5}),
                "rank": ("INT", {"default": 8, "min": 1, "max": 512, "tooltip": "LoRA rank on every linear layer"}),
                "lora_alpha": ("FLOAT", {"default": 16.0, "min": 0.01, "max": 4096.0, "step": 0.01}),
                **RUN_INPUTS,
            },
            "optional": {"questions": (_question_choices(), {"default": inputs.NO_QUESTIONS,
                                                             "tooltip": QUESTION_FILES_TOOLTIP})},
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = (SEED_LLM_TYPE, "STRING", "FLOAT")
    RETURN_NAMES = ("seed_llm", "seed_llm_name", "val_loss")
    OUTPUT_NODE = True
    FUNCTION = "train"
    CATEGORY = CATEGORY
    DESCRIPTION = ("SEED-LLM, the SEED paper's SEED-OPT recipe on your LLM: 8192 code tokens <img_00000>.."
                   "<img_08191> and <img> </img> join its vocabulary (input rows = the SEED codebook through a learnt "
                   "layer, output rows learnt), a LoRA learns on every linear layer, the LLM stays frozen. Stage 1 "
                   "image to text, stage 2 both directions. Outputs the SEED-LLM for Draw and Describe; the held-out "
                   "loss is reported beside the untrained model's and the code-frequency prior.")

    @classmethod
    def VALIDATE_INPUTS(cls, pairs, questions=inputs.NO_QUESTIONS):
        found = _file_choice(pairs, inputs.pair_sources(), "image-caption set")
        if found is not True or questions == inputs.NO_QUESTIONS:
            return found
        return _file_choice(questions, _question_choices(), "questions file")

    @classmethod
    def IS_CHANGED(cls, pairs, questions=inputs.NO_QUESTIONS, **kwargs):
        return f"{ReadsPairs.IS_CHANGED(pairs)}|{inputs.file_stamp(questions)}"

    def train(self, llm, seed_model, pairs, run_name, output_name, stage1_steps, stage2_steps, batch_size,
              learning_rate, rank, lora_alpha, val_fraction, seed, resume, checkpoint_every, eval_every,
              questions=inputs.NO_QUESTIONS, unique_id=None):
        if llm.adapter is not None:
            raise InputError(f"{llm.describe()} already has an adapter: connect the plain LLM (from Load LLM)")
        if llm.quantized:
            raise InputError(f"{llm.describe()} is loaded {llm.quantized}; training runs through the LLM's own "
                             f"weights: load it in fp16, bf16 or fp32 to train (the trained SEED-LLM then loads on "
                             f"the quantized LLM too)")
        found = inputs.read_pairs(pairs)
        asked = inputs.read_questions(questions) if questions != inputs.NO_QUESTIONS else []
        pictures = train_seed_llm.pictures_of(found, asked)
        run = run_folder.run_dir(run_name)
        out_paths = seed_llm_files.output_paths(output_name)
        settings = train_seed_llm.SeedLLMSettings(stage1_steps, stage2_steps, batch_size, learning_rate, rank,
                                                  lora_alpha, val_fraction, seed, eval_every)
        codes = train_seed_llm.picture_codes(run, seed_model, [p.path for p in pictures], progress=LazyProgress())
        llm_id, seed_id = seed_llm_files.llm_identity(llm), seed_llm_files.seed_identity(seed_model)
        data_id = run_folder.captions_identity([f"{p.path.name}\t{p.caption}\t{p.questions}" for p in pictures])
        device = load_for_training(llm.patcher)
        with training_context():
            llm_module = leave_inference_mode(llm.inner)
        codebook = seed_model.inner.quantize.embedding.weight.detach().float().cpu()
        progress = Progress(max(1, stage1_steps + stage2_steps))

        def on_step(done, total, loss, val):
            progress.step(done)
            _show(unique_id, f"step {done}/{total}  loss {loss:.5f}" + (f"  held-out {val:.5f}" if val is not None
                                                                        else ""))

        def write(student):
            seed_llm_files.save_seed_llm(out_paths, student.vocab, student.lora, llm_id, seed_id,
                                         {"run": run.name, "pictures": len(pictures), "settings": vars(settings)})
            return out_paths["vocab"]

        with training_context():
            _, trainer, report = train_seed_llm.train_seed_llm(
                run, llm_module, llm.tokenizer, pictures, codes, codebook, settings, write=write, device=device,
                on_step=on_step, resume=resume, checkpoint_every=checkpoint_every,
                start_info={"llm": llm_id["fingerprint"], "seed": seed_id["fingerprint"], "data": data_id})
        train_seed_llm.write_report(run, report)
        before, after = report["untrained_val"], report["final_val"]
        text = (f"wrote models/bridges/{out_paths['vocab'].name} and models/LLM/{out_paths['lora'].name}/: "
                f"{stage1_steps} + {stage2_steps} steps on {len(trainer.train_idx)} pictures; held-out loss by kind "
                f"(untrained -> trained): " + ", ".join(f"{k} {before[k]:.3f} -> {after[k]:.3f}" for k in after) +
                (f"; code prior: frequencies {report['code_frequency_prior']:.3f}, uniform "
                 f"{report['uniform_code_loss']:.3f}" if "draw" in after else "") +
                f" ({len(trainer.val_idx)} held-out pictures)")
        mode = "unmerged" if llm.quantized else "merged"
        trained = seed_llm_files.load_seed_llm(out_paths["vocab"], llm, seed_model, mode)
        return ui_text(text, trained, out_paths["vocab"].name, trainer.last_val_loss())


class TrainSeedSDXLHead(ReadsPairs):
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "seed_model": (SEED_MODEL_TYPE, {"tooltip": "The SEED tokenizer whose codes the head will read"}),
                "clip": ("CLIP", {"tooltip": "The teacher: the CLIP of the SDXL checkpoint you will sample with"}),
                "pairs": (inputs.pair_sources(), {"tooltip": PAIRS_TOOLTIP}),
                "run_name": ("STRING", {"default": "seed_sdxl_head"}),
                "output_name": ("STRING", {"default": "my_seed_sdxl_head",
                                           "tooltip": "Written as models/bridges/<name>.safetensors"}),
                "steps": ("INT", {"default": 2000, "min": 1, "max": 10_000_000}),
                "batch_size": ("INT", {"default": 32, "min": 1, "max": 4096}),
                "learning_rate": ("FLOAT", {"default": 1e-3, "min": 1e-7, "max": 1.0, "step": 1e-5}),
                "hidden_dim": ("INT", {"default": 1024, "min": 8, "max": 16384}),
                "depth": ("INT", {"default": 2, "min": 1, "max": 16, "tooltip": "Linear layers in the token MLP"}),
                "activation": (sorted(ACTIVATIONS), {"default": "gelu"}),
                **RUN_INPUTS,
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = (SEED_SDXL_HEAD_TYPE, "STRING", "FLOAT")
    RETURN_NAMES = ("sdxl_head", "head_name", "val_loss")
    OUTPUT_NODE = True
    FUNCTION = "train"
    CATEGORY = CATEGORY
    DESCRIPTION = ("A de-tokenizer head so SEED codes drive an SDXL checkpoint: SEED's own de-tokenizer output for "
                   "each picture's codes -> a token MLP (2048 wide) and a pooled MLP (1280), distilled onto the "
                   "checkpoint's own CLIP encoding of the picture's caption, as the Beyond CLIP mapper is. Inputs and "
                   "targets are cached in the run folder.")

    def train(self, seed_model, clip, pairs, run_name, output_name, steps, batch_size, learning_rate, hidden_dim,
              depth, activation, val_fraction, seed, resume, checkpoint_every, eval_every, unique_id=None):
        train_seed_llm.check_sdxl_teacher(clip)
        found = inputs.read_pairs(pairs)
        run = run_folder.run_dir(run_name)
        out_path = folders.bridge_output_path(output_name, kind=seed_sdxl_files.KIND)
        settings = _train_settings(steps, batch_size, learning_rate, "mse", val_fraction, seed, eval_every)
        head_config = SeedSDXLHeadConfig(in_dim=seed_model.config.out_dim, hidden_dim=hidden_dim, depth=depth,
                                         activation=activation)
        spec = train_seed_llm.head_cache_spec(seed_model, clip, found)
        data, cache_path = _cache(run, train_seed_llm.pair_keys(found), spec)
        seed_id = seed_llm_files.seed_identity(seed_model)
        _, trainer = _run_with_progress(unique_id, steps, lambda on_step: train_seed_llm.train_sdxl_head(
            run, data, head_config, settings, out_path, seed_id, device=mm.get_torch_device(), resume=resume,
            on_step=on_step, checkpoint_every=checkpoint_every, cache_path=cache_path))
        return ui_text(_summary(trainer, out_path.name, "pictures"), seed_sdxl_files.load_head(out_path),
                       out_path.name, trainer.last_val_loss())


NODE_CLASS_MAPPINGS = {
    "BeyondCLIP_TrainMapper": TrainMapper,
    "BeyondCLIP_TrainRouter": TrainRouter,
    "BeyondCLIP_TrainGILLDecision": TrainGILLDecision,
    "BeyondCLIP_TrainGILLMapper": TrainGILLMapper,
    "BeyondCLIP_TrainMUMUConnector": TrainMUMUConnector,
    "BeyondCLIP_TrainRepAdapter": TrainRepAdapter,
    "BeyondCLIP_TrainMUMU": TrainMUMU,
    "BeyondCLIP_TrainSEEDLLM": TrainSeedLLM,
    "BeyondCLIP_TrainSEEDSDXLHead": TrainSeedSDXLHead,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "BeyondCLIP_TrainMapper": "Train Mapper (Beyond CLIP)",
    "BeyondCLIP_TrainRouter": "Train Router (Beyond CLIP)",
    "BeyondCLIP_TrainGILLDecision": "Train Decision Model (GILL)",
    "BeyondCLIP_TrainGILLMapper": "Train Mapper (GILL)",
    "BeyondCLIP_TrainMUMUConnector": "Train Connector (MUMU)",
    "BeyondCLIP_TrainRepAdapter": "Train RepAdapter, stage 2 (Beyond CLIP)",
    "BeyondCLIP_TrainMUMU": "Train MUMU, stage 2 (LoRA on Idefics2 and UNet)",
    "BeyondCLIP_TrainSEEDLLM": "Train SEED-LLM (SEED)",
    "BeyondCLIP_TrainSEEDSDXLHead": "Train SEED SDXL Head (SEED)",
}
