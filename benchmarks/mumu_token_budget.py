"""How MUMU's image tokens slow every UNet step, and what image_resolution and token_budget buy back.

Every SDXL sampling step attends from every latent position to every conditioning token, so a prompt with three
images at 1296 tokens each (MUMU's stage-2 resolution) makes each step pay for ~3900 keys instead of CLIP's 77.
For conditioning lengths that the pack's own code produces (bridges/mumu.py: Sequence + fit_token_budget) this
prints, per UNet step (one forward of the positive; the empty negative is short):
- the FLOPs of the full-size SDXL base UNet at --size (counted with torch's FlopCounterMode on the meta device:
  exact, needs no memory and no GPU), and
- the measured time of one forward: the full-size UNet (fp16, random weights) when a CUDA GPU is present, else
  the small SDXL-like UNet of the tests at 64 px on the CPU (a much smaller latent, so tokens weigh more there).
ComfyUI's own UNet code is used, with PyTorch's SDPA attention.

    python benchmarks/mumu_token_budget.py [--size 1024] [--repeats N]

ComfyUI comes from $COMFYUI_PATH (or the copy the tests use). Prints a table; nothing is asserted.
"""
import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

PACK_DIR = Path(__file__).resolve().parent.parent

# The SDXL base UNet as ComfyUI's model detection reads it from sd_xl_base_1.0.safetensors.
SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def boot_comfy(cpu: bool):
    """Import ComfyUI's model code (no server, no custom nodes)."""
    root = _load("beyond_clip_bench_host", PACK_DIR / "headless" / "host.py").find_comfyui()
    sys.path.insert(0, str(root))
    import comfy.options
    if hasattr(comfy.options, "enable_args_parsing"):
        comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    comfy.cli_args.args.cpu = cpu
    comfy.cli_args.args.use_pytorch_cross_attention = True  # SDPA everywhere: what most GPU installs run
    import comfy.model_management as mm
    return root, mm


def build_unet(full: bool, dtype, device):
    import comfy.supported_models
    if not full:
        tiny = _load("beyond_clip_bench_tiny", PACK_DIR / "headless" / "tiny_models.py")
        return tiny.build_model("sdxl").model.diffusion_model.to(device)

    class Config(comfy.supported_models.SDXL):
        unet_config = dict(SDXL_UNET, dtype=dtype)
    if device.type == "meta":
        with torch.device("meta"):
            return Config(dict(Config.unet_config)).get_model({}, device="meta").diffusion_model
    unet = Config(dict(Config.unet_config)).get_model({}).diffusion_model.to(device)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():  # allocated with torch.empty: N(0, 1/fan_in), norms 1, biases 0
            if p.ndim >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5)
            else:
                p.fill_(0.0 if name.endswith("bias") else 1.0)
    return unet


def _inputs(tokens, latent, device, dtype):
    return (torch.randn(1, 4, latent, latent, device=device, dtype=dtype),
            dict(timesteps=torch.tensor([500.0], device=device),
                 context=torch.randn(1, tokens, 2048, device=device, dtype=dtype),
                 y=torch.randn(1, 2816, device=device, dtype=dtype)))


def count_tflops(unet, tokens, latent):
    from torch.utils.flop_counter import FlopCounterMode
    x, kwargs = _inputs(tokens, latent, torch.device("meta"), torch.float16)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        unet(x, **kwargs)
    return counter.get_total_flops() / 1e12


def token_counts(mumu, text_tokens=20, images=3):
    """(label, tokens) rows built with the pack's own sequence and budget code."""
    rows = [("CLIP text prompt (SDXL baseline)", 77)]
    for grid, label in ((8, "112 px"), (18, "252 px, MUMU stage 1"), (36, "504 px, MUMU stage 2")):
        n = grid * grid
        seq = mumu.Sequence(input_ids=torch.zeros(1, text_tokens + images * n, dtype=torch.long),
                            spans=[mumu.Span(start=text_tokens // 2 + i * n, image=i, grid=grid)
                                   for i in range(images)],
                            text_tokens=text_tokens)
        rows.append((f"{images} images x {n} ({label})", seq.input_ids.shape[1]))
        if grid == 36:
            for budget in (2048, 1024, 512):
                pooled, g = mumu.fit_token_budget(torch.zeros(1, seq.input_ids.shape[1], 1), seq, budget)
                rows.append((f"  + token_budget {budget} (grid {grid}->{g})", pooled.shape[1]))
    return rows


def time_forward(unet, tokens, latent, device, dtype, repeats):
    """Median milliseconds of `repeats` forwards (the median shrugs off other processes' bursts on a CPU)."""
    x, kwargs = _inputs(tokens, latent, device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode():
        for _ in range(3):
            unet(x, **kwargs)
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            unet(x, **kwargs)
            sync()
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="image size in pixels for the full-size UNet")
    parser.add_argument("--repeats", type=int, default=None, help="timed forwards per row")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    root, mm = boot_comfy(cpu=not gpu)
    mumu = _load("beyond_clip_bench_mumu", PACK_DIR / "bridges" / "mumu.py")
    counted = build_unet(True, torch.float16, torch.device("meta"))
    device = mm.get_torch_device()
    dtype, timed_size = (torch.float16, args.size) if gpu else (torch.float32, 64)
    timed = build_unet(gpu, dtype, device)
    repeats = args.repeats or (20 if gpu else 15)
    if not gpu:
        torch.set_num_threads(1)  # a small model on shared cores: one thread times steadier
    where = (f"full-size SDXL UNet, fp16, {timed_size}x{timed_size}, on {torch.cuda.get_device_name()}" if gpu else
             f"small SDXL-like UNet of the tests, fp32, {timed_size}x{timed_size}, on the CPU "
             f"({torch.get_num_threads()} threads)")
    print(f"FLOPs: SDXL base UNet ({sum(p.numel() for p in counted.parameters()) / 1e9:.2f} B parameters) at "
          f"{args.size}x{args.size}, one forward. Time: {where}. ComfyUI: {root}")
    print(f"{'conditioning':42s} {'tokens':>6s} {'TFLOP/step':>10s} {'x CLIP':>7s} {'ms/step':>9s} {'x CLIP':>7s}")
    base_flops = base_ms = None
    for label, tokens in token_counts(mumu):
        flops = count_tflops(counted, tokens, args.size // 8)
        ms = time_forward(timed, tokens, timed_size // 8, device, dtype, repeats)
        base_flops, base_ms = base_flops or flops, base_ms or ms
        print(f"{label:42s} {tokens:6d} {flops:10.2f} {flops / base_flops:7.2f} {ms:9.1f} {ms / base_ms:7.2f}")


if __name__ == "__main__":
    main()
