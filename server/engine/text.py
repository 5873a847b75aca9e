"""Turn generated token ids into text deltas, cut at stop strings as OpenAI does.

Decoding token by token is wrong for tokenizers that merge spaces or split one UTF-8
character over several byte tokens. :class:`TextAssembler` decodes a short window of
recent tokens and emits only the text past the previous window, and it holds back a
tail that ends in an incomplete character or could still grow into a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

_INCOMPLETE = "\ufffd"


class TextAssembler:
    """The text of one generation, built from its tokens, with the stop strings applied.

    Args:
        tokenizer: a Hugging Face tokenizer.
        stop: strings that end the generation; the text returned stops before the first one.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.token_ids: list[int] = []
        self.text = ""
        self.stopped = False
        self._prefix_offset = 0
        self._read_offset = 0
        self._emitted = 0

    def add_token(self, token_id: int) -> str:
        """Add one generated token and return the new text that is safe to show (maybe empty).

        After a stop string appears, ``stopped`` is True, ``text`` ends before it and the
        return value is whatever text before it had not been shown yet.
        """
        self.token_ids.append(token_id)
        delta = self._decode_delta(final=False)
        if delta:
            self._append(delta)
        return self._pending(final=self.stopped)

    def finish(self) -> str:
        """Flush the held-back text at the end of the generation and return it."""
        if not self.stopped:
            delta = self._decode_delta(final=True)
            if delta:
                self._append(delta)
        return self._pending(final=True)

    def _decode_delta(self, final: bool) -> str:
        # Decoding a few tokens before the new ones keeps the spacing that some tokenizers
        # derive from the previous token.
        window = self.token_ids[self._prefix_offset :]
        prefix_text = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(window)
        if len(new_text) <= len(prefix_text) or (new_text.endswith(_INCOMPLETE) and not final):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.token_ids)
        return new_text[len(prefix_text) :]

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True) if token_ids else ""

    def _append(self, delta: str) -> None:
        # A stop string can begin in text added earlier, so search from the longest stop back.
        search_from = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self.text += delta
        cut = min((i for s in self.stop if (i := self.text.find(s, search_from)) >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            self.stopped = True

    def _pending(self, final: bool) -> str:
        end = len(self.text) if final else len(self.text) - self._stop_prefix_length()
        if end <= self._emitted:
            return ""
        pending = self.text[self._emitted : end]
        self._emitted = end
        return pending

    def _stop_prefix_length(self) -> int:
        """Length of the longest tail of ``text`` that is the start of a stop string."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
