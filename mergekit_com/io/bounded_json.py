"""Calibration records read in bounded memory, however large one record is.

Only the first ``budget`` characters of a record's text can ever reach the
model (``max_seq_len`` tokens), so a record larger than a few times that is
parsed from a stream of small chunks: the fields the records are read from
(``text`` and ``messages``, or those a ``calibration_column`` or
``calibration_template`` names) are kept, cut to the budget; every other field
is checked as JSON and dropped. Memory stays proportional to the budget, not to the record. Records
of ordinary size never come here: ``json.loads`` reads them (its error
messages name the column).
"""

from __future__ import annotations

import codecs
import re
from json.decoder import scanstring
from typing import Any, Callable, Iterator, List, Sequence

CHUNK = 1 << 16
NAN, INF = float("nan"), float("inf")
RECORD_KEYS = ("text", "messages")  # the fields of a record kept by default
MESSAGE_KEYS = ("role", "content")  # a chat message's: kept even past the budget
MAX_KEY, MAX_NUMBER, MAX_DEPTH = 256, 400, 200
_STRING_STOP = re.compile(r'["\\\x00-\x1f]')
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
_WS = re.compile(r"[ \t\n\r]*")


BLANK = object()  # parse_record's answer for a line with nothing on it


class JsonSyntaxError(ValueError):
    def __init__(self, msg: str, column: int):
        super().__init__(f"{msg} at column {column}")
        self.msg, self.colno = msg, column


class _Stream:
    """Characters from ``read()`` (which returns '' at the end), in a small window."""

    def __init__(self, read: Callable[[], str]):
        self.read, self.buf, self.pos, self.base, self.ended = read, "", 0, 0, False

    def more(self, need: int = 1) -> bool:
        """At least ``need`` characters after the cursor, unless the input ends."""
        while len(self.buf) - self.pos < need and not self.ended:
            chunk = self.read()
            if not chunk:
                self.ended = True
                break
            self.base += self.pos
            self.buf, self.pos = self.buf[self.pos:] + chunk, 0
        return len(self.buf) - self.pos >= need

    def peek(self) -> str:
        return self.buf[self.pos] if self.more() else ""

    def column(self) -> int:
        return self.base + self.pos + 1

    def fail(self, msg: str):
        raise JsonSyntaxError(msg, self.column())

    def skip_ws(self) -> None:
        while self.more():
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return

    def empty(self, closer: str) -> bool:
        """At an opening bracket: consume it; True (closer consumed too) if nothing is inside."""
        self.pos += 1
        self.skip_ws()
        if self.peek() == closer:
            self.pos += 1
            return True
        return False

    def another(self, closer: str) -> bool:
        """After an array or object item: True on ',', False on ``closer`` (both consumed)."""
        self.skip_ws()
        c = self.peek()
        if c not in (",", closer):
            self.fail("Expecting ',' delimiter")
        self.pos += 1
        return c == ","

    def expect(self, char: str, what: str) -> None:
        self.skip_ws()
        if self.peek() != char:
            self.fail(f"Expecting {what}")
        self.pos += 1


