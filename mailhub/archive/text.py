"""
What the archive indexes for one message: its searchable text.

:func:`extract` turns a message, exactly as the hub accepted it, into an
:class:`~mailhub.model.ArchiveText`: ``From:``, ``To:``/``Cc:`` and
``Subject:`` decoded (RFC 2047 encoded words, raw 8-bit bytes read as UTF-8,
else windows-1252, else latin-1), the text of its text parts in their
declared charset (a wrong or unknown one falls back the same way), HTML
reduced to text, the names of its attachments (RFC 2231 and RFC 2047 forms),
and the subject, sender and text of each attached ``message/rfc822``.  In a
``multipart/alternative`` with a ``text/plain`` part the other alternatives
are left out: they say the same thing again.

It runs for every accepted message, so it must be fast and must never fail:
any input, however malformed, gives an ``ArchiveText`` whose fields are
``str`` without surrogates or NULs.  What cannot be decoded is left out, or
read as latin-1; the message itself is archived as received whatever this
module makes of it.  It does no I/O.

The MIME structure is read by this module, over the bytes: delimiter lines
are found by regular expressions (in C), header fields are split and
decoded here, and only the parameters of ``Content-Type:`` and
``Content-Disposition:`` (RFC 2231 included) are read by the stdlib's
``email.message.Message``.  The stdlib's parser is not used: it takes a
Python step per line (a base64 attachment is most of the time of a 100 KB
message), a step per line per open multipart (quadratic in the nesting),
and raises ``RecursionError`` on deep nesting; ``email.policy.default``
measured twenty times slower than ``compat32`` on a 4 KB message.  HTML is
reduced by a linear scanner of this module, not ``html.parser``: the
stdlib's parser is quadratic on some malformed markup in the Python versions
the hub supports (30 KB of ``<a <a <a`` took 13 s) and raises
``AssertionError`` on other input.

The caps, so that a 50 MB message or a megabyte-long header costs
milliseconds, not seconds (each is a module constant):

- only the first :data:`MAX_PARSE_BYTES` (4 MiB) of a message are parsed,
  cut at a line end: text after that point, for instance a text part behind
  a large attachment, is not indexed;
- the body text is cut at :data:`MAX_BODY_CHARS` (1 Mi characters), and at
  most :data:`MAX_HTML_CHARS` of one HTML part's markup are reduced;
- at most :data:`MAX_PARTS` (1,000) MIME parts are read, at most
  :data:`MAX_DEPTH` (32) levels deep (a multipart deeper than that is read
  as text);
- at most :data:`MAX_HEADER_LINES` (5,000) lines of one header are read;
- each header field is cut at :data:`MAX_FIELD_BYTES` (64 KiB) before
  decoding and :data:`MAX_FIELD_CHARS` after (``To:`` and ``Cc:`` together
  too); an attachment's name at :data:`MAX_NAME_CHARS`, the message id at
  :data:`MAX_ID_CHARS`.
"""

from __future__ import annotations

import binascii
import codecs
import email.utils
import functools
import html
import math
import re
from collections.abc import Mapping
from email.message import Message
from typing import Any, cast

from mailhub.model import ArchiveText

__all__ = [
    "MAX_BODY_CHARS",
    "MAX_DEPTH",
    "MAX_FIELD_BYTES",
    "MAX_FIELD_CHARS",
    "MAX_HEADER_LINES",
    "MAX_HTML_CHARS",
    "MAX_ID_CHARS",
    "MAX_NAME_CHARS",
    "MAX_PARSE_BYTES",
    "MAX_PARTS",
    "extract",
    "html_to_text",
]

#: How much of a message is parsed at most.
MAX_PARSE_BYTES = 4 * 1024 * 1024
#: How long the body text is at most.
MAX_BODY_CHARS = 1024 * 1024
#: How much of one HTML part is reduced to text at most.
MAX_HTML_CHARS = 2 * 1024 * 1024
#: How many MIME parts are read at most.
MAX_PARTS = 1000
#: How deep in nested multiparts and messages parts are read.
MAX_DEPTH = 32
#: How much of one header field is decoded at most.
MAX_FIELD_BYTES = 64 * 1024
#: How long a decoded subject, sender or recipients field is at most.
MAX_FIELD_CHARS = 64 * 1024
#: How long one attachment's name is at most.
MAX_NAME_CHARS = 1024
#: How long the message id is at most.
MAX_ID_CHARS = 998
#: How many lines of one header are read at most.
MAX_HEADER_LINES = 5000

