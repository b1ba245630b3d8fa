"""SEED: pictures -> 32 discrete codes each; codes -> SD1.x conditioning through SEED's de-tokenizer."""
import torch

from ..bridges import seed as seed_bridge
from .cache import reuse_encoding
from .conditioning import conditioning

BATCH = 8  # pictures per vision-tower pass


def tokenize(seed, images, progress=None) -> seed_bridge.SeedCodes:
    """IMAGE batch -> SeedCodes (N, 32). progress() after each batch of BATCH pictures."""
    model = seed.module()
    pixels = seed_bridge.preprocess(images, seed.config.image_size)
    codes = []
    with torch.no_grad():
        for start in range(0, pixels.shape[0], BATCH):
            codes.append(model.encode(pixels[start:start + BATCH]).cpu())
            progress and progress()
    return seed_bridge.SeedCodes(torch.cat(codes), seed.config.codebook_size)


def tokenize_cached(seed, images, *, disk_cache=False, progress=None) -> seed_bridge.SeedCodes:
    codes = reuse_encoding("seed_codes", [seed.identity], [images], lambda: {"codes": tokenize(seed, images,
                                                                                             progress).codes},
                           disk=disk_cache, about={"seed": seed.describe()})["codes"]
    return seed_bridge.SeedCodes(codes, seed.config.codebook_size)


def detokenize(seed, codes: torch.Tensor) -> torch.Tensor:
    """(N, 32) codes -> (N, 77, 768) generation embeddings."""
    seed_bridge.check_codes(codes, seed.config)
    net = seed.module()
    with torch.no_grad():
        return net.decode(codes)


def detokenize_conditioning(seed, codes: torch.Tensor, *, disk_cache=False):
    return reuse_encoding("seed_conditioning", [seed.identity], [codes],
                          lambda: {"positive": conditioning(detokenize(seed, codes))},
                          disk=disk_cache, about={"seed": seed.describe()})["positive"]


def detokenize_sdxl(seed, head, codes: torch.Tensor, *, disk_cache=False):
    """(N, 32) codes -> SDXL CONDITIONING: SEED's de-tokenizer, then the trained head (tokens 2048 wide + pooled)."""
    seed_bridge.check_codes(codes, seed.config)

    def compute():
        embeddings = detokenize(seed, codes)
        net = head.module()
        with torch.no_grad():
            tokens, pooled = net(embeddings.to(next(net.parameters()).device))
        return {"positive": conditioning(tokens, pooled)}

    return reuse_encoding("seed_sdxl_conditioning", [seed.identity, head.identity], [codes], compute,
                          disk=disk_cache, about={"seed": seed.describe(), "head": head.describe()})["positive"]
