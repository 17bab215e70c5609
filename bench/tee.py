"""``Tee``: a text stream that writes to several streams (the console and a run step's log),
shared by the experiment runners in ``examples/experiments/``."""

from __future__ import annotations


class Tee:
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self):
        for s in self.streams:
            s.flush()

    def isatty(self):
        return False
