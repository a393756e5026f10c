"""Full-Duplex-Bench-style measurement of a live bot over real WebRTC.

* :mod:`.stimuli` writes deterministic stimuli (``<out>/<category>/<id>/input.wav`` + ``meta.json``)
  from the offline voices (Piper, espeak-ng, flite).
* :mod:`.runner` plays one to a bot in real time with :class:`presence.caller.Caller` (or headless
  Chromium, :mod:`.chromium`), injects
  interruptions / backchannels / side talk live on the bot's events, records ``output.wav`` (as
  long as the input) and ``events.json``.
* :mod:`.metrics` holds the FDB v1 / v1.5, FD-Bench and engineering metrics as pure functions;
  :mod:`.score` turns recordings into their inputs (whisper tiny.en words, Silero segments).
* :mod:`.report` writes report.json, report.md and plots; :mod:`.cli` runs it all
  (``presence bench fdb``); :mod:`.echo` and :mod:`.calibrate` check the harness against an echo
  bot with a known delay.
"""
