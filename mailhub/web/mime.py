"""
A message as the LiveArchive shows it: headers decoded, the text, the HTML
made inert, the attachments listed; and the messages people write there.

Nothing here trusts the mail: HTML goes through nh3 (ammonia), an allow-list
sanitiser, keeping formatting and dropping scripts, event handlers, forms,
frames, ``javascript:``/``data:`` URLs, SVG and MathML; remote images are
blocked (their ``src`` is moved aside) unless the reader asks for them, and
even then the page's Content-Security-Policy lets only images load.  The
result is shown in a sandboxed frame without scripts (see
``mailhub.web.livearchive``).  Parsing is CPU work: callers run it in a thread.
"""

from __future__ import annotations

import email.policy
import email.utils
import html
import re
import time
from collections.abc import Mapping, Sequence
from email.message import EmailMessage, Message
from email.parser import BytesParser
from typing import Any

import nh3
from attrs import field, frozen

__all__ = ["Attachment", "Shown", "build_message", "show", "sanitise_html"]

#: Text shown of one message at most (a huge text part is cut, with a note).
MAX_TEXT = 2_000_000

_TAGS = {
    "a", "abbr", "b", "blockquote", "br", "caption", "center", "code", "col", "colgroup", "dd", "del",
    "div", "dl", "dt", "em", "font", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "i", "img", "ins", "kbd",
    "li", "ol", "p", "pre", "q", "s", "small", "span", "strike", "strong", "sub", "sup", "table", "tbody",
    "td", "tfoot", "th", "thead", "tr", "tt", "u", "ul",
}
_ATTRIBUTES = {
    "*": {"align", "title", "dir", "lang", "width", "height", "valign", "bgcolor", "color", "colspan", "rowspan"},
    "a": {"href"},
    "img": {"src", "alt", "data-blocked-src"},
    "font": {"face", "size"},
    "table": {"border", "cellpadding", "cellspacing"},
}
_IMG_SRC = re.compile(r'(<img\b[^>]*?)\bsrc=(["\'])(?=https?:)', re.IGNORECASE)
_CID_SRC = re.compile(r'(<img\b[^>]*?\bsrc=)(["\'])cid:([^"\']*)\2', re.IGNORECASE)
#: The parts a message may show as its own images (``cid:``): types a
#: browser shows as pictures and never runs (no SVG).
INLINE_IMAGES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})


@frozen
class Attachment:
    """One attachment: its index among the message's parts, name, type and size."""

    index: int
    filename: str
    content_type: str
    size: int


@frozen
class Shown:
    """
    :ivar headers: (name, decoded value) of every header, in order.
    :ivar subject, sender, to, cc, date: decoded, for display.
    :ivar text: the plain text (or the HTML's text when there is no plain part).
    :ivar html: the sanitised HTML, or ``""``.
    :ivar remote_images: whether the HTML referred to images outside the message.
    :ivar attachments: ``Attachment`` list.
    :ivar message_id, references: for replies.
    """

    headers: tuple[tuple[str, str], ...] = field(converter=tuple)
    subject: str = ""
    sender: str = ""
    to: str = ""
    cc: str = ""
    reply_to: str = ""
    date: str = ""
    text: str = ""
    html: str = ""
    remote_images: bool = False
    attachments: tuple[Attachment, ...] = field(default=(), converter=tuple)
    message_id: str = ""
    references: str = ""


def _parse(data: bytes) -> Message:
    return BytesParser(policy=email.policy.default).parsebytes(data)


def _header(msg: Message, name: str) -> str:
    try:
        value = msg.get(name)
        return "" if value is None else " ".join(str(value).split())
    except Exception:
        raw = msg.get_all(name) or [""]
        return " ".join(str(raw[0]).split())


def _decoded(part: Message) -> str:
    try:
        content = part.get_content()  # type: ignore[attr-defined]
        if isinstance(content, bytes):
            return content.decode("utf-8", "replace")
        return str(content)
    except Exception:
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes):
            return payload.decode("utf-8", "replace")
        return ""


def _walk(msg: Message) -> list[Message]:
    try:
        return list(msg.walk())
    except Exception:
        return [msg]


def sanitise_html(markup: str, images: bool = False, cids: Mapping[str, str] | None = None) -> tuple[str, bool]:
    """
    :param images: let remote images load (otherwise their ``src`` is kept
        aside in ``data-blocked-src`` and nothing is fetched).
    :param cids: the message's own images: ``cid:`` (its Content-ID) to the
        URL the LiveArchive serves the part at.  Another ``cid:`` shows nothing.
    :returns: the inert HTML, and whether it referred to remote images.
    """
    clean = nh3.clean(
        markup,
        tags=_TAGS,
        attributes=_ATTRIBUTES,
        url_schemes={"http", "https", "mailto", "cid"},
        link_rel="noopener noreferrer nofollow",
        strip_comments=True,
    )
    remote = bool(re.search(r'<img\b[^>]*\bsrc=["\']https?:', clean, re.IGNORECASE))
    if not images:
        clean = _IMG_SRC.sub(r"\1data-blocked-src=\2", clean)
    found = cids or {}

    def own(m: re.Match[str]) -> str:
        url = found.get(html.unescape(m.group(3)))
        if url is None:
            return f"{m.group(1)}{m.group(2)}{m.group(2)} data-blocked-src={m.group(2)}cid:{m.group(3)}{m.group(2)}"
        return f"{m.group(1)}{m.group(2)}{html.escape(url, quote=True)}{m.group(2)}"

    return _CID_SRC.sub(own, clean), remote


