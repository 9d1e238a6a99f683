"""Incremental detokenization with stop strings, for the serving engine (one per request).

    stream = TextStream(tokenizer, stop=("\\n\\n",))
    for token in tokens:
        print(stream.push(token), end="")     # text that can no longer change
        if stream.stopped:
            break
    print(stream.flush())                     # the rest, at the end
"""

from __future__ import annotations

import os
from typing import Any


class TextStream:
    """Incremental detokenization of one sequence, with stop strings.

    A token costs two decodes of a few tokens as a rule, not of the whole answer (which would
    be O(n) per token, O(n^2) per answer): the new text is decode(ids[prefix:]) minus
    decode(ids[prefix:read]), where ids[prefix:read] are the last tokens already turned into
    text (kept as context, so a tokenizer that drops a word's leading space at the start of a
    decode still gives it here). A decode that ends in an incomplete character ("\\ufffd")
    waits for the next token (the window grows until it is complete). A tokenizer whose
    decode of the window does not extend the window's context is compared on whole decodes
    instead; if it changes text already released, the stream goes on from where the two agree
    (what was released stays released).

    Text is released only once it cannot change any more: a tail that may still grow into a
    stop string (a prefix of one) is held back until the next token settles it.

    Args:
        tokenizer: Anything with `decode(ids, skip_special_tokens=...)`.
        stop: Stop strings; the text ends before the first one found.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""  # the text of ids[:read]
        self.shown = 0  # characters of `text` already released
        self.stopped = False
        self._prefix = 0  # ids[prefix:read]: the context the next decode starts from
        self._read = 0  # ids[:read] are in `text`

    def push(self, token_id: int) -> str:
        """Add a token; returns the newly released text. Sets `stopped` when a stop string appears."""
        self.ids.append(token_id)
        self.text += self._new_text(final=False)
        # A stop string cannot start before `shown`: any prefix of one at the end was held back.
        found = [i for i in (self.text.find(s, self.shown) for s in self.stop) if i >= 0]
        if found:
            self.stopped = True
            return self._release(min(found))
        return self._release(len(self.text) - self._held_back())

    def flush(self) -> str:
        """The rest of the text (up to the stop string, if one was found)."""
        if self.stopped:
            return ""
        self.text += self._new_text(final=True)
        return self._release(len(self.text))

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _new_text(self, final: bool) -> str:
        """The text the tokens after `read` add; "" while it ends in an incomplete character
        (unless `final`: the answer then ends as a whole decode would)."""
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if not after.startswith(before):  # a tokenizer whose context reaches further back:
            before, after = self.text, self._decode(self.ids)  # compare whole texts instead
            if not after.startswith(before):  # it rewrote text already there: keep what was
                cut = max(len(os.path.commonprefix([before, after])), self.shown)  # released and
                self.text = before = self.text[:cut]  # go on from there with the new decode
        if len(after) == len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return after[len(before):]

    def _held_back(self) -> int:
        return max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)

    def _release(self, end: int) -> str:
        if end <= self.shown:
            return ""
        released, self.shown = self.text[self.shown:end], end
        return released
