"""Offline backends behind the protocols in :mod:`presence.seams` (VAD, ASR, TTS, responders).

Each backend lives in its own module and is chosen from the settings in one place:
:func:`presence.bot.backends.factory.build_backends`.
"""
