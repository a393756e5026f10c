"""The call's reply context: bounded, summarised in the background, with a stable front."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Sequence

import pytest

from presence.bot.backends.llama import build_fewshot_prompt
from presence.bot.context import Conversation, extractive_summary
from presence.seams import ChatMessage


def exchange(i: int) -> list[ChatMessage]:
    return [ChatMessage("user", f"Question number {i}?"), ChatMessage("assistant", f"Answer number {i}.")]


def test_between_folds_each_prompt_extends_the_previous_one() -> None:
    conv = Conversation("Be brief.", keep=24, fold=12)
    prompts = []
    for i in range(11):  # 22 messages: no fold is due yet
        for message in exchange(i):
            conv.append(message)
            assert conv.step() is None
        prompts.append(build_fewshot_prompt(conv.messages()).removesuffix("Presence:"))
    for before, after in itertools.pairwise(prompts):
        assert after.startswith(before)  # llama.cpp's prompt cache covers all of `before`


async def test_a_fold_runs_in_the_background_and_bounds_the_context() -> None:
    threads: list[str] = []

    def summarize(summary: str, messages: Sequence[ChatMessage]) -> str:
        threads.append(threading.current_thread().name)
        return extractive_summary(summary, messages)

    conv = Conversation("Be brief.", keep=8, fold=4, summarize=summarize)
    conv.append(ChatMessage("user", "Hi, my name is Ada and I live in Leeds."))
    conv.append(ChatMessage("assistant", "Hello Ada!"))
    for i in range(40):
        for message in exchange(i):
            conv.append(message)
            fold = conv.step()
            if fold is not None:
                assert conv.step() is None  # one fold at a time
                await conv.run(fold)
        assert len(conv.recent) <= 9
    assert threads and threading.main_thread().name not in threads
    summary = conv.messages()[1]
    assert summary.role == "system"
    assert "my name is Ada" in summary.content  # the caller's facts outlive their turns
    assert "Question number 3" in summary.content or "Question number 35" in summary.content
    assert len(summary.content.split()) < 120  # bounded however long the call
    # The Gemma prompt shows the summary as a note after the examples, not in the header.
    prompt = build_fewshot_prompt(conv.messages())
    assert prompt.startswith("Be brief.\n")
    assert "(Note for Presence: Earlier in this call:" in prompt


async def test_a_failing_summarizer_keeps_turns_verbatim_and_the_context_bounded() -> None:
    def broken(summary: str, messages: Sequence[ChatMessage]) -> str:
        raise RuntimeError("model unavailable")

    conv = Conversation("Be brief.", keep=4, fold=2, summarize=broken)
    for i in range(20):
        for message in exchange(i):
            conv.append(message)
            fold = conv.step()
            if fold is not None:
                await conv.run(fold)
    assert conv.summary == ""
    assert len(conv.recent) == 8  # capped at twice keep
    assert conv.recent[-1].content == "Answer number 19."


async def test_a_cancelled_fold_leaves_the_messages_in_place() -> None:
    gate = threading.Event()

    def slow(summary: str, messages: Sequence[ChatMessage]) -> str:
        gate.wait(5)
        return "Earlier in this call: asked: x"

    conv = Conversation("Be brief.", keep=2, fold=2, summarize=slow)
    for message in exchange(0) + exchange(1):
        conv.append(message)
    fold = conv.step()
    assert fold is not None
    task = asyncio.create_task(conv.run(fold))
    await asyncio.sleep(0.05)
    task.cancel()
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert conv.summary == "" and len(conv.recent) == 4
    assert conv.step() is not None  # due again


def test_the_final_pass_replaces_a_turn_until_it_is_folded() -> None:
    conv = Conversation("Be brief.", keep=2, fold=2)
    mid = conv.append(ChatMessage("user", "presents to what time is it"))
    assert conv.replace(mid, ChatMessage("user", "Presence, what time is it?"))
    assert conv.recent[0].content == "Presence, what time is it?"
    assert not conv.replace(mid, ChatMessage("assistant", "wrong role"))
    conv.append(ChatMessage("assistant", "It's noon."))
    conv.append(ChatMessage("user", "Thanks."))
    fold = conv.step()
    assert fold is not None
    conv.apply(fold, extractive_summary(fold.summary, fold.messages))
    assert not conv.replace(mid, ChatMessage("user", "too late"))
    assert "what time is it (you said It's noon)" in conv.summary


def test_the_summary_keeps_the_newest_topics() -> None:
    summary = ""
    for i in range(30):
        summary = extractive_summary(summary, exchange(i))
    assert "Question number 29" in summary and "Question number 23" not in summary
    assert extractive_summary("", []) == ""
    with pytest.raises(ValueError):
        Conversation("x", keep=2, fold=3)
