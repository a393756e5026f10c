"""Voice-to-voice latency of one reply as the bot sees it, with its breakdown by stage."""

from __future__ import annotations

from presence.events import Ev, EventLog


def report_voice_to_voice(events: EventLog, end: float, first_packet: float, utterance: str) -> float:
    """Emit ``latency`` events from the caller's last voiced frame (``end``) to each stage of
    the reply (decision, first token, first audio, first packet); returns voice-to-voice (s)."""
    marks = {"voice_to_voice": first_packet}
    decided = events.first(Ev.END_OF_TURN_DECIDED, after=end)
    if decided is not None:
        marks[str(Ev.END_OF_TURN_DECIDED)] = decided.t
    for name in (Ev.RESPONDER_FIRST_TOKEN, Ev.TTS_FIRST_AUDIO):
        mine = [e for e in events.named(name) if e.data.get("utterance") == utterance]
        if mine:
            marks[str(name)] = mine[0].t
    for name, t in marks.items():
        events.emit(Ev.LATENCY, metric=name, ms=round((t - end) * 1000, 1))
    return first_packet - end
