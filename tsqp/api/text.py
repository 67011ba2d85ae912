"""Generated token ids to text pieces for a stream: whole characters only, and stop strings cut out.

Each new token decodes the whole sequence (multi-token characters and word spacing come out right);
a piece that ends inside a UTF-8 character waits for the next token. Text that may still turn into a
stop string is held back until it cannot, so a streamed answer is the non-streamed one cut into
pieces, never text past a stop string. The API's streams and `tsqp generate`'s (no stop strings) use it.
"""

from __future__ import annotations


class TextPieces:
    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""  # decoded so far (cut at a stop string once one is seen)
        self.sent = 0  # characters of text handed out
        self.stopped = False  # a stop string was seen: generation should end

    def push(self, token: int) -> str:
        """The text that can be sent after this token ('' while a character or a stop string is unfinished)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            return self._take(cut)
        self.text = text
        return self._take(len(text) - self._held(text))

    def finish(self) -> str:
        """What is left once generation ended (text held back for a stop string that never came)."""
        if not self.stopped and self.ids:
            self.text = self.tokenizer.decode(self.ids)
        return self._take(len(self.text))

    def _held(self, text: str) -> int:
        """Length of the longest end of text that begins some stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def _take(self, end: int) -> str:
        end = max(end, self.sent)
        piece, self.sent = self.text[self.sent : end], end
        return piece
