"""The Presence interaction model: raw audio, raw pixels and events in, floor decisions out.

One micro-turn (200 ms) becomes ``tokens_per_turn`` tokens, each a linear projection of raw
input, with no pretrained encoder in front:

* ``video_tokens`` pixel patches of the sampled frame (Fuyu-style ``nn.Linear`` over raw
  16x16x3 patches), or a learned "no video" token at every video position when none came;
* ``audio_patches`` caller patches of 40 ms (640 raw samples, scaled to unit RMS, plus their
  log-energy, the VAD probability and packet-loss flags of their two 20 ms frames);
* ``audio_patches`` patches of the bot's own output audio, on their own projection;
* ``num_events`` event tokens (a background result arrived, reply ready, bot speaking, held);
* one summary token: the heads (floor action, voice-activity projection, visual alert) read it.

A causal transformer runs over them. Attention is block-causal at micro-turn granularity (all
tokens of a micro-turn see each other; a micro-turn sees the ``window_turns - 1`` before it) so
that a streaming step that processes one whole micro-turn against a ring-buffer KV cache is
exactly the full forward. Positions are rotary, so scores depend on distances only and a
window that slides keeps every score. What slides out of the window is not lost: each layer
keeps exponential moving averages (several timescales) of the evicted micro-turns' summary
keys and values, attended to as ``num_memory`` extra memory slots. Memory and compute per
step are therefore constant however long a call lasts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from presence.model.configuration import PresenceInteractionConfig

_NEG = -1e9  # additive mask value: finite, so a fully masked memory row stays NaN-free


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of rotary phases for integer ``positions`` (any shape) -> shape + (head_dim,).

    Phases are reduced modulo 2*pi in float64: a two-hour call reaches position ~10^6, where a
    float32 phase would already be off by a sizeable fraction of a radian.
    """
    phase = positions.to(torch.float64).unsqueeze(-1) * _inv_freq(head_dim, theta, positions.device)
    phase = torch.remainder(phase, 2.0 * math.pi)
    cos = torch.cos(phase).to(dtype)
    sin = torch.sin(phase).to(dtype)
    return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)


_INV_FREQ: dict[tuple[int, float, str], torch.Tensor] = {}


