"""The interaction model in a live process: what it is trained on is what it is served, a
checkpoint trained here loads through transformers' Auto classes and decides a real call, and
every call's micro-turns fall on one grid so one forward serves them all."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import torch
from conftest import SR_OUT, BotServer, need
from transformers import AutoConfig, AutoModel

from presence.caller import Caller
from presence.clock import on_grid
from presence.model import PresenceInteractionModel, load_pretrained
from presence.model.configuration import EVENT_NAMES
from presence.model.data import DataSpec, load_dialogues
from presence.model.dialogue import StateTracker, microturns
from presence.model.inputs import encode_turn
from presence.model.scheduler import shared_scheduler
from presence.model.streaming import DecodeParams
from presence.model.train import Batcher, make_config, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dialogues() -> list:  # type: ignore[type-arg]
    need(shutil.which("espeak-ng") is not None, "espeak-ng is not installed (apt-get install espeak-ng)")
    # Cached under ~/.cache/presence/train after the first run (espeak voices: fast to make).
    return load_dialogues(DataSpec("heldout", dialogues=2, seconds=30.0, seed=7, espeak_only=True))


def test_training_and_serving_see_the_same_features(dialogues) -> None:  # type: ignore[no-untyped-def]
    """What a training batch holds for a micro-turn is what ``encode_turn`` makes of the same
    micro-turn and the FloorState the caller-state trace gives (the serving path), and the
    teacher's tokens are its answers as the engine would hold them (``eot_tracks``)."""
    config = make_config("tiny")
    batcher = Batcher(dialogues, seq=16, seed=0)
    asked = 0
    for d, item in zip(dialogues, batcher.items, strict=True):
        assert d.eot is not None and d.eot_target is not None
        trained = item["events"].numpy()
        assert trained.shape == (d.turns, len(EVENT_NAMES)) == (d.turns, config.num_events)
        tracker = StateTracker(d)
        for k, turn in enumerate(microturns(d)):
            served = encode_turn(turn, tracker.update(k, turn), config).events
            np.testing.assert_allclose(served, trained[k], err_msg=f"micro-turn {k}")
        eot = np.where(d.eot >= 0, d.eot, 0.0)
        np.testing.assert_allclose(trained[:, EVENT_NAMES.index("eot_asked")], d.eot >= 0)
        np.testing.assert_allclose(trained[:, EVENT_NAMES.index("eot_complete")], eot, atol=1e-6)
        asked += int((d.eot >= 0).sum())
        # The teacher answers inside silences only; the target covers at least what was served.
        served_at, target_at = d.eot >= 0, d.eot_target >= 0
        assert np.all(target_at[served_at]) and np.all(d.eot[served_at] == d.eot_target[served_at])
        assert trained[:, EVENT_NAMES.index("content_words")].max() > 0  # the words reach the model
    assert asked > 10


def test_thresholds_are_chosen_to_beat_the_fused_rule(dialogues) -> None:  # type: ignore[no-untyped-def]
    """A model that says "yield" whenever the caller makes a sound over the bot (and is right
    elsewhere) yields to every backchannel. Calibrated against the fused rule on the same calls,
    its thresholds must give no more caller-facing errors than the rule, which here only the
    overlap guard can do; without the baseline, nothing forces that."""
    import copy

    from presence.bot.policy import RuleBasedPolicy, RuleParams
    from presence.config import Settings
    from presence.model.configuration import FLOOR_ACTIONS
    from presence.model.evaluate import calibrate, caller_errors, decode_offline, run_policy, score

    probs, states = [], []
    for d in dialogues:
        p = np.eye(len(FLOOR_ACTIONS), dtype=np.float32)[d.actions]
        talking = d.bot_speaking & (d.vad.reshape(-1, 10)[: d.turns] > 0.5).any(axis=1)
        p[talking] = np.eye(len(FLOOR_ACTIONS))[FLOOR_ACTIONS.index("yield")]
        probs.append(p)
        tracker = StateTracker(d)
        states.append([copy.copy(tracker.update(k, t)) for k, t in enumerate(microturns(d))])
    fused_params = RuleParams.from_settings(Settings(policy="fused"))
    fused = score(dialogues, run_policy(lambda: RuleBasedPolicy(fused_params), dialogues))
    naive = score(dialogues, decode_offline(dialogues, probs, states, DecodeParams()))
    assert caller_errors(naive)["false_yield_rate"] > caller_errors(fused)["false_yield_rate"]

    params, _, met = calibrate(dialogues, probs, states, baseline=fused)
    chosen = caller_errors(score(dialogues, decode_offline(dialogues, probs, states, params)))
    assert met and params.min_overlap_ms > 0
    bound = caller_errors(fused)
    assert all(chosen[k] <= bound[k] + 1e-9 for k in bound), (chosen, bound)