#: A header's fields by lower-case name, each value's raw bytes unfolded.
_Headers = Mapping[str, list[bytes]]

# --- text in an unknown or untrusted charset -----------------------------

#: Codecs that are text encodings to Python but would turn a body into
#: something other than its text (escape sequences, domain names).
_NOT_CHARSETS = frozenset({"unicode-escape", "raw-unicode-escape", "punycode", "idna", "undefined"})
#: Codecs for which a failed strict decoding means the charset was a lie.
_TRIED_FIRST = frozenset({"ascii", "utf-8"})


@functools.lru_cache(maxsize=256)
def _codec(charset: str) -> str | None:
    """The Python codec for a declared charset, or ``None`` if there is none."""
    if not charset or len(charset) > 64:
        return None
    try:
        info = codecs.lookup(charset.strip().strip('"').strip("'"))
    except (LookupError, ValueError, TypeError):
        return None
    if not getattr(info, "_is_text_encoding", True) or info.name.replace("_", "-") in _NOT_CHARSETS:
        return None
    return info.name


def _decode(data: bytes, charset: str | None = None, cut: bool = False) -> str:
    """
    ``data`` as text: in ``charset`` if it decodes, else UTF-8, else (for
    a charset that is not an ASCII or UTF-8 lie) ``charset`` with
    replacement characters, else windows-1252, else latin-1.

    :param cut: ``data`` was cut short by a cap: a multi-byte sequence cut
        at its end is dropped rather than taken as proof that the charset
        is wrong.
    """
    codec = _codec(charset) if charset else None
    for attempt in (codec, "utf-8"):
        if attempt is None:
            continue
        try:
            return data.decode(attempt)
        except UnicodeDecodeError as e:
            if cut and e.end >= len(data) and e.start >= len(data) - 8 and e.start > 0:
                try:
                    return data[: e.start].decode(attempt)
                except Exception:
                    pass
        except Exception:
            pass
    if codec is not None and codec not in _TRIED_FIRST:
        try:
            return data.decode(codec, "replace")
        except Exception:
            pass
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        return data.decode("latin-1")


_UNSAFE = re.compile("[\x00\ud800-\udfff]")


def _clean(text: str) -> str:
    """``text`` without surrogates or NULs, which no store can keep."""
    if "\x00" not in text and (text.isascii() or _UNSAFE.search(text) is None):
        return text
    return _UNSAFE.sub(lambda m: " " if m.group() == "\x00" else "\ufffd", text)


def _raw(value: str) -> bytes:
    """The bytes the ``compat32`` parser read as ``value``."""
    return value.encode("utf-8", "surrogateescape")


# --- header fields ---------------------------------------------------------

_ENCODED_WORD = re.compile(rb"=\?([^?\s*]*)(?:\*[^?\s]*)?\?([QqBb])\?([^?\s]*)\?=")
_LINE_BREAK = re.compile(rb"\r?\n|\r")


def _b64(data: bytes) -> bytes:
    """Base64 decoded leniently: stray characters and a cut end are ignored."""
    try:
        return binascii.a2b_base64(data)
    except (binascii.Error, ValueError):
        clean = re.sub(rb"[^A-Za-z0-9+/]", b"", data)
        clean = clean[: len(clean) - len(clean) % 4]
        try:
            return binascii.a2b_base64(clean)
        except (binascii.Error, ValueError):
            return b""


