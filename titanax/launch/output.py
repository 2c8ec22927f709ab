"""The output of ``titanax launch``: every process's text, prefixed by its rank.

One reader writes what one read returns at once, so the lines a process writes together
are never split by another's; JAX's ``[Gloo] Rank N is connected`` messages are dropped
(also where two were written into each other, or into a line); progress bars (text
redrawn after ``\\r``) show from the ranks asked for, redrawn in place on a terminal,
otherwise one line every `STATUS_EVERY_S` seconds and their last state.
"""

from __future__ import annotations

import codecs
import math
import re
from typing import IO

__all__ = ["Output", "STATUS_EVERY_S"]

STATUS_EVERY_S = 30.0  # progress bars, when the output is not a terminal


# JAX's gloo prints one of these per device and process (C++ std::cout, from several threads,
# so two may be written into each other). Measured on jax 0.10.2.
_GLOO = re.compile(
    r"\[Gloo\] Rank \d+ is connected to \d+ peer ranks\. "
    r"Expected number of connected peer ranks is : \d+\n"
)
_GLOO_PIECES = re.compile(
    r"(?:\[Gloo\] Rank | is connected to | peer ranks\. "
    r"|Expected number of connected peer ranks is : |\d+)+"
)
_SEGMENT = re.compile(r"([^\r\n]*)(\r\n|\n|\r)")


class Output:
    """The processes' output, prefixed by rank: lines, and progress bars (text after ``\\r``)."""

    def __init__(self, out: IO[str], nproc: int, all_progress: bool):
        self.out = out
        try:
            self.tty = out.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self.bars = set(range(nproc)) if all_progress else {0}
        self.text = [""] * nproc  # the unfinished segment
        self.decoders = [codecs.getincrementaldecoder("utf-8")("replace") for _ in range(nproc)]
        self.after_cr = [False] * nproc  # the unfinished segment began after a '\r'
        self.pending: list[str | None] = [None] * nproc  # a bar state not shown yet
        self.shown: list[str | None] = [None] * nproc  # the bar state shown last
        self.shown_at = [-math.inf] * nproc
        self.live: tuple[int, str] | None = None  # on a terminal: the bar to keep drawn
        self.drawn: str | None = None  # what is drawn on the last line now
        self.broken = False

    def launch(self, text: str) -> None:
        self.write(["[launch] " + text])

    def feed(self, rank: int, data: bytes, now: float) -> None:
        """Takes what ``rank`` wrote (``b""``: its end) and writes out what is complete."""
        final = not data
        text = self.text[rank] + self.decoders[rank].decode(data, final=final)
        while (kept := _GLOO.sub("", text)) != text:  # also mends a line one was written into
            text = kept
        held = "\r" if text.endswith("\r") and not final else ""  # perhaps half of a "\r\n"
        text = text[: len(text) - len(held)]
        lines: list[str] = []
        bar: str | None = None
        end = 0
        for m in _SEGMENT.finditer(text):
            body, cr, end = m.group(1), m.group(2) == "\r", m.end()
            after_cr, self.after_cr[rank] = self.after_cr[rank], cr
            if cr:
                bar = body if body.strip() else bar
            elif after_cr and body.strip():  # a bar's last state
                bar = None
                lines += self.last_bar(rank, body)
            elif not (_GLOO_PIECES.fullmatch(body) and ("[Gloo]" in body or "peer" in body)):
                lines.append(body)
        rest = text[end:]
        if self.after_cr[rank] and rest.strip():
            bar = rest  # being drawn
        if final:  # the process's output ended: what is left, and where its bar was
            if rest and not self.after_cr[rank]:
                lines.append(rest)
            live = self.live[1] if self.live and self.live[0] == rank else None
            last = bar or self.pending[rank] or live
            lines += self.last_bar(rank, last) if last and last != self.shown[rank] else []
            rest, bar = "", None
        elif bar is not None and rank in self.bars:
            lines += self.show_bar(rank, bar, now)
        self.text[rank] = rest + held
        self.write([f"[{rank}] {line}" for line in lines])

    def last_bar(self, rank: int, body: str) -> list[str]:
        """A bar's last state: a line (if this rank's bars show); its next bar starts afresh."""
        self.pending[rank], self.shown[rank], self.shown_at[rank] = None, None, -math.inf
        if self.live is not None and self.live[0] == rank:
            self.live = None
        return [body] if rank in self.bars else []

    def show_bar(self, rank: int, bar: str, now: float) -> list[str]:
        if self.tty:
            self.live = (rank, bar)
            return []
        if bar == self.shown[rank]:
            return []
        if now - self.shown_at[rank] < STATUS_EVERY_S:
            self.pending[rank] = bar
            return []
        self.pending[rank], self.shown[rank], self.shown_at[rank] = None, bar, now
        return [bar]

    def write(self, lines: list[str]) -> None:
        """Writes ``lines`` at once; on a terminal, the live bar stays last, redrawn."""
        text = "".join(line + "\n" for line in lines)
        if self.tty:
            live = f"[{self.live[0]}] {self.live[1]}" if self.live else None
            if not text and live == self.drawn:
                return
            text = ("\r\x1b[K" if self.drawn else "") + text + (live or "")
            self.drawn = live
        if self.broken or not text:
            return
        try:
            self.out.write(text)
            self.out.flush()
        except (OSError, ValueError):  # the reader went away: keep reading the processes
            self.broken = True
