"""Configuration of the Presence interaction model (a transformers ``PretrainedConfig``).

Every size is derived from a handful of fields so that the tiny test configs, the small CPU
checkpoint and a ~1B GPU config are the same code. Only plain JSON types are stored so that
``save_pretrained`` / ``from_pretrained`` round-trip on transformers 4.5x and 5.x alike.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

# The floor actions the model predicts, in logit order. Each is a ``seams.Floor`` value; HOLD
# and RESUME stay with the per-frame reflex of the rule policy (see streaming.ModelFloorPolicy).
FLOOR_ACTIONS: tuple[str, ...] = ("listen", "backchannel", "speak", "continue", "yield", "interrupt")
# Event tokens, one per micro-turn each, learned "on" and "off" embeddings mixed by the value:
# a background result is waiting (FloorState.result_waiting, or a result event in the
# micro-turn), it is urgent, a reply is ready, the bot is speaking, the bot is held, the audio
# end-of-turn detector has answered for this silence, and its P(turn complete) (the teacher), and
# two cues of the streaming ASR's words that the fused rule reads: the words so far end on a word
# a sentence goes on from ("and", "the"), and how many content words (up to 4, scaled to [0, 1]).
# A checkpoint reads the first ``num_events`` of them: older ones were trained on five.
EVENT_NAMES: tuple[str, ...] = (
    "result",
    "result_urgent",
    "reply_ready",
    "bot_speaking",
    "bot_held",
    "eot_asked",
    "eot_complete",
    "words_unfinished",
    "content_words",
)


class PresenceInteractionConfig(PretrainedConfig):
    model_type = "presence_interaction"

    def __init__(
        self,
        hidden_size: int = 128,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        intermediate_size: int = 384,
        sample_rate: int = 16_000,
        micro_turn_ms: int = 200,
        audio_patch_ms: int = 40,
        frame_ms: int = 20,
        image_size: int = 64,
        image_patch: int = 16,
        num_events: int = len(EVENT_NAMES),
        num_actions: int = len(FLOOR_ACTIONS),
        window_turns: int = 16,
        memory_decays: list[float] | None = None,
        rope_theta: float = 10_000.0,
        vap_bins: int = 10,
        vap_bin_ms: int = 200,
        use_vad_feature: bool = True,
        dropout: float = 0.0,
        rms_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        action_class_weights: list[float] | None = None,
        teacher_head: bool = False,
        **kwargs: Any,
    ) -> None:
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.sample_rate = sample_rate
        self.micro_turn_ms = micro_turn_ms
        self.audio_patch_ms = audio_patch_ms
        self.frame_ms = frame_ms
        self.image_size = image_size
        self.image_patch = image_patch
        self.num_events = num_events
        self.num_actions = num_actions
        self.window_turns = window_turns
        # Timescales (per evicted micro-turn) of the compressed memory: ~1 s, 4 s, 20 s, 200 s.
        self.memory_decays = list(memory_decays) if memory_decays is not None else [0.8, 0.95, 0.99, 0.999]
        self.rope_theta = rope_theta
        self.vap_bins = vap_bins
        self.vap_bin_ms = vap_bin_ms
        self.use_vad_feature = use_vad_feature
        self.dropout = dropout
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.action_class_weights = list(action_class_weights) if action_class_weights else None
        # A head distilled from the end-of-turn detector (training only; see model.teacher).
        self.teacher_head = bool(teacher_head)
        super().__init__(**kwargs)
        self._check()

    def _check(self) -> None:
        problems = []
        if self.hidden_size % self.num_attention_heads:
            problems.append("hidden_size must be a multiple of num_attention_heads")
        elif (self.hidden_size // self.num_attention_heads) % 2:
            problems.append("the head size must be even (rotary embeddings)")
        if self.micro_turn_ms % self.audio_patch_ms or self.micro_turn_ms % self.frame_ms:
            problems.append("micro_turn_ms must be a multiple of audio_patch_ms and frame_ms")
        if self.audio_patch_ms % self.frame_ms:
            problems.append("audio_patch_ms must be a multiple of frame_ms")
        if self.image_size % self.image_patch:
            problems.append("image_size must be a multiple of image_patch")
        if self.window_turns < 1:
            problems.append("window_turns must be at least 1")
        if not self.memory_decays or not all(0.0 < d < 1.0 for d in self.memory_decays):
            problems.append("memory_decays must be a non-empty list of values in (0, 1)")
        if problems:
            raise ValueError("invalid PresenceInteractionConfig: " + "; ".join(problems))

    # ------------------------------------------------------------------ derived sizes
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def samples_per_turn(self) -> int:
        return self.sample_rate * self.micro_turn_ms // 1000  # 3200

    @property
    def patch_samples(self) -> int:
        return self.sample_rate * self.audio_patch_ms // 1000  # 640

    @property
    def audio_patches(self) -> int:
        return self.micro_turn_ms // self.audio_patch_ms  # 5

    @property
    def frames_per_turn(self) -> int:
        return self.micro_turn_ms // self.frame_ms  # 10

    @property
    def frames_per_patch(self) -> int:
        return self.audio_patch_ms // self.frame_ms  # 2

    @property
    def video_tokens(self) -> int:
        return (self.image_size // self.image_patch) ** 2  # 16

    @property
    def num_memory(self) -> int:
        return len(self.memory_decays)

    @property
    def tokens_per_turn(self) -> int:
        # [video patches][caller patches][bot patches][events][summary]
        return self.video_tokens + 2 * self.audio_patches + self.num_events + 1

    @property
    def window_tokens(self) -> int:
        return self.window_turns * self.tokens_per_turn