def _decode_field(raw: bytes) -> str:
    """
    One header field's value as text: unfolded, RFC 2047 encoded words
    decoded (adjacent ones of one charset together, so a character split
    between them survives), raw 8-bit bytes read as UTF-8 or windows-1252,
    whitespace collapsed.
    """
    raw = _LINE_BREAK.sub(b" ", raw[:MAX_FIELD_BYTES])
    if b"=?" not in raw:
        return " ".join((raw.decode("ascii") if raw.isascii() else _decode(raw)).split())
    # (charset, bytes): None for raw text between encoded words.
    words: list[tuple[bytes | None, bytes]] = []
    pos = 0
    for m in _ENCODED_WORD.finditer(raw):
        between = raw[pos : m.start()]
        if between and not (between.isspace() and words and words[-1][0] is not None):
            words.append((None, between))
        charset, kind, encoded = m.group(1).lower(), m.group(2), m.group(3)
        content = _b64(encoded) if kind in b"Bb" else binascii.a2b_qp(encoded, header=True)
        if words and words[-1][0] == charset:
            words[-1] = (charset, words[-1][1] + content)
        else:
            words.append((charset, content))
        pos = m.end()
    words.append((None, raw[pos:]))
    text = "".join(
        _decode(content, None if charset is None else charset.decode("ascii", "replace"))
        for charset, content in words
    )
    return " ".join(text.split())


def _fields(headers: _Headers, *names: str, limit: int = MAX_FIELD_CHARS) -> str:
    """The decoded values of every field called one of ``names``, joined."""
    values = [_decode_field(raw) for name in names for raw in headers.get(name, ())]
    return _clean(", ".join(v for v in values if v)[:limit])


def _message_id(headers: _Headers) -> str:
    values = headers.get("message-id")
    if not values:
        return ""
    text = _decode_field(values[0])
    start = text.find("<")
    end = text.find(">", start + 1)
    if start >= 0 and end > start:
        text = text[start + 1 : end]
    return _clean(text.strip().strip("<>").strip()[:MAX_ID_CHARS])


def _date(headers: _Headers) -> float | None:
    values = headers.get("date")
    if not values:
        return None
    try:
        parsed = email.utils.parsedate_tz(_decode_field(values[0])[:200])
        if parsed is None:
            return None
        when = float(email.utils.mktime_tz(parsed))
    except Exception:
        return None
    return when if math.isfinite(when) else None


def _archive_text(headers: _Headers, body: str, attachments: tuple[str, ...] = ()) -> ArchiveText:
    """An ``ArchiveText`` of ``body``, ``attachments`` and what a header says."""
    return ArchiveText(
        subject=_fields(headers, "subject"),
        sender=_fields(headers, "from"),
        recipients=_fields(headers, "to", "cc"),
        body=body,
        # mypy cannot solve the attrs ``converter=tuple`` of the model's field.
        attachments=cast(Any, attachments),
        message_id=_message_id(headers),
        date=_date(headers),
    )


# --- HTML ------------------------------------------------------------------

# Each alternative that starts to match always matches (up to ">" or the end
# of the text), so a scan never goes back over text it has seen: the reduction
# is linear in the markup, whatever the markup.
_HTML_TOKEN = re.compile(
    r"<!--.*?(?:-->|\Z)|<(/?)([A-Za-z][A-Za-z0-9:_-]*)[^>]*(?:>|\Z)|<[!?][^>]*(?:>|\Z)", re.S
)
_HTML_SKIP_TO = {
    "script": re.compile(r"</script\b", re.I),
    "style": re.compile(r"</style\b", re.I),
    "template": re.compile(r"</template\b", re.I),
    "title": re.compile(r"</title\b", re.I),
    # A head nobody closed ends where the body starts, as in a browser.
    "head": re.compile(r"</head\b|<body\b", re.I),
}
# Tags inside a word ("<b>W</b>ord"); every other tag separates words.
_HTML_INLINE = frozenset(
    "a abbr b bdi bdo big cite code del dfn em font i ins kbd mark q s samp small span "
    "strike strong sub sup tt u var wbr".split()
)