def test_train_then_set_thresholds_again_from_the_checkpoint(
    tmp_path: Path,
    dialogues,  # type: ignore[no-untyped-def]
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``presence train-interaction`` end to end on a tiny model, then ``--from`` on its
    checkpoint: no training, the thresholds chosen again on the same validation call, the
    checkpoint and its metrics written where asked."""
    import json

    from presence.model.train import main

    # The held-out split is the fixture's (cached); five short training calls, one kept back.
    data = ["--size", "tiny", "--seconds", "30", "--seed", "7", "--espeak-only"]
    data += ["--train-dialogues", "5", "--heldout-dialogues", "2", "--val-dialogues", "1"]
    assert main([*data, "--steps", "3", "--batch", "2", "--seq", "8", "--out", str(tmp_path / "a")]) == 0
    first = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert first["train"]["steps"] == 3 and set(first["heldout"]) >= {"model", "fused (the default)"}
    capsys.readouterr()
    assert main([*data, "--from", str(tmp_path / "a"), "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "decoding thresholds from 1 validation calls" in out and '{"step"' not in out
    again = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert again["train"]["steps"] == 3  # the checkpoint's own training, not a new one
    assert again["decode_params"] == first["decode_params"]  # same model, same calls, same choice
    assert isinstance(again["decode_no_worse_than_fused_on_validation"], bool)
    reloaded = load_pretrained(str(tmp_path / "b"))
    assert reloaded.config.decode_params == again["decode_params"]


def test_micro_turns_fall_on_one_grid() -> None:
    step = 0.2
    starts = [12.0137, 12.1999, 12.2, 12.3873]  # calls that began at any phase
    ticks = [on_grid(t + step, step) for t in starts]
    assert all(abs(t / step - round(t / step)) < 1e-9 for t in ticks)
    assert all(step <= tick - t < 2 * step + 1e-9 for tick, t in zip(ticks, starts, strict=True))


async def test_a_checkpoint_trained_here_drives_a_live_call(
    tmp_path: Path,
    dialogues,
    bot_factory,
    speech,  # type: ignore[no-untyped-def]
) -> None:
    torch.manual_seed(0)
    config = make_config("tiny", teacher_head=True)
    model = PresenceInteractionModel(config)
    info = train(
        model,
        dialogues,
        device=torch.device("cpu"),
        minutes=1.0,
        max_steps=15,
        batch=4,
        seq=16,
        lr=3e-3,
        seed=0,
    )
    assert info["steps"] == 15 and all(np.isfinite(row["loss"]) for row in info["history"])
    assert info["history"][-1]["teacher"] is not None  # the distillation head was trained
    out = tmp_path / "tiny-checkpoint"
    model.save_pretrained(str(out))
    # transformers' own Auto classes, offline: the architecture is registered, no remote code.
    assert AutoConfig.from_pretrained(str(out), local_files_only=True).model_type == "presence_interaction"
    assert isinstance(AutoModel.from_pretrained(str(out), local_files_only=True), PresenceInteractionModel)
    assert isinstance(load_pretrained(out), PresenceInteractionModel)
    with pytest.raises(FileNotFoundError, match="interaction_model"):
        load_pretrained(tmp_path / "nothing-here")

    server: BotServer = await bot_factory(policy="model", interaction_model=str(out))
    scheduler = shared_scheduler(str(out))
    before = scheduler.stats.requests
    callers = [Caller(url=server.url, name=f"c{i}") for i in range(2)]
    try:
        for caller in callers:
            await caller.connect()
        await callers[0].say(speech("Please tell me what the weather is like today."), SR_OUT)
        sessions = list(server.manager.sessions.values())
        assert len(sessions) == 2
        for _ in range(100):  # every micro-turn of each call goes through the model's forward
            if all(sum(s.engine.actions.values()) >= 15 for s in sessions):
                break
            await asyncio.sleep(0.1)
        assert all(sum(s.engine.actions.values()) >= 15 for s in sessions), [
            s.engine.actions for s in sessions
        ]
        assert scheduler.stats.requests - before >= 20
        # Two calls on one grid: most forwards served both at once.
        assert scheduler.stats.sizes[2] >= scheduler.stats.batches // 2, scheduler.stats
        async with aiohttp.ClientSession() as http, http.get(server.url + "/metrics") as resp:
            text = await resp.text()
        assert 'presence_model_batch_size_bucket{le="2"}' in text, text[-2000:]
    finally:
        for caller in callers:
            await caller.hangup()
    await asyncio.sleep(0.3)
    assert scheduler.streamer.active_slots == []
