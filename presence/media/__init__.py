"""Media in and out: inbound readers, the micro-turn assembler, the paced speech track."""