def html_to_text(markup: str, limit: int = MAX_BODY_CHARS) -> str:
    """
    The text of an HTML document: tags dropped (those that separate blocks
    leave a space), the contents of ``head``, ``script``, ``style``,
    ``title`` and ``template`` dropped, entities decoded, whitespace
    collapsed.

    :param markup: the HTML; only its first :data:`MAX_HTML_CHARS` are read.
    :param limit: how many characters of text are wanted at most.
    :returns: the text, at most ``limit`` characters.
    """
    markup = markup[:MAX_HTML_CHARS]
    out: list[str] = []
    size = 0
    pos = 0
    end = len(markup)
    while pos < end and size <= limit:
        m = _HTML_TOKEN.search(markup, pos)
        if m is None:
            out.append(markup[pos:])
            break
        if m.start() > pos:
            out.append(markup[pos : m.start()])
            size += m.start() - pos
        pos = m.end()
        name = m.group(2)
        if name is None:
            out.append(" ")
            continue
        name = name.lower()
        skip = _HTML_SKIP_TO.get(name)
        if skip is not None and not m.group(1):
            close = skip.search(markup, pos)
            pos = end if close is None else close.start()
        elif name not in _HTML_INLINE:
            out.append(" ")
    return " ".join(html.unescape("".join(out)).split())[:limit]


# --- MIME structure ----------------------------------------------------------

# A header field line as the ``email`` parser takes it (and a blank before
# the colon, which it does not).
_FIELD_LINE = re.compile(rb"([!-9;-~]+)[ \t]*:[ \t]*")
_HEADER_END = re.compile(rb"\n\r?\n")


def _header(buf: bytes, start: int, end: int) -> tuple[dict[str, list[bytes]], int]:
    """
    The header fields of the message or part in ``buf[start:end]``, by
    lower-case name, unfolded and cut at :data:`MAX_FIELD_BYTES`; and where
    its body starts.

    As in the ``email`` parser, the header ends at an empty line or at the
    first line that is neither a field nor a continuation, which is then the
    body's first line; an mbox ``From`` line at the start is skipped.  Only
    :data:`MAX_HEADER_LINES` lines are read.
    """
    collected: dict[str, list[list[bytes]]] = {}
    pos = start
    if buf.startswith(b"From ", pos, end):
        nl = buf.find(b"\n", pos, end)
        pos = end if nl < 0 else nl + 1
    if buf.startswith(b"\n", pos, end) or buf.startswith(b"\r\n", pos, end):
        return {}, buf.index(b"\n", pos) + 1
    blank = _HEADER_END.search(buf, pos, end)
    head_end, body = (end, end) if blank is None else (blank.start() + 1, blank.end())
    lines = buf[pos:head_end].split(b"\n", MAX_HEADER_LINES)
    if len(lines) > MAX_HEADER_LINES:
        lines.pop()
    value: list[bytes] = []
    size = 0
    for n, line in enumerate(lines):
        line = line.rstrip(b"\r")
        if line[:1] in (b" ", b"\t") and n:
            if size < MAX_FIELD_BYTES:
                # Unfolding: the line break goes, the continuation's blank stays.
                value.append(line)
                size += len(line)
            continue
        m = _FIELD_LINE.match(line)
        if m is None:
            if line or n < len(lines) - 1:
                # Not a field: the body starts here.
                body = pos + sum(len(x) + 1 for x in lines[:n])
            break
        value = [line[m.end() :]]
        size = len(value[0])
        collected.setdefault(m.group(1).decode("ascii").lower(), []).append(value)
    fields = {
        name: [b"".join(v)[:MAX_FIELD_BYTES] for v in values] for name, values in collected.items()
    }
    return fields, body


def _mime(fields: dict[str, list[bytes]], default_type: str) -> Message:
    """
    A ``Message`` holding only the MIME fields of a part: the ``email``
    package's ``compat32`` reading of their parameters (RFC 2231 included)
    is what this module uses, not its parser.
    """
    part = Message()
    part.set_default_type(default_type)
    for name in ("content-type", "content-disposition", "content-transfer-encoding"):
        values = fields.get(name)
        if values:
            # As the ``email`` parser reads raw bytes.
            part[name] = values[0].decode("ascii", "surrogateescape")
    return part


@functools.lru_cache(maxsize=256)
def _delimiters(boundary: str) -> tuple[re.Pattern[bytes], re.Pattern[bytes]]:
    """
    Patterns for a delimiter line of ``boundary`` at the start of a body,
    and after a line end (taking the line end with it, as RFC 2046 says).
    Group 1 is set for the closing delimiter.
    """
    line = b"--" + re.escape(_raw(boundary)) + rb"(--)?[ \t]*(?:\r?\n|\Z)"
    return re.compile(line), re.compile(rb"\n" + line)


