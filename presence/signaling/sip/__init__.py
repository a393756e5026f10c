"""SIP: the user agent, its dialogs and the SDP of plain RTP calls."""
