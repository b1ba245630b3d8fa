"""What each family trains, as tasks for the one Trainer: the trained parts as a module, the examples, the loss.

- MapperStudent / GILLStudent / ConnectorStudent on cached tensors (DistillData): distillation onto the
  checkpoint's CLIP (Beyond CLIP stage 1, GILL's generation loss, MUMU stage 1).
- RepAdapterStudent: Beyond CLIP stage 2, through the frozen LLM (token ids) and the frozen UNet.
- GILLTokensStudent: GILL's 8 [IMG] input rows with the mapper, through the frozen LLM.
- MUMUStage2Student: MUMU stage 2, connector + LoRAs on Idefics2 and the UNet, by the UNet's denoising loss.
- SeedLLMStudent: SEED-LLM, the visual vocabulary and a LoRA on the LLM, by next-token loss on code/text sequences.
Frozen models are held outside the module tree (in `_frozen`), so checkpoints and the optimiser see only what is
trained.
"""
import torch
from torch import nn

from .. import llm_text
from .. import seed_llm as seed_llm_bridge
from ..mumu import encode as encode_interleaved
from ..repadapter import attached as adapters_attached
from .data import DistillData, TokenData, TrainConfig
from .lora import LoRASet
from .losses import diffusion_loss, distill_loss, probe_attention, token_loss
from .trainer import Task

# ---- students --------------------------------------------------------------------------------------------

class MapperStudent(nn.Module):
    """A Beyond CLIP mapper over a batch whose prompts end at different tokens."""

    def __init__(self, mapper):
        super().__init__()
        self.mapper = mapper

    def forward(self, hidden, last_token):
        return self.mapper(hidden, last_token)


class GILLStudent(nn.Module):
    """GILLMapper on cached [IMG] hidden states; the [IMG] input embeddings stay fixed (a buffer)."""

    def __init__(self, mapper, img_embs: torch.Tensor):
        super().__init__()
        self.mapper = mapper
        self.register_buffer("img_embs", img_embs.detach().clone().float(), persistent=False)

    def forward(self, hidden, last_token=None):
        return self.mapper(hidden, self.img_embs[None].expand(hidden.shape[0], -1, -1).to(hidden.dtype))


class ConnectorStudent(nn.Module):
    """The MUMU connector on cached Idefics2 states padded to a common length (positions after last_token are
    padding, masked out of every attention, so each caption is encoded as alone: MUMUConnector.forward(valid=)).

    Token alignment: the connector maps Idefics2's L tokens (L varies with the caption, and with its images) to
    L SDXL-wide tokens, the teacher gives CLIP's 77; there is no position-to-position correspondence. The UNet
    reads the conditioning only through cross-attention, softmax(q k^T) v over the token set, which does not
    depend on how many tokens there are or in what order. So the token loss compares the two sets' answers to
    a fixed bank of probe queries (probe_attention: random directions over layer-normalised keys, plus the
    uniform query = the mean token); the pooled vector (SDXL's 1280) is compared directly."""

    def __init__(self, connector, probes: torch.Tensor):
        super().__init__()
        self.connector = connector
        self.register_buffer("probes", probes.detach().clone().float(), persistent=False)

    def forward(self, hidden, last_token):
        valid = torch.arange(hidden.shape[1], device=hidden.device)[None] <= last_token[:, None]
        tokens, pooled = self.connector(hidden, valid=valid)
        return tokens, pooled, valid

    def loss(self, prediction, targets, target_pooled, kind, pooled_weight=1.0):
        tokens, pooled, valid = prediction
        loss = token_loss(probe_attention(tokens, valid, self.probes), probe_attention(targets, None, self.probes),
                          kind)
        if pooled is not None and target_pooled is not None:
            loss = loss + pooled_weight * token_loss(pooled, target_pooled, kind)
        return loss


class RepAdapterStudent(nn.Module):
    """LLM + RepAdapters (unmerged, the only trainable weights) -> frozen mapper, on token ids (B, T)."""

    def __init__(self, llm, adapters, mapper, hidden_layer: int = -1):
        super().__init__()
        self.adapters = adapters
        self._frozen = (llm, mapper)
        self.hidden_layer = hidden_layer

    def forward(self, ids, last_token):
        llm, mapper = self._frozen
        device = next(llm.parameters()).device
        with adapters_attached(llm, self.adapters):
            # every position attended to, as llm_text.encode does for one prompt padded to the mapper's tokens
            hidden = llm_text.hidden_states(llm, ids=ids.to(device), layer=self.hidden_layer).float()
        return mapper(hidden, last_token.to(device))