def _split_multipart(
    buf: bytes, start: int, end: int, boundary: str
) -> list[tuple[int, int]] | None:
    """
    Where the parts of the multipart body ``buf[start:end]`` are: the
    preamble and epilogue left out, a last part nobody closed running to
    the end; ``None`` if there is no delimiter at all.  At most
    :data:`MAX_PARTS` parts.
    """
    first, following = _delimiters(boundary)
    m = first.match(buf, start, end) or following.search(buf, start, end)
    if m is None:
        return None
    parts: list[tuple[int, int]] = []
    while not m.group(1) and len(parts) < MAX_PARTS:
        content = m.end()
        # From the line end the delimiter took: an empty part is two
        # delimiter lines in a row.
        m = following.search(buf, content - 1, end)
        if m is None:
            parts.append((content, end))
            break
        stop = m.start()
        if stop > content and buf[stop - 1] == 0x0D:
            stop -= 1
        parts.append((content, max(content, stop)))
    return parts


def _content(payload: bytes, encoding: str) -> bytes:
    """A part's content, its transfer encoding undone as far as it can be."""
    encoding = encoding.strip().lower()
    if encoding == "base64":
        return _b64(payload)
    if encoding == "quoted-printable":
        return binascii.a2b_qp(payload)
    return payload


def _text_of(content: bytes, subtype: str, charset: str | None, limit: int, cut: bool) -> str:
    """
    A text part's content as text, HTML reduced, at most ``limit``
    characters; ``cut`` if a cap cut the content short.
    """
    size = MAX_HTML_CHARS * 4 if subtype == "html" else limit * 4
    text = _decode(content[:size], charset, cut or len(content) > size)
    return html_to_text(text, limit) if subtype == "html" else text.replace("\r\n", "\n")[:limit]


