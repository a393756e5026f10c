"""Meetings on a Janus WebRTC server (VideoRoom plugin)."""