def show(data: bytes, images: bool = False, inline_url: str = "") -> Shown:
    """
    The message ``data`` for display; never raises.

    :param inline_url: where the message's own images (``cid:``) are
        served, with ``{index}`` for the part's index; without it they show
        nothing.
    """
    try:
        msg = _parse(data)
    except Exception:
        return Shown(headers=_t([]), text=data.decode("utf-8", "replace")[:MAX_TEXT])
    headers = []
    for name in msg.keys():
        headers.append((name, _header(msg, name)))
    text_parts: list[str] = []
    html_parts: list[str] = []
    attachments: list[Attachment] = []
    cids: dict[str, str] = {}
    for index, part in enumerate(_walk(msg)):
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        content_id = str(part.get("content-id", "")).strip().strip("<>")
        if inline_url and content_id and ctype in INLINE_IMAGES:
            cids[content_id] = inline_url.format(index=index)
        filename = part.get_filename() or ""
        disposition = part.get_content_disposition()
        # Text without a file name is the message's text (a lone part even
        # when it says "attachment"); anything else is an attachment.
        is_text = ctype.startswith("text/") and not filename and (disposition != "attachment" or part is msg)
        if not is_text:
            payload = part.get_payload(decode=True)
            size = len(payload) if isinstance(payload, bytes) else 0
            attachments.append(Attachment(index, filename or f"part-{index}", ctype, size))
            continue
        if ctype == "text/html":
            html_parts.append(_decoded(part))
        else:
            text_parts.append(_decoded(part))
    html, remote = ("", False)
    if html_parts:
        html, remote = sanitise_html("\n<hr>\n".join(html_parts), images, cids)
    text = "\n\n".join(text_parts)
    if not text and html_parts:
        text = nh3.clean_text(re.sub(r"<[^>]+>", " ", html))
    if len(text) > MAX_TEXT:
        text = text[:MAX_TEXT] + "\n[... the rest of this text is not shown]"
    return Shown(
        headers=_t(headers),
        subject=_header(msg, "subject"),
        sender=_header(msg, "from"),
        to=_header(msg, "to"),
        cc=_header(msg, "cc"),
        reply_to=_header(msg, "reply-to"),
        date=_header(msg, "date"),
        text=text,
        html=html,
        remote_images=remote,
        attachments=_t(attachments),
        message_id=_header(msg, "message-id"),
        references=_header(msg, "references"),
    )


def attachment(data: bytes, index: int) -> tuple[str, str, bytes] | None:
    """The ``index``-th part of the message as ``(filename, content type, bytes)``, or ``None``."""
    try:
        parts = _walk(_parse(data))
    except Exception:
        return None
    if not 0 <= index < len(parts) or parts[index].is_multipart():
        return None
    part = parts[index]
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return None
    return part.get_filename() or f"part-{index}", part.get_content_type(), payload


def build_message(
    sender: str,
    to: Sequence[str],
    cc: Sequence[str],
    subject: str,
    body: str,
    hostname: str,
    in_reply_to: str = "",
    references: str = "",
    attachments: Sequence[tuple[str, str, bytes]] = (),
    now: float | None = None,
) -> tuple[bytes, str]:
    """
    A message written in the LiveArchive, as the hub sends it.

    :param attachments: ``(filename, content type, bytes)``.
    :returns: the message (CRLF line ends) and its Message-ID.
    """
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = sender
    if to:
        msg["To"] = ", ".join(to)
    if cc:
        msg["Cc"] = ", ".join(cc)
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate(now if now is not None else time.time(), localtime=False)
    message_id = email.utils.make_msgid(domain=hostname)
    msg["Message-ID"] = message_id
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
        msg["References"] = (references + " " + in_reply_to).strip()
    msg["X-Mailer"] = "mailhub LiveArchive"
    msg.set_content(body)
    for filename, ctype, data in attachments:
        maintype, _, subtype = (ctype or "application/octet-stream").partition("/")
        msg.add_attachment(data, maintype=maintype or "application", subtype=subtype or "octet-stream",
                           filename=filename)
    return msg.as_bytes(), message_id.strip("<>")


def addresses(text: str) -> list[str]:
    """The addresses in a To/Cc field as typed (``a@x, "B" <b@y>``), without names."""
    return [addr for _, addr in email.utils.getaddresses([text]) if addr]


def _t(items: list[Any]) -> Any:
    # mypy cannot solve the attrs ``converter=tuple`` fields.
    return tuple(items)