class GILLTokensStudent(nn.Module):
    """GILLMapper and GILL's learnt [IMG] input embeddings, both trained: a caption's token embeddings and the
    [IMG] rows go into the frozen LLM every step, and its last-layer states at the [IMG] positions, plus the rows,
    into the mapper, as the encode node does."""

    def __init__(self, mapper, img_embs: torch.Tensor, llm):
        super().__init__()
        self.mapper = mapper
        self.img_embs = nn.Parameter(img_embs.detach().clone().float())
        self._frozen = (llm,)

    def forward(self, ids: torch.Tensor):
        llm = self._frozen[0]
        embed = llm.get_input_embeddings()
        rows = self.img_embs.to(embed.weight.dtype)[None]
        x = torch.cat([embed(ids.to(embed.weight.device)), rows], dim=1)
        out = llm(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long, device=x.device),
                  output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states[-1][:, -rows.shape[1]:].float()
        return self.mapper(hidden, self.img_embs[None].to(hidden.device))


class MUMUStage2Student(nn.Module):
    """Idefics2 (+ LoRA) -> connector -> (tokens, pooled) for one interleaved prompt."""

    def __init__(self, vlm, connector, idefics2_lora: LoRASet, unet, unet_lora: LoRASet, hidden_layer: int = -1):
        super().__init__()
        self.connector = connector
        self.idefics2_lora = idefics2_lora
        self.unet_lora = unet_lora
        self._frozen = (vlm, unet)
        self.hidden_layer = hidden_layer

    def forward(self, seq, pixels):
        vlm, _ = self._frozen
        with self.idefics2_lora.attached(vlm):
            hidden = encode_interleaved(vlm, seq, pixels, self.hidden_layer)
        return self.connector(hidden.to(next(self.connector.parameters()).dtype))

    def unet_attached(self):
        return self.unet_lora.attached(self._frozen[1])


class SeedLLMStudent(nn.Module):
    """The trained parts of a SEED-LLM, the visual vocabulary and the LoRA, around the frozen causal LM: the mean
    next-token loss of each sequence of a padded batch (seed_llm.sequence_losses)."""

    def __init__(self, llm, vocab, lora: LoRASet):
        super().__init__()
        self.vocab = vocab
        self.lora = lora
        self._frozen = (llm,)

    def forward(self, ids, mask, labels):
        llm = self._frozen[0]
        with self.lora.attached(llm):
            return seed_llm_bridge.sequence_losses(llm, self.vocab, ids, mask, labels)


# ---- tasks -----------------------------------------------------------------------------------------------

class DistillTask(Task):
    """A student on cached inputs, against the teacher's tokens (and pooled vector). A student with its own
    `loss` (ConnectorStudent, whose token count is not the teacher's) computes it; the others are compared
    position by position."""

    def __init__(self, student: nn.Module, data: DistillData, config: TrainConfig):
        self.module, self.data, self.config = student, data, config
        self.n_examples = len(data)

    def loss(self, idx, generator, forward):
        inputs, last, targets, pooled = self.data.batch(idx, next(self.module.parameters()).device)
        prediction = forward(inputs, last)
        own = getattr(self.module, "loss", None)
        if own is not None:
            return own(prediction, targets, pooled, self.config.loss, self.config.pooled_weight)
        return distill_loss(*prediction, targets, pooled, self.config.loss, self.config.pooled_weight)


class RepAdapterTask(Task):
    """Beyond CLIP stage 2: loss = L_cap + lambda_diffusion * L_diffusion, the caption loss against the CLIP
    targets and the frozen UNet's denoising loss of each caption's image (latents None: caption loss only)."""
    backward_to_trained_only = True

    def __init__(self, student: RepAdapterStudent, data: TokenData, latents, denoiser, config: TrainConfig,
                 lambda_diffusion: float = 0.1):
        self.module, self.data, self.config = student, data, config
        self.n_examples = len(data)
        self.latents, self.denoiser, self.lambda_diffusion = latents, denoiser, float(lambda_diffusion)
        self.last_parts = {}

    def loss(self, idx, generator, forward):
        device = next(self.module.parameters()).device
        ids, last, targets, pooled = self.data.batch(idx, device)
        tokens, pred_pooled = forward(ids, last)
        cap = distill_loss(tokens, pred_pooled, targets, pooled, self.config.loss, self.config.pooled_weight)
        diff = torch.zeros((), device=cap.device)
        if self.latents is not None and self.lambda_diffusion:
            latents = self.latents[idx].to(device)
            diff = diffusion_loss(self.denoiser, latents, tokens, pred_pooled, generator).to(cap.device)
        if self.module.training:
            self.last_parts = {"caption": float(cap.detach()), "diffusion": float(diff.detach())}
        return cap + self.lambda_diffusion * diff