def _inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    # Cached: also keeps a host-to-device copy out of CUDA-graph captures.
    key = (head_dim, float(theta), str(device))
    if key not in _INV_FREQ:
        half = torch.arange(0, head_dim // 2, dtype=torch.float64) * 2.0 / head_dim
        _INV_FREQ[key] = (float(theta) ** -half).to(device)
    return _INV_FREQ[key]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def audio_patch_features(audio: torch.Tensor, patches: int) -> torch.Tensor:
    """(..., samples) raw audio -> (..., patches, patch_samples + 1).

    Each patch is scaled to unit RMS (floor -60 dBFS, so near-silence is not blown up into
    loud noise) and carries its log-energy, so the linear layer sees both shape and level.
    """
    x = audio.reshape(*audio.shape[:-1], patches, -1)
    power = x.pow(2).mean(-1, keepdim=True)
    wave = x * torch.rsqrt(power + 1e-6)
    log_energy = (torch.log10(power + 1e-10) + 5.0) / 5.0
    return torch.cat((wave, log_energy), dim=-1)


class TurnEmbedding(nn.Module):
    """Raw inputs of micro-turns -> (B, N, tokens_per_turn, hidden)."""

    def __init__(self, config: PresenceInteractionConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        fpp = config.frames_per_patch
        caller_in = config.patch_samples + 1 + fpp + (fpp if config.use_vad_feature else 0)
        self.caller_proj = nn.Linear(caller_in, d)
        self.bot_proj = nn.Linear(config.patch_samples + 1, d)
        self.video_proj = nn.Linear(3 * config.image_patch**2, d)
        self.no_video = nn.Parameter(torch.zeros(d))
        self.event_on = nn.Parameter(torch.zeros(config.num_events, d))
        self.event_off = nn.Parameter(torch.zeros(config.num_events, d))
        self.summary = nn.Parameter(torch.zeros(d))
        self.slot = nn.Parameter(torch.zeros(config.tokens_per_turn, d))  # token role in the turn

    def forward(
        self,
        caller_audio: torch.Tensor,
        bot_audio: torch.Tensor,
        caller_vad: torch.Tensor,
        caller_lost: torch.Tensor,
        video: torch.Tensor,
        video_mask: torch.Tensor,
        events: torch.Tensor,
    ) -> torch.Tensor:
        c = self.config
        dtype = self.caller_proj.weight.dtype
        b, n = caller_audio.shape[:2]
        # Audio features in float32 (log/rsqrt of tiny powers), then the model's dtype.
        caller = audio_patch_features(caller_audio.float(), c.audio_patches)
        side = [caller_lost.float().reshape(b, n, c.audio_patches, c.frames_per_patch)]
        if c.use_vad_feature:
            side.append(caller_vad.float().reshape(b, n, c.audio_patches, c.frames_per_patch))
        caller_tok = self.caller_proj(torch.cat((caller, *side), dim=-1).to(dtype))
        bot_tok = self.bot_proj(audio_patch_features(bot_audio.float(), c.audio_patches).to(dtype))

        p, g = c.image_patch, c.image_size // c.image_patch
        pixels = video.to(dtype)
        if video.dtype == torch.uint8:
            pixels = pixels / 255.0
        pixels = (pixels - 0.5) / 0.25
        # (B, N, 3, S, S) -> (B, N, g*g, 3*p*p): raw pixel patches, row-major like Fuyu.
        patches = pixels.reshape(b, n, 3, g, p, g, p).permute(0, 1, 3, 5, 2, 4, 6)
        patches = patches.reshape(b, n, g * g, 3 * p * p)
        video_tok = torch.where(
            video_mask.reshape(b, n, 1, 1).bool(), self.video_proj(patches), self.no_video.to(dtype)
        )
        ev = events.to(dtype).unsqueeze(-1)  # (B, N, E, 1)
        event_tok = ev * self.event_on + (1.0 - ev) * self.event_off
        summary_tok = self.summary.reshape(1, 1, 1, -1).expand(b, n, 1, -1)
        tokens = torch.cat((video_tok, caller_tok, bot_tok, event_tok, summary_tok), dim=2)
        return tokens + self.slot


class Attention(nn.Module):
    def __init__(self, config: PresenceInteractionConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.qkv_proj = nn.Linear(d, 3 * d, bias=False)  # one matmul for q, k and v
        self.o_proj = nn.Linear(d, d, bias=False)
        # Learned offsets tell the memory slots (timescales) apart.
        self.mem_k_bias = nn.Parameter(torch.zeros(config.num_memory, d))
        self.mem_v_bias = nn.Parameter(torch.zeros(config.num_memory, d))

    def qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv_proj(h).view(*h.shape[:-1], 3, self.heads, self.head_dim).unbind(-3)
        return q, k, v

    def mem_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.mem_k_bias.shape[0]
        return (
            self.mem_k_bias.view(m, self.heads, self.head_dim),
            self.mem_v_bias.view(m, self.heads, self.head_dim),
        )


class MLP(nn.Module):
    def __init__(self, config: PresenceInteractionConfig) -> None:
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: PresenceInteractionConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        self.norm2 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)


@dataclass
class PresenceInteractionOutput(ModelOutput):
    """Per micro-turn outputs of a full forward: logits of the heads on the summary tokens."""

    loss: torch.Tensor | None = None
    action_logits: torch.Tensor | None = None  # (B, N, num_actions)
    vap_logits: torch.Tensor | None = None  # (B, N, vap_bins, 2): caller, bot
    alert_logits: torch.Tensor | None = None  # (B, N)
    last_hidden_state: torch.Tensor | None = None  # (B, N, hidden): the summary tokens
    action_loss: torch.Tensor | None = None
    vap_loss: torch.Tensor | None = None
    alert_loss: torch.Tensor | None = None
    teacher_logits: torch.Tensor | None = None  # (B, N), with config.teacher_head
    teacher_loss: torch.Tensor | None = None


@dataclass
class StreamCache:
    """Per-slot streaming state, preallocated: sizes never change while a call goes on.

    ``k``/``v``: (layers, slots, heads, num_memory + window_turns * tokens_per_turn, head_dim):
    the memory slots of the current step, then a ring of micro-turns (micro-turn ``t`` at ring
    entry ``t % window_turns``); keys are stored rotated. ``sum_k``/``sum_v``: (layers, slots,
    heads, window_turns, head_dim), the unrotated summary key/value of each ring entry, folded
    into the memory when it is evicted. ``num_k``/``num_v``/``den``: the memory averages' numerators and
    weights. ``count``: micro-turns seen per slot.
    """

    k: torch.Tensor
    v: torch.Tensor
    sum_k: torch.Tensor
    sum_v: torch.Tensor
    num_k: torch.Tensor
    num_v: torch.Tensor
    den: torch.Tensor
    count: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v, self.sum_k, self.sum_v, self.num_k, self.num_v, self.den, self.count]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def reset_(self, slots: torch.Tensor) -> None:
        """Forget slots (index tensor). Only the memory and the count matter for results: ring
        entries older than ``count`` are masked; they are zeroed anyway, so nothing stale or
        non-finite can ever leak through a zero attention weight."""
        for t in (self.k, self.v, self.sum_k, self.sum_v, self.num_k, self.num_v):
            t[:, slots] = 0
        self.den[slots] = 0
        self.count[slots] = 0


class PresenceInteractionPreTrainedModel(PreTrainedModel):
    config_class = PresenceInteractionConfig
    base_model_prefix = "presence"
    main_input_name = "caller_audio"
    _no_split_modules: ClassVar[list[str]] = ["Block"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, TurnEmbedding):
            for param in (module.no_video, module.event_on, module.event_off, module.summary, module.slot):
                param.normal_(0.0, std)
        elif isinstance(module, Attention):
            module.mem_k_bias.normal_(0.0, std)
            module.mem_v_bias.zero_()


class PresenceInteractionModel(PresenceInteractionPreTrainedModel):
    """See the module docstring. ``forward`` runs whole sequences (training, evaluation);
    ``forward_step`` advances slots of a :class:`StreamCache` by one micro-turn each."""

    def __init__(self, config: PresenceInteractionConfig) -> None:
        super().__init__(config)
        self.embed = TurnEmbedding(config)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.action_head = nn.Linear(config.hidden_size, config.num_actions)
        self.vap_head = nn.Linear(config.hidden_size, config.vap_bins * 2)
        self.alert_head = nn.Linear(config.hidden_size, 1)
        # Distillation from the end-of-turn detector: its answer for the silence in progress.
        self.teacher_head = nn.Linear(config.hidden_size, 1) if config.teacher_head else None
        self.post_init()

    # ------------------------------------------------------------------ helpers
    def _heads(self, summary: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.norm(summary)
        vap = self.vap_head(h).reshape(*h.shape[:-1], self.config.vap_bins, 2)
        return self.action_head(h), vap, self.alert_head(h).squeeze(-1), h

    def _decays(self, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.config.memory_decays, dtype=torch.float64, device=device)

    def memory_weights(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, N, N) weights of micro-turn s in the memory of micro-turn t, and (N, M) validity.

        The memory of turn t averages the summaries of the turns evicted before it (s <= t-W)
        with weight decay**(t-W-s), normalised: what the streaming running sums compute.
        """
        w = self.config.window_turns
        t = torch.arange(n, device=device).view(n, 1)
        s = torch.arange(n, device=device).view(1, n)
        age = (t - w - s).to(torch.float64)  # >= 0 where s was evicted before t
        decays = self._decays(device).view(-1, 1, 1)
        raw = torch.where(
            age >= 0, decays ** age.clamp(min=0), torch.zeros((), dtype=torch.float64, device=device)
        )
        den = raw.sum(-1, keepdim=True)
        weights = raw / den.clamp(min=1e-300)
        valid = (den.squeeze(-1) > 0).transpose(0, 1)  # (N, M)
        return weights, valid

    # ------------------------------------------------------------------ full sequences
    def forward(
        self,
        caller_audio: torch.Tensor,
        bot_audio: torch.Tensor,
        caller_vad: torch.Tensor | None = None,
        caller_lost: torch.Tensor | None = None,
        video: torch.Tensor | None = None,
        video_mask: torch.Tensor | None = None,
        events: torch.Tensor | None = None,
        action_labels: torch.Tensor | None = None,
        vap_labels: torch.Tensor | None = None,
        alert_labels: torch.Tensor | None = None,
        teacher_labels: torch.Tensor | None = None,
        action_weights: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs: object,
    ) -> PresenceInteractionOutput | tuple[torch.Tensor, ...]:
        """Whole sequences of micro-turns, every one starting a call at micro-turn 0.

        Shapes: ``caller_audio``/``bot_audio`` (B, N, samples_per_turn) float; ``caller_vad``
        (B, N, frames) probabilities; ``caller_lost`` (B, N, frames) 0/1; ``video`` (B, N, 3,
        image_size, image_size) uint8 or [0, 1] float with ``video_mask`` (B, N) where a frame
        exists; ``events`` (B, N, num_events) 0/1. Missing optional inputs mean "none".
        Labels: ``action_labels`` (B, N) long, -100 ignored; ``vap_labels`` (B, N, bins, 2) in
        [0, 1], negative ignored; ``alert_labels`` (B, N), negative ignored; ``teacher_labels``
        (B, N) the end-of-turn detector's probability, negative ignored (``teacher_head`` only);
        ``action_weights`` (B, N) weighs each micro-turn's action loss (hard negatives count more).
        """
        c = self.config
        b, n = caller_audio.shape[:2]
        dev = caller_audio.device
        zeros = torch.zeros(b, n, c.frames_per_turn, device=dev)
        if video is None:
            video = torch.zeros(b, n, 3, c.image_size, c.image_size, device=dev, dtype=torch.uint8)
            video_mask = torch.zeros(b, n, dtype=torch.bool, device=dev)
        x = self.embed(
            caller_audio,
            bot_audio,
            zeros if caller_vad is None else caller_vad,
            zeros if caller_lost is None else caller_lost,
            video,
            torch.ones(b, n, dtype=torch.bool, device=dev) if video_mask is None else video_mask,
            torch.zeros(b, n, c.num_events, device=dev) if events is None else events,
        )
        t_per = c.tokens_per_turn
        length = n * t_per
        x = x.reshape(b, length, -1)
        dtype = x.dtype
        hd, heads, m = c.head_dim, c.num_attention_heads, c.num_memory
        scale = 1.0 / math.sqrt(hd)

        cos, sin = rope_cos_sin(torch.arange(length, device=dev), hd, c.rope_theta, dtype)
        # Memory slots sit at the first position of the micro-turn that reads them: their
        # scores depend on the query's place within its micro-turn only, never on the call time.
        mem_cos, mem_sin = cos[::t_per][:, None, None, :], sin[::t_per][:, None, None, :]  # (N, 1, 1, hd)
        cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads: (L, 1, hd)
        turn = torch.arange(length, device=dev) // t_per
        window = (turn[None, :] <= turn[:, None]) & (turn[None, :] > turn[:, None] - c.window_turns)
        mem_w, mem_valid = self.memory_weights(n, dev)  # (M, N, N), (N, M)
        mem_w = mem_w.to(dtype)
        # Every micro-turn has its own M memory keys; a query sees its own micro-turn's only.
        mem_turn = torch.arange(n, device=dev).repeat_interleave(m)  # (N*M,)
        own = (turn[:, None] == mem_turn[None, :]) & mem_valid.reshape(1, n * m)
        mask = torch.cat((window, own), dim=1)  # (L, L + N*M), True = attend

        for layer in self.layers:
            attn = layer.attn
            q, k, v = attn.qkv(layer.norm1(x))  # (B, L, H, hd)
            k_sum = k[:, t_per - 1 :: t_per]  # (B, N, H, hd): unrotated summary keys
            v_sum = v[:, t_per - 1 :: t_per]
            bk, bv = attn.mem_bias()
            mem_k = torch.einsum("mts,bshd->btmhd", mem_w, k_sum) + bk  # (B, N, M, H, hd)
            mem_v = torch.einsum("mts,bshd->btmhd", mem_w, v_sum) + bv
            mem_k = apply_rope(mem_k, mem_cos, mem_sin)
            keys = torch.cat((apply_rope(k, cos, sin), mem_k.reshape(b, n * m, heads, hd)), dim=1)
            values = torch.cat((v, mem_v.reshape(b, n * m, heads, hd)), dim=1)
            out = F.scaled_dot_product_attention(
                apply_rope(q, cos, sin).transpose(1, 2),
                keys.transpose(1, 2),
                values.transpose(1, 2),
                attn_mask=mask,
                scale=scale,
            )  # (B, H, L, hd)
            out = out.transpose(1, 2).reshape(b, length, -1)
            x = x + layer.dropout(attn.o_proj(out))
            x = x + layer.dropout(layer.mlp(layer.norm2(x)))

        summary = x.view(b, n, t_per, -1)[:, :, -1]
        action_logits, vap_logits, alert_logits, hidden = self._heads(summary)
        loss = action_loss = vap_loss = alert_loss = teacher_loss = None
        teacher_logits = None if self.teacher_head is None else self.teacher_head(hidden).squeeze(-1)
        if action_labels is not None or vap_labels is not None or alert_labels is not None:
            loss = torch.zeros((), device=dev)
            if action_labels is not None:
                weight = None
                if c.action_class_weights:
                    weight = torch.tensor(c.action_class_weights, device=dev, dtype=torch.float32)
                flat = action_labels.reshape(-1)
                per_turn = F.cross_entropy(
                    action_logits.float().reshape(-1, c.num_actions),
                    flat,
                    weight=weight,
                    ignore_index=-100,
                    reduction="none",
                )
                # The mean F.cross_entropy takes (weighted by class), times each micro-turn's weight.
                valid = (flat != -100).float()
                norm = valid if weight is None else weight[flat.clamp(min=0)] * valid
                if action_weights is not None:
                    per_turn = per_turn * action_weights.reshape(-1).float()
                    norm = norm * action_weights.reshape(-1).float()
                action_loss = per_turn.sum() / norm.sum().clamp(min=1e-9)
                loss = loss + action_loss
            if vap_labels is not None:
                vap_loss = _masked_bce(vap_logits, vap_labels)
                loss = loss + 0.5 * vap_loss
            if alert_labels is not None:
                alert_loss = _masked_bce(alert_logits, alert_labels)
                loss = loss + 0.25 * alert_loss
            if teacher_labels is not None and teacher_logits is not None:
                teacher_loss = _masked_bce(teacher_logits, teacher_labels)
                loss = loss + 0.5 * teacher_loss
        output = PresenceInteractionOutput(
            loss=loss,
            action_logits=action_logits,
            vap_logits=vap_logits,
            alert_logits=alert_logits,
            last_hidden_state=hidden,
            action_loss=action_loss,
            vap_loss=vap_loss,
            alert_loss=alert_loss,
            teacher_logits=teacher_logits,
            teacher_loss=teacher_loss,
        )
        if return_dict is False:
            return output.to_tuple()
        return output

    # ------------------------------------------------------------------ streaming
    def new_cache(self, slots: int, device: torch.device | str | None = None) -> StreamCache:
        """A cache for ``slots`` calls (streamers add one scratch slot for padding rows)."""
        c = self.config
        dev = torch.device(device) if device is not None else self.device
        dtype = self.dtype
        layers, w, t, h, hd, m = (
            c.num_hidden_layers,
            c.window_turns,
            c.tokens_per_turn,
            c.num_attention_heads,
            c.head_dim,
            c.num_memory,
        )
        return StreamCache(
            k=torch.zeros(layers, slots, h, m + w * t, hd, device=dev, dtype=dtype),
            v=torch.zeros(layers, slots, h, m + w * t, hd, device=dev, dtype=dtype),
            sum_k=torch.zeros(layers, slots, h, w, hd, device=dev, dtype=dtype),
            sum_v=torch.zeros(layers, slots, h, w, hd, device=dev, dtype=dtype),
            # Memory sums in float32 at least: 36,000 folds must not drift in bfloat16.
            num_k=torch.zeros(layers, slots, h, m, hd, device=dev, dtype=torch.float32),
            num_v=torch.zeros(layers, slots, h, m, hd, device=dev, dtype=torch.float32),
            den=torch.zeros(slots, m, device=dev, dtype=torch.float32),
            count=torch.zeros(slots, device=dev, dtype=torch.long),
        )

    @torch.inference_mode()
    def forward_step(
        self,
        cache: StreamCache,
        slots: torch.Tensor,
        caller_audio: torch.Tensor,
        bot_audio: torch.Tensor,
        caller_vad: torch.Tensor,
        caller_lost: torch.Tensor,
        video: torch.Tensor,
        video_mask: torch.Tensor,
        events: torch.Tensor,
        contiguous: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Advance ``slots`` (B,) by one micro-turn each; inputs are those of ``forward`` with
        the N axis dropped. Returns action logits (B, A), VAP logits (B, bins, 2) and alert
        logits (B,). Static shapes and no data-dependent Python branches: the same code is
        captured into CUDA graphs. ``contiguous=(a, b)`` says ``slots`` is ``a..b-1`` in order,
        which lets the CPU path read the cache through views instead of gathering copies.
        """
        c = self.config
        w, t_per, hd, m, heads = (
            c.window_turns,
            c.tokens_per_turn,
            c.head_dim,
            c.num_memory,
            c.num_attention_heads,
        )
        b = slots.shape[0]
        dev = caller_audio.device
        x = self.embed(
            caller_audio[:, None],
            bot_audio[:, None],
            caller_vad[:, None],
            caller_lost[:, None],
            video[:, None],
            video_mask[:, None],
            events[:, None],
        )[:, 0]  # (B, T, d)
        dtype = x.dtype
        scale = 1.0 / math.sqrt(hd)
        count = cache.count[slots]  # (B,)
        ring = torch.remainder(count, w)
        positions = count[:, None] * t_per + torch.arange(t_per, device=dev)
        cos, sin = rope_cos_sin(positions, hd, c.rope_theta, dtype)  # (B, T, hd)
        cos_h, sin_h = cos[:, None], sin[:, None]  # (B, 1, T, hd): q, k as (B, H, T, hd)
        mem_cos, mem_sin = cos[:, None, :1], sin[:, None, :1]  # memory at the turn's first position

        # Key layout per slot and head: [M memory slots][ring of W micro-turns x T tokens].
        ages = torch.remainder(ring[:, None] - torch.arange(w, device=dev), w)
        valid = ages <= count[:, None]  # (B, W): ring entry r holds micro-turn count - age(r)
        # Fold the micro-turn leaving the window (count - W) into the memory averages.
        evict = (count >= w).to(torch.float32)  # (B,)
        decays = self._decay_tensor(dev)  # (M,)
        den = cache.den[slots] * decays + evict[:, None]  # (B, M)
        cache.den[slots] = den
        bias = torch.cat((den > 0, valid[:, :, None].expand(b, w, t_per).reshape(b, w * t_per)), dim=1)
        bias = torch.where(bias, 0.0, _NEG).to(dtype)[:, None, None, :]  # (B, 1, 1, M + W*T)
        inv_den = (1.0 / den.clamp(min=1e-12)).view(b, 1, m, 1)
        evict4 = evict.view(b, 1, 1, 1)
        decay4 = decays.view(1, 1, m, 1)
        bidx = torch.arange(b, device=dev).view(b, 1, 1)
        hidx = torch.arange(heads, device=dev).view(1, heads, 1)
        pidx = (m + ring * t_per).view(b, 1, 1) + torch.arange(t_per, device=dev).view(1, 1, t_per)
        midx = torch.arange(m, device=dev).view(1, 1, m)
        sidx = slots.view(b, 1, 1)

        for i, layer in enumerate(self.layers):
            attn = layer.attn
            q, k, v = attn.qkv(layer.norm1(x))  # (B, T, H, hd)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
            old_k = cache.sum_k[i][slots, :, ring]  # (B, H, hd): summary of micro-turn count - W
            old_v = cache.sum_v[i][slots, :, ring]
            num_k = cache.num_k[i][slots] * decay4 + old_k.float()[:, :, None] * evict4  # (B, H, M, hd)
            num_v = cache.num_v[i][slots] * decay4 + old_v.float()[:, :, None] * evict4
            cache.num_k[i][slots] = num_k
            cache.num_v[i][slots] = num_v
            cache.sum_k[i][slots, :, ring] = k[:, :, -1]
            cache.sum_v[i][slots, :, ring] = v[:, :, -1]
            bk, bv = attn.mem_bias()  # (M, H, hd)
            mem_k = apply_rope((num_k * inv_den).to(dtype) + bk.transpose(0, 1), mem_cos, mem_sin)
            mem_v = (num_v * inv_den).to(dtype) + bv.transpose(0, 1)
            k_rot = apply_rope(k, cos_h, sin_h)
            if contiguous is not None:
                keys, values = (
                    cache.k[i][contiguous[0] : contiguous[1]],
                    cache.v[i][contiguous[0] : contiguous[1]],
                )
                keys.index_put_((bidx, hidx, pidx), k_rot)
                values.index_put_((bidx, hidx, pidx), v)
                keys.index_put_((bidx, hidx, midx), mem_k)
                values.index_put_((bidx, hidx, midx), mem_v)
            else:
                cache.k[i].index_put_((sidx, hidx, pidx), k_rot)
                cache.v[i].index_put_((sidx, hidx, pidx), v)
                cache.k[i].index_put_((sidx, hidx, midx), mem_k)
                cache.v[i].index_put_((sidx, hidx, midx), mem_v)
                keys, values = cache.k[i][slots], cache.v[i][slots]  # (B, H, M + W*T, hd)
            qr = apply_rope(q, cos_h, sin_h)
            scores = torch.baddbmm(
                bias.expand(b, heads, t_per, -1).reshape(b * heads, t_per, -1),
                qr.reshape(b * heads, t_per, hd),
                keys.reshape(b * heads, -1, hd).transpose(1, 2),
                alpha=scale,
            )
            probs = torch.softmax(scores.float(), dim=-1).to(dtype)
            out = torch.bmm(probs, values.reshape(b * heads, -1, hd))  # (B*H, T, hd)
            out = out.view(b, heads, t_per, hd).transpose(1, 2).reshape(b, t_per, -1)
            x = x + attn.o_proj(out)
            x = x + layer.mlp(layer.norm2(x))

        cache.count[slots] = count + 1
        action, vap, alert, _ = self._heads(x[:, -1])
        return action, vap, alert

    def _decay_tensor(self, device: torch.device) -> torch.Tensor:
        # Cached per device: creating it from a Python list inside a CUDA-graph capture would
        # record a copy from a host buffer that no longer exists at replay.
        cached = self.__dict__.setdefault("_decay_cache", {})
        key = str(device)
        if key not in cached:
            cached[key] = torch.tensor(self.config.memory_decays, dtype=torch.float32, device=device)
        return cached[key]


def _masked_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    mask = labels >= 0
    if not bool(mask.any()):
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits.float()[mask], labels.float()[mask])