class _Body:
    """The body text and attachment names collected so far, within the caps."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.size = 0
        self.names: list[str] = []
        #: Whether the message was cut at MAX_PARSE_BYTES.
        self.cut = False

    @property
    def room(self) -> int:
        return MAX_BODY_CHARS - self.size

    def add(self, text: str) -> None:
        text = text.strip()
        if text and self.room > 0:
            text = text[: self.room]
            self.pieces.append(text)
            self.size += len(text) + 1

    def name(self, raw: str | None) -> None:
        if raw:
            name = _decode_field(_raw(raw))[:MAX_NAME_CHARS]
            if name:
                self.names.append(_clean(name))

    def text(self) -> str:
        return _clean("\n".join(self.pieces)[:MAX_BODY_CHARS])


def _filename(part: Message) -> str | None:
    if "content-disposition" not in part and "name" not in part.get("content-type", "").lower():
        return None
    try:
        name = part.get_filename() or part.get_param("name")
    except Exception:
        return None
    if isinstance(name, tuple):
        name = email.utils.collapse_rfc2231_value(name)
    return name if isinstance(name, str) else None


def _is_attachment(part: Message, name: str | None) -> bool:
    if name:
        return True
    disposition = part.get("content-disposition")
    return isinstance(disposition, str) and disposition.strip().lower().startswith("attachment")


_SIMPLE_CHARSET = re.compile(r'[^;]*;\s*charset="?([A-Za-z0-9_.:+-]{1,64})"?\s*$', re.I)


def _charset(part: Message) -> str | None:
    simple = _SIMPLE_CHARSET.match(part.get("content-type", ""))
    if simple is not None:
        return simple.group(1).lower()
    try:
        charset = part.get_content_charset()
    except Exception:
        return None
    return charset if isinstance(charset, str) else None


# A part to read: its bytes, where it starts and ends, how deep it is, its
# default content type, whether it is an attached message.
_Task = tuple[bytes, int, int, int, str, bool]


def _walk(buf: bytes, body: _Body) -> dict[str, list[bytes]]:
    """
    Collect the text and attachment names of the message ``buf`` into
    ``body``, part by part, without recursion; return the message's header.
    """
    stack: list[_Task] = [(buf, 0, len(buf), 0, "text/plain", False)]
    top: dict[str, list[bytes]] | None = None
    parts = 0
    while stack and parts < MAX_PARTS and body.room > 0:
        task = stack.pop()
        parts += 1
        try:
            fields = _read_part(task, body, stack)
        except Exception:
            # A part in a shape nobody expected costs its own text, not the
            # rest of the message's.
            continue
        if top is None:
            top = fields
    return top or {}


def _read_part(task: _Task, body: _Body, stack: list[_Task]) -> dict[str, list[bytes]]:
    """Read one part into ``body``, its parts onto ``stack``; return its header."""
    buf, start, end, depth, default_type, attached = task
    fields, body_start = _header(buf, start, end)
    if attached:
        for field_name in ("subject", "from", "to", "cc"):
            body.add(_fields(fields, field_name))
    part = _mime(fields, default_type)
    maintype = part.get_content_maintype()
    subtype = part.get_content_subtype()
    name = _filename(part)
    if maintype == "multipart" and depth < MAX_DEPTH:
        boundary = part.get_boundary()
        spans = None
        if boundary and len(boundary) <= 200:
            spans = _split_multipart(buf, body_start, end, boundary)
        if spans is not None:
            child_type = "message/rfc822" if subtype == "digest" else "text/plain"
            children = [(buf, s, e, depth + 1, child_type, False) for s, e in spans]
            if subtype == "alternative":
                children = _plain_alternatives(children) or children
            # Reversed onto the stack, so the parts come out in their order.
            stack.extend(reversed(children))
            return fields
        # A multipart without its delimiters is read as text, below.
    encoding = str(part.get("content-transfer-encoding", ""))
    if maintype == "message" and subtype in ("rfc822", "global") and depth < MAX_DEPTH:
        body.name(name)
        inner = buf
        if encoding.strip().lower() in ("base64", "quoted-printable"):
            inner = _content(buf[body_start:end], encoding)
            body_start, end = 0, len(inner)
        stack.append((inner, body_start, end, depth + 1, "text/plain", True))
        return fields
    if _is_attachment(part, name):
        body.name(name)
        return fields
    if maintype not in ("text", "multipart", "message"):
        return fields
    content = _content(buf[body_start:end], encoding)
    text_type = subtype if maintype == "text" else "plain"
    cut = end == len(buf) and body.cut
    body.add(_text_of(content, text_type, _charset(part), body.room, cut))
    return fields


def _plain_alternatives(children: list[_Task]) -> list[_Task]:
    """The ``text/plain`` parts of a ``multipart/alternative``, if it has any."""
    plain = []
    for child in children:
        fields, _ = _header(child[0], child[1], child[2])
        part = _mime(fields, "text/plain")
        if part.get_content_type() == "text/plain" and not _is_attachment(part, _filename(part)):
            plain.append(child)
    return plain


# --- one message -----------------------------------------------------------


def _window(message: bytes) -> bytes:
    """The part of ``message`` that is read: :data:`MAX_PARSE_BYTES`, cut at a line end."""
    if len(message) <= MAX_PARSE_BYTES:
        return message
    cut = message.rfind(b"\n", 0, MAX_PARSE_BYTES)
    return message[: cut + 1 if cut > 0 else MAX_PARSE_BYTES]


def _read(message: bytes) -> ArchiveText:
    buf = _window(message)
    if b"\n" not in buf and b"\r" in buf:
        # Bare CR line ends (old Macintosh mail).
        buf = buf.replace(b"\r", b"\n")
    body = _Body()
    body.cut = len(buf) < len(message)
    fields = _walk(buf, body)
    return _archive_text(fields, body.text(), tuple(body.names))


def _raw_text(message: bytes) -> ArchiveText:
    """The last resort: the message's bytes as text."""
    return ArchiveText(body=_clean(_decode(message[:MAX_BODY_CHARS], cut=True)[:MAX_BODY_CHARS]))


def extract(message: bytes) -> ArchiveText:
    """
    What the archive searches in ``message``; never raises.

    :param message: a message as the hub accepted it, byte for byte.
    :returns: its decoded header fields, body text and attachment names,
        within this module's caps; an empty ``ArchiveText`` for an empty
        message.
    """
    if not message:
        return ArchiveText()
    try:
        return _read(message)
    except Exception:
        # Nothing above is known to raise; should something still, the
        # message's words stay findable.
        try:
            return _raw_text(message)
        except Exception:
            return ArchiveText()