class GILLTokensTask(Task):
    """GILL's mapper and [IMG] rows through the frozen LLM, one caption at a time (only its real tokens fed)."""
    per_example = True
    backward_to_trained_only = True

    def __init__(self, student: GILLTokensStudent, data: TokenData, config: TrainConfig):
        self.module, self.data, self.config = student, data, config
        self.n_examples = len(data)

    def loss(self, idx, generator, forward):
        ids, last, targets, pooled = self.data.batch(idx, next(self.module.parameters()).device)
        tokens, pred_pooled = forward(ids[:, :int(last[0]) + 1])
        return distill_loss(tokens, pred_pooled, targets, pooled, self.config.loss, self.config.pooled_weight)


class MUMUStage2Task(Task):
    """MUMU's second stage: examples [(Sequence, crop pixels or None)] with the cached latents of their pictures,
    one forward and backward each. Three learning rates (MUMU: connector 1e-5, Idefics2 LoRA 3e-6, UNet LoRA
    5e-6); a part whose rate is 0 stays as it is."""
    per_example = True
    backward_to_trained_only = True
    PARTS = ("connector", "idefics2_lora", "unet_lora")

    def __init__(self, student: MUMUStage2Student, examples, latents, denoiser, lrs: dict):
        if len(examples) != len(latents):
            raise ValueError(f"{len(examples)} examples for {len(latents)} latents")
        self.module, self.examples, self.latents, self.denoiser = student, examples, latents, denoiser
        self.n_examples = len(examples)
        self.lrs = lrs
        for part in self.PARTS:
            if not lrs.get(part):
                getattr(student, part).requires_grad_(False)
        if not any(lrs.get(part) for part in self.PARTS):
            raise ValueError("every learning rate is 0: nothing to train")

    def param_groups(self, config):
        return [{"params": list(getattr(self.module, part).parameters()), "base_lr": float(self.lrs[part]),
                 "name": part} for part in self.PARTS if self.lrs.get(part)]

    def loss(self, idx, generator, forward):
        i = int(idx[0])
        seq, pixels = self.examples[i]
        tokens, pooled = forward(seq, pixels)
        device = next(self.module.parameters()).device
        with self.module.unet_attached():
            return diffusion_loss(self.denoiser, self.latents[i:i + 1].to(device), tokens, pooled, generator)


class SeedLLMTask(Task):
    """SEED-LLM: examples are pictures, each with its sequences (seed_llm.Sequence: its caption, the caption drawn
    as its codes, its questions), so a picture and everything said about it stay on one side of the held-out
    split."""
    backward_to_trained_only = True

    def __init__(self, student: SeedLLMStudent, examples: list, pad_id: int, eval_batch: int = 16):
        if not examples or not all(examples):
            raise ValueError("every picture needs at least one sequence")
        self.module, self.examples, self.pad_id = student, examples, int(pad_id)
        self.n_examples = len(examples)
        self.eval_batch = max(1, int(eval_batch))

    def _sequences(self, idx, kind=None):
        return [s for i in idx for s in self.examples[int(i)] if kind is None or s.kind == kind]

    def loss(self, idx, generator, forward):
        """The mean over the pictures of each one's mean sequence loss: every picture weighs the same however many
        questions it has, so DDP's mean over equal slices of pictures is the one-process loss."""
        owner = torch.tensor([j for j, i in enumerate(idx) for _ in self.examples[int(i)]])
        per_sequence = forward(*seed_llm_bridge.pad_batch(self._sequences(idx), self.pad_id))
        owner = owner.to(per_sequence.device)
        per_picture = torch.zeros(len(idx), device=per_sequence.device).index_add(0, owner, per_sequence)
        return (per_picture / torch.bincount(owner, minlength=len(idx))).mean()

    def groups(self, idx, evaluating):
        if evaluating:
            return [idx[start:start + self.eval_batch] for start in range(0, len(idx), self.eval_batch)]
        return [idx]

    @torch.no_grad()
    def losses_by_kind(self, idx) -> dict:
        """{kind: mean sequence loss} over the pictures idx (e.g. the held-out split), the module in eval mode."""
        was = self.module.training
        self.module.eval()
        out = {}
        for kind in sorted({s.kind for s in self._sequences(idx)}):
            seqs = self._sequences(idx, kind)
            total = 0.0
            for start in range(0, len(seqs), self.eval_batch):
                chunk = seqs[start:start + self.eval_batch]
                total += float(self.module(*seed_llm_bridge.pad_batch(chunk, self.pad_id)).sum())
            out[kind] = total / len(seqs)
        self.module.train(was)
        return out
