"""The meeting transcript: speaker names, "what did I miss?", notes (no network, no models)."""

from __future__ import annotations

from presence.bot.meeting import MeetingLog
from presence.events import Ev
from presence.seams import CallEvent


def ev(name: str, t: float, **data: object) -> CallEvent:
    return CallEvent(name=name, t=t, call_id="c", data=data)


def test_a_late_joiner_hears_what_the_others_said_since_they_joined() -> None:
    log = MeetingLog("Presence")
    log.on_event(ev(Ev.PARTICIPANT_JOINED, 0.0, participant="alice"))
    log.on_event(ev(Ev.PARTICIPANT_JOINED, 0.0, participant="bob"))
    log.on_event(ev(Ev.NOT_ADDRESSED, 1.0, text="the budget is due on friday", speaker="alice"))
    log.on_event(ev(Ev.PARTICIPANT_JOINED, 2.0, participant="carol"))
    log.on_event(ev(Ev.NOT_ADDRESSED, 3.0, text="I will send the slides tonight", speaker="bob"))
    log.on_event(
        ev(Ev.CAPTION, 4.0, who="caller", final=True, text="Presence, what is the date?", speaker="alice")
    )
    log.on_event(ev(Ev.CAPTION, 5.0, who="bot", final=True, text="It is the first of December."))
    recap = log.recap("carol", "Presence, what did I miss?")
    assert recap is not None
    assert "bob said I will send the slides tonight" in recap
    assert "alice said Presence, what is the date?" in recap
    assert "budget" not in recap  # said before carol joined
    assert "first of December" not in recap  # the bot's own words are no news
    assert log.recap("carol", "Presence, what time is it?") is None  # not that question


def test_since_the_askers_own_last_words_and_nothing_new() -> None:
    log = MeetingLog("Presence")
    log.on_event(ev(Ev.PARTICIPANT_JOINED, 0.0, participant="alice"))
    log.on_event(ev(Ev.NOT_ADDRESSED, 1.0, text="first point", speaker="bob"))
    log.on_event(ev(Ev.NOT_ADDRESSED, 2.0, text="I have to step out", speaker="alice"))
    log.on_event(ev(Ev.NOT_ADDRESSED, 3.0, text="second point", speaker="bob"))
    recap = log.recap("alice", "catch me up please")
    assert recap is not None and "second point" in recap and "first point" not in recap
    assert (
        log.recap("bob", "what did I miss") == "Nothing much: nobody has said anything since you last spoke."
    )


def test_the_final_pass_does_not_double_a_line_and_notes_hold_everyone() -> None:
    log = MeetingLog("Presence")
    log.on_event(ev(Ev.CAPTION, 1.0, who="caller", final=True, text="hello there", speaker="dan"))
    log.on_event(
        ev(Ev.CAPTION, 1.5, who="caller", final=True, text="hello there", pass_="final", speaker="dan")
    )
    log.on_event(ev(Ev.CAPTION, 2.0, who="caller", final=False, text="partial", speaker="dan"))
    assert [line.text for line in log.lines] == ["hello there"]
    notes = log.notes("Decided: ship it.")
    assert "Participants: dan" in notes and "## Summary" in notes and "[00:00] dan: hello there" in notes
    assert "hello there" in log.notes_prompt()["prompt"]


def test_the_transcript_is_bounded() -> None:
    log = MeetingLog("Presence", keep=10)
    for i in range(50):
        log.on_event(ev(Ev.NOT_ADDRESSED, float(i), text=f"line {i}", speaker="x"))
    assert len(log.lines) == 10 and log.lines[0].text == "line 40"