class _Parser:
    def __init__(self, stream: _Stream, budget: int, keys: Sequence[str] = RECORD_KEYS):
        self.s, self.left, self.keys = stream, budget, keys

    def value(self, keep: bool, depth: int = 0) -> Any:
        s = self.s
        if depth > MAX_DEPTH:
            raise RecursionError
        s.skip_ws()
        c = s.peek()
        if c == "{":
            return self.obj(keep, depth)
        if c == "[":
            return self.array(keep, depth)
        if c == '"':
            return self.string(self.left if keep else 0)
        # as json.loads: NaN and the infinities too
        for literal, value in (("true", True), ("false", False), ("null", None), ("NaN", NAN),
                               ("Infinity", INF), ("-Infinity", -INF)):
            if c == literal[0]:
                s.more(len(literal))
                if s.buf.startswith(literal, s.pos):
                    s.pos += len(literal)
                    return value
        s.more(MAX_NUMBER + 1)
        number = _NUMBER.match(s.buf, s.pos)
        if not number:
            s.fail("Expecting value")
        if number.end() - s.pos > MAX_NUMBER:
            s.fail(f"Number longer than {MAX_NUMBER} characters")
        s.pos = number.end()
        text = number.group()
        return float(text) if any(ch in text for ch in ".eE") else int(text)

    def string(self, limit: int, counted: bool = True) -> str:
        """A string, of which at most ``limit`` characters (of its JSON text) are kept."""
        s = self.s
        s.pos += 1  # the opening quote
        kept: List[str] = []
        size = 0
        while True:
            if not s.more():
                s.fail("Unterminated string")
            stop = _STRING_STOP.search(s.buf, s.pos)
            end = stop.start() if stop else len(s.buf)
            take = min(end - s.pos, limit - size)
            if take > 0:
                kept.append(s.buf[s.pos:s.pos + take])
                size += take
            s.pos = end
            if not stop:
                continue
            c = s.buf[s.pos]
            if c == '"':
                s.pos += 1
                break
            if c != "\\":
                s.fail("Invalid control character")
            s.more(6)
            escape = s.buf[s.pos:s.pos + (6 if s.buf[s.pos + 1:s.pos + 2] == "u" else 2)]
            try:
                scanstring(escape + '"', 0)
            except ValueError:
                s.fail("Invalid \\escape")
            if size + len(escape) <= limit:
                kept.append(escape)
                size += len(escape)
            else:
                limit = size  # keep nothing after a cut
            s.pos += len(escape)
        if counted:
            self.left -= size
        text = scanstring("".join(kept) + '"', 0)[0]
        if text and "\ud800" <= text[-1] <= "\udbff":  # a surrogate pair cut in two
            text = text[:-1]
        return text

    def array(self, keep: bool, depth: int) -> list:
        s, out = self.s, []
        if s.empty("]"):
            return out
        while True:
            keep_item = keep and self.left > 0
            item = self.value(keep_item, depth + 1)
            if keep_item:
                out.append(item)
                self.left -= 1
            if not s.another("]"):
                return out

    def obj(self, keep: bool, depth: int) -> dict:
        s, out = self.s, {}
        # the budget each kept field took: of a repeated key the last value wins, as with
        # json.loads, and it gets the budget the earlier one had
        spent: dict = {}
        if s.empty("}"):
            return out
        while True:
            s.skip_ws()
            if s.peek() != '"':
                s.fail("Expecting property name enclosed in double quotes")
            key = self.string(MAX_KEY if keep else 0, counted=False)
            s.expect(":", "':' delimiter")
            wanted = keep and (key in self.keys if depth == 0
                               else key in MESSAGE_KEYS or self.left > 0)
            self.left += spent.pop(key, 0)
            before = self.left
            value = self.value(wanted, depth + 1)
            if wanted:
                out[key] = value
                spent[key] = before - self.left
            elif keep and depth == 0 and len(out) < 1000:
                out[key] = None  # a dropped field of the record: its name, for messages
            if not s.another("}"):
                return out


def _chars(read_bytes: Callable[[], bytes], bom: bool) -> Callable[[], str]:
    decoder = codecs.getincrementaldecoder("utf-8-sig" if bom else "utf-8")("strict")

    def read() -> str:
        while True:
            raw = read_bytes()
            text = decoder.decode(raw, final=not raw)
            if text or not raw:
                return text

    return read


def parse_record(read_bytes: Callable[[], bytes], budget: int, bom: bool = False,
                 keys: Sequence[str] = RECORD_KEYS) -> Any:
    """One JSON value (a JSON Lines line) from a byte stream, cut to ``budget``: of an
    object, the fields ``keys`` (the others' names map to None). ``BLANK`` for a line of
    whitespace only."""
    stream = _Stream(_chars(read_bytes, bom))
    stream.skip_ws()
    if not stream.more():
        return BLANK
    value = _Parser(stream, budget, keys).value(keep=True)
    stream.skip_ws()
    if stream.more():
        stream.fail("Extra data")
    return value


def iter_records(read_bytes: Callable[[], bytes], budget: int,
                 keys: Sequence[str] = RECORD_KEYS) -> Iterator[Any]:
    """The records of a .json file: an array's elements, or values one after another
    (as ``parse_record``)."""
    stream = _Stream(_chars(read_bytes, True))
    stream.skip_ws()
    if stream.peek() != "[":
        while stream.more():
            yield _Parser(stream, budget, keys).value(keep=True)
            stream.skip_ws()
        return
    if not stream.empty("]"):
        while True:
            yield _Parser(stream, budget, keys).value(keep=True)
            if not stream.another("]"):
                break
    stream.skip_ws()
    if stream.more():
        stream.fail("Extra data")


class LineReader:
    """The bytes of the current line of ``fp`` in chunks, ``first`` being what was read of it."""

    def __init__(self, fp, first: bytes):
        self.fp, self.pending, self.done = fp, first, first.endswith(b"\n")

    def __call__(self) -> bytes:
        if self.pending is not None:
            chunk, self.pending = self.pending, None
            return chunk
        if self.done:
            return b""
        chunk = self.fp.readline(CHUNK)
        self.done = not chunk or chunk.endswith(b"\n")
        return chunk

    def finish(self) -> None:
        """Skip what is left of the line (after an error in it)."""
        while self():
            pass
