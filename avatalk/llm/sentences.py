"""Cut a streamed LLM reply into speakable sentences.

TTS is started per sentence, so a sentence must be handed over as soon as it
is known to be complete: that is the first-audio latency of every reply. A
sentence end is confirmed by the whitespace after its final punctuation (so
"3.5" and "e.g. this" are not cut), very short sentences are merged with the
next one (TTS prosody is poor on "Sure." alone, and each call has overhead),
and over-long ones are cut at a clause boundary so audio never waits for a
rambling sentence to finish. Markdown and emojis, which TTS would read aloud
or choke on, are removed from what is handed over.

The cut points depend only on the text, never on how it was split into
deltas: feeding a reply character by character gives the same sentences as
feeding it whole.
"""

from __future__ import annotations

import re

# Final punctuation (a run of it), then closing quotes/brackets or markdown
# emphasis, confirmed by whitespace after it, or at the end once flushing.
_SENTENCE_END = re.compile(r"[.!?…]+[\"'”’»)\]*_`]*(?=\s)")
_SENTENCE_END_FINAL = re.compile(r"[.!?…]+[\"'”’»)\]*_`]*(?=\s|\Z)")
_LAST_WORD = re.compile(r"(\S+)\Z")
_CLAUSE_END = re.compile(r"[,;:—–](?=\s)|[—–]")

# Words that end with a dot but rarely end a sentence.
_ABBREVIATIONS = frozenset(
    {
        "mr",
        "mrs",
        "ms",
        "dr",
        "prof",
        "sr",
        "jr",
        "st",
        "mt",
        "vs",
        "approx",
        "fig",
        "inc",
        "ltd",
        "co",
        "corp",
        "dept",
        "gen",
        "gov",
        "lt",
        "col",
        "capt",
        "sgt",
        "rev",
        "hon",
        "cf",
        "al",
    }
)
_DOTTED_INITIALS = re.compile(r"(?:[A-Za-z]\.)+[A-Za-z]")  # e.g, i.e, U.S, p.m

_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
_LINE_MARKUP = re.compile(r"^[ \t]*(?:[-_=*]{3,}[ \t]*$|#+[ \t]*|>+[ \t]*|[-*+•][ \t]+|\d+[.)][ \t]+)", re.MULTILINE)
_INLINE_MARKUP = re.compile(r"[*`~]+|_+")
_EMOJI = re.compile(
    "["
    "\U0001f000-\U0001faff"  # emoticons, pictographs, transport, flags, ...
    "\U00002600-\U000027bf"  # miscellaneous symbols and dingbats
    "\U00002b00-\U00002bff"  # stars, arrows used as emoji
    "\U0000fe00-\U0000fe0f"  # variation selectors
    "\U0000200d"  # zero-width joiner
    "\U000e0020-\U000e007f"  # tag characters (subdivision flags)
    "]+"
)


def clean_for_speech(text: str) -> str:
    """``text`` without markdown symbols, list bullets and emojis, on one line.

    Returns "" when nothing speakable (no letter or digit) is left.
    """
    text = _LINK.sub(r"\1", text)
    text = _LINE_MARKUP.sub("", text)
    text = _INLINE_MARKUP.sub(" ", text)
    text = _EMOJI.sub(" ", text)
    text = " ".join(text.split())
    # Markup removal can leave a space before punctuation ("**Yes**." -> "Yes .").
    text = re.sub(r" (?=[.,;:!?…])", "", text)
    return text if any(char.isalnum() for char in text) else ""


class SentenceSplitter:
    """Incremental sentence splitter for one reply; create one per reply."""

    def __init__(self, min_chars: int = 12, max_chars: int = 160) -> None:
        """Sentences shorter than ``min_chars`` are merged; longer than ``max_chars`` split."""
        if max_chars <= min_chars:
            raise ValueError(f"max_chars ({max_chars}) must exceed min_chars ({min_chars})")
        self.min_chars = min_chars
        self.max_chars = max_chars
        self._buffer = ""

    def push(self, delta: str) -> list[str]:
        """Add a text delta; return the sentences it completed (often none)."""
        self._buffer += delta
        return self._drain(final=False)

    def flush(self) -> list[str]:
        """End of the reply: return the remaining text as sentences."""
        return self._drain(final=True)

    def _drain(self, *, final: bool) -> list[str]:
        sentences = []
        while True:
            cut = self._next_cut(final=final)
            if cut is None:
                break
            sentence = clean_for_speech(self._buffer[:cut])
            self._buffer = self._buffer[cut:]
            if sentence:
                sentences.append(sentence)
        if final:
            self._buffer = ""
        return sentences

    def _next_cut(self, *, final: bool) -> int | None:
        """Where the next sentence ends in the buffer, or None if not known yet."""
        buffer = self._buffer
        if not buffer:
            return None
        for end in self._sentence_ends(final=final):
            if end > self.max_chars:
                break
            if len(clean_for_speech(buffer[:end])) >= self.min_chars:
                return end
        if len(buffer) > self.max_chars:
            return self._long_sentence_cut()
        if final:
            return len(buffer)
        return None

    def _sentence_ends(self, *, final: bool) -> list[int]:
        """Confirmed sentence ends in the buffer (positions just after them), in order."""
        buffer = self._buffer
        pattern = _SENTENCE_END_FINAL if final else _SENTENCE_END
        ends = [match.end() for match in pattern.finditer(buffer) if not self._is_abbreviation(match)]
        ends.extend(index for index, char in enumerate(buffer) if char == "\n")
        return sorted(ends)

    def _is_abbreviation(self, match: re.Match[str]) -> bool:
        """Whether a single dot ends an abbreviation, an initial or a list number."""
        if not match.group().startswith(".") or match.group().startswith(".."):
            return False
        before = self._buffer[: match.start()]
        word_match = _LAST_WORD.search(before)
        if word_match is None:
            return False
        word = word_match.group(1).lstrip("\"'“‘«([*_`")
        if word.lower() in _ABBREVIATIONS or _DOTTED_INITIALS.fullmatch(word):
            return True
        if len(word) == 1 and word.isupper():  # an initial: "J. Smith"
            return True
        # "1." at the start of a line is a list item number, not a sentence.
        line_start = before[: word_match.start()].rsplit("\n", 1)[-1]
        return word.isdigit() and not line_start.strip()

    def _long_sentence_cut(self) -> int:
        """Cut point for text over ``max_chars`` with no sentence end in reach.

        The last clause boundary within ``max_chars`` (keeping at least
        ``min_chars``), else the last space, else a hard cut.
        """
        window = self._buffer[: self.max_chars + 1]
        clause_ends = [
            match.end() for match in _CLAUSE_END.finditer(window) if self.min_chars <= match.end() <= self.max_chars
        ]
        if clause_ends:
            return clause_ends[-1]
        space = window.rfind(" ", self.min_chars)
        if space > 0:
            return space
        return self.max_chars
