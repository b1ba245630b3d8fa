"""The conditioning contract: which model family reads which tokens. Pure data, no ComfyUI import.

CONDITIONING for the stock KSampler is [[tokens (1, N, width) float32, {extras}]]. SD1.x reads 768-wide tokens,
SD2.x 1024, SDXL 2048-wide tokens *and* a (1, 1280) `pooled_output`, plus optional size keys (they default to the
latent's size). Every place that needs to know "768 is SD1.x" asks this module.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    key: str  # what bridge configs store ("sd1", "sdxl")
    label: str  # what a person calls it
    width: int  # cross-attention width of the tokens
    pooled: int  # width of the pooled vector it needs (0: none)


SD1 = Family("sd1", "SD1.x", 768, 0)
SD2 = Family("sd2", "SD2.x", 1024, 0)
SDXL = Family("sdxl", "SDXL", 2048, 1280)
FAMILIES = {f.key: f for f in (SD1, SD2, SDXL)}
# Bridges are trained for these (SD2.x is recognised, so messages can name it).
TRAINABLE = ("sd1", "sdxl")
# SDXL's size conditioning, in the order the stock CLIPTextEncodeSDXL node names them.
SIZE_KEYS = ("width", "height", "crop_w", "crop_h", "target_width", "target_height")


def family_of(width: int, pooled: int = 0):
    """The family whose tokens are `width` wide (and, for SDXL, whose pooled vector is `pooled` wide), or None."""
    for family in FAMILIES.values():
        if family.width == width and (not family.pooled or family.pooled == pooled):
            return family
    return None


def family_by_key(key: str) -> Family:
    if key not in FAMILIES:
        raise ValueError(f"unknown model family {key!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[key]


def label_of_width(width: int) -> str:
    """'SD1.x' for 768, ...; 'an unknown model family' for any other width."""
    family = next((f for f in FAMILIES.values() if f.width == width), None)
    return family.label if family else "an unknown model family"


def mismatch(width: int, pooled: int, expected_width: int, needs_pooled: bool):
    """Why tokens of `width` (with a pooled vector of `pooled`, 0 = none) cannot condition a model that reads
    `expected_width`-wide tokens (and needs a pooled vector), as a sentence; None when they can."""
    if expected_width == width and (pooled or not needs_pooled):
        return None
    want = label_of_width(expected_width)
    if expected_width != width:
        return (f"produces {width}-wide tokens ({label_of_width(width)}), but the MODEL expects {expected_width} "
                f"({want}). Use a bridge made for {want}, or the matching checkpoint.")
    return (f"has no pooled output, but the MODEL ({want}) needs the {SDXL.pooled}-wide pooled vector. Use a "
            f"bridge made for SDXL.")
