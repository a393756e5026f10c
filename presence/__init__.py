"""Presence: a real-time, full-duplex call bot."""

__version__ = "0.1.0"
