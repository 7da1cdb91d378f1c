"""The archive's searchable text of a message: ``mailhub.archive.text.extract``."""

from __future__ import annotations

import base64
import binascii
import email.header

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mailhub.archive.text import (
    MAX_BODY_CHARS,
    MAX_FIELD_CHARS,
    MAX_ID_CHARS,
    MAX_NAME_CHARS,
    extract,
    html_to_text,
)
from mailhub.model import ArchiveText


def message(*lines: str | bytes, body: str | bytes = "") -> bytes:
    """A message of header ``lines`` and ``body``, CRLF line ends."""
    head = b"".join((line.encode() if isinstance(line, str) else line) + b"\r\n" for line in lines)
    return head + b"\r\n" + (body.encode() if isinstance(body, str) else body)


def multipart(subtype: str, boundary: str, *parts: bytes, preamble: bytes = b"") -> bytes:
    """The body of a ``multipart/subtype``, closed."""
    delimiter = b"--" + boundary.encode()
    out = preamble
    for part in parts:
        out += delimiter + b"\r\n" + part + b"\r\n"
    return out + delimiter + b"--\r\n"


PLAIN = message(
    "From: Alice Example <alice@example.com>",
    "To: bob@example.org, Carol <carol@example.net>",
    "Cc: dave@example.org",
    "Subject: Quarterly figures",
    "Date: Mon, 02 Feb 2026 10:00:00 +0100",
    "Message-ID: <abc.123@example.com>",
    "Content-Type: text/plain; charset=utf-8",
    body="Hello Bob,\r\nthe figures are attached.\r\n",
)


def test_plain_message_fields() -> None:
    """A plain message gives its header fields and its text."""
    text = extract(PLAIN)
    assert text == ArchiveText(
        subject="Quarterly figures",
        sender="Alice Example <alice@example.com>",
        recipients="bob@example.org, Carol <carol@example.net>, dave@example.org",
        body="Hello Bob,\nthe figures are attached.",
        attachments=(),
        message_id="abc.123@example.com",
        date=1770022800.0,
    )


def test_invalid_or_missing_date_is_none() -> None:
    assert extract(message("Date: yesterday-ish", body="x")).date is None
    assert extract(message("Date: Mon, 02 Feb 99999 10:00:00 +0100", body="x")).date is None
    assert extract(message("Subject: s", body="x")).date is None


def test_message_id_without_brackets_or_comments() -> None:
    assert extract(message("Message-ID:  <a.b@c> (comment)", body="x")).message_id == "a.b@c"
    assert extract(message("Message-ID: bare@id", body="x")).message_id == "bare@id"
    assert len(extract(message("Message-ID: <" + "x" * 5000 + ">")).message_id) == MAX_ID_CHARS


def test_plain_alternative_is_chosen_over_html() -> None:
    """In a multipart/alternative, the HTML that repeats the plain text is left out."""
    body = multipart(
        "alternative",
        "alt",
        b"Content-Type: text/plain\r\n\r\nplain words",
        b"Content-Type: text/html\r\n\r\n<p>html words</p>",
    )
    text = extract(message('Content-Type: multipart/alternative; boundary="alt"', body=body))
    assert text.body == "plain words"


def test_html_only_is_reduced_to_text() -> None:
    html = (
        "<html><head><title>Ignored title</title><style>p { color: red }</style></head>"
        "<body><p>Caf&eacute;&nbsp;menu</p><script>var hidden = 1;</script>"
        "<div>for <b>to</b>day &amp; to<i>morrow</i></div><!-- a comment --></body></html>"
    )
    text = extract(message("Content-Type: text/html; charset=utf-8", body=html))
    assert text.body == "Café menu for today & tomorrow"


def test_html_alternative_is_used_without_plain() -> None:
    body = multipart(
        "alternative",
        "alt",
        b"Content-Type: text/html\r\n\r\n<p>only html</p>",
    )
    assert extract(
        message("Content-Type: multipart/alternative; boundary=alt", body=body)
    ).body == ("only html")


def test_html_to_text_is_linear_on_malformed_markup() -> None:
    """Unclosed tags, comments and declarations that make html.parser quadratic or raise."""
    for markup in (
        "<a " * 100_000,
        "<!--" * 100_000,
        "<![" * 100_000,
        "< " * 100_000,
        "<script" * 50_000,
    ):
        assert isinstance(html_to_text(markup), str)
    assert html_to_text("<p>before<script>x = '</p>'") == "before"
    assert html_to_text("<head><meta x>hidden<body>shown") == "shown"


def test_encoded_word_subject() -> None:
    """RFC 2047 encoded words, a UTF-8 character split between two of them included."""
    raw = "Grüße aus Köln".encode()
    split = raw.index("ö".encode()) + 1
    subject = (
        "Subject: =?utf-8?b?"
        + base64.b64encode(raw[:split]).decode()
        + "?=\r\n =?UTF-8?B?"
        + base64.b64encode(raw[split:]).decode()
        + "?= and =?iso-8859-1?q?caf=E9_cr=E8me?="
    )
    assert extract(message(subject, body="x")).subject == "Grüße aus Köln and café crème"


def test_encoded_word_sender_and_unknown_charset() -> None:
    text = extract(
        message(
            "From: =?utf-8?q?J=C3=B6rg?= <jorg@example.de>",
            "To: =?x-unknown?q?Ren=C3=A9?= <rene@example.fr>",
            body="x",
        )
    )
    assert text.sender == "Jörg <jorg@example.de>"
    assert text.recipients == "René <rene@example.fr>"


def test_rfc2231_filename() -> None:
    body = multipart(
        "mixed",
        "b",
        b"Content-Type: text/plain\r\n\r\nsee attachment",
        b"Content-Type: application/pdf\r\n"
        b"Content-Disposition: attachment;\r\n filename*0*=utf-8''r%C3%A9sum%C3%A9;\r\n filename*1=.pdf\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK",
        b'Content-Type: image/png; name="=?utf-8?q?f=C3=BCr_dich.png?="\r\n\r\n...',
    )
    text = extract(message("Content-Type: multipart/mixed; boundary=b", body=body))
    assert text.attachments == ("résumé.pdf", "für dich.png")
    assert text.body == "see attachment"
    assert text.has_attachment


def test_attachment_content_is_not_indexed() -> None:
    body = multipart(
        "mixed",
        "b",
        b"Content-Type: text/plain\r\n\r\nbody",
        b"Content-Type: text/plain\r\nContent-Disposition: attachment; filename=notes.txt\r\n\r\nsecret",
    )
    text = extract(message("Content-Type: multipart/mixed; boundary=b", body=body))
    assert (text.body, text.attachments) == ("body", ("notes.txt",))


def test_8bit_headers_utf8_and_latin1() -> None:
    text = extract(message("Subject: Grüße".encode(), "From: Zoë".encode("latin-1"), body="x"))
    assert text.subject == "Grüße"
    assert text.sender == "Zoë"


def test_wrong_charset_falls_back() -> None:
    """A declared charset the bytes do not fit: UTF-8, then windows-1252."""
    lie = message("Content-Type: text/plain; charset=us-ascii", body="naïve €5".encode())
    assert extract(lie).body == "naïve €5"
    latin = message("Content-Type: text/plain; charset=utf-8", body="café".encode("latin-1"))
    assert extract(latin).body == "café"


def test_unknown_and_missing_charset() -> None:
    unknown = message("Content-Type: text/plain; charset=x-martian", body="Grüße".encode())
    assert extract(unknown).body == "Grüße"
    missing = message("Content-Type: text/plain", body="Grüße".encode())
    assert extract(missing).body == "Grüße"
    no_type = message("Subject: s", body="Grüße".encode("cp1252"))
    assert extract(no_type).body == "Grüße"


def test_non_text_codec_as_charset_is_ignored() -> None:
    """A charset naming a codec that is no text encoding does not change the text."""
    for charset in ("base64", "rot13", "unicode-escape", "zlib"):
        body = extract(message(f"Content-Type: text/plain; charset={charset}", body=r"abc \u00e9"))
        assert body.body == r"abc \u00e9"


def test_declared_charset_is_used() -> None:
    body = "Привет мир".encode("koi8-r")
    assert extract(message("Content-Type: text/plain; charset=KOI8-R", body=body)).body == (
        "Привет мир"
    )


def test_base64_body() -> None:
    encoded = base64.encodebytes("Übermorgen geht's los".encode()).replace(b"\n", b"\r\n")
    msg = message(
        "Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: base64", body=encoded
    )
    assert extract(msg).body == "Übermorgen geht's los"


def test_broken_base64_body_is_decoded_as_far_as_possible() -> None:
    encoded = base64.b64encode(b"hello world, and more")[:-3] + b"!!"
    msg = message("Content-Transfer-Encoding: base64", body=encoded)
    assert extract(msg).body.startswith("hello world, and")


def test_quoted_printable_body() -> None:
    encoded = binascii.b2a_qp(("Caf\u00e9 " * 30).encode("iso-8859-15"))
    msg = message(
        "Content-Type: text/plain; charset=iso-8859-15",
        "Content-Transfer-Encoding: quoted-printable",
        body=encoded,
    )
    assert b"=\n" in encoded
    assert extract(msg).body == ("Caf\u00e9 " * 30).strip()


def test_nested_message_rfc822() -> None:
    """An attached message's subject, sender and text are in the body, its attachments listed."""
    inner = message(
        "From: Inner Sender <inner@example.com>",
        "Subject: =?utf-8?q?Forwarded_r=C3=A9port?=",
        "Content-Type: multipart/mixed; boundary=in",
        body=multipart(
            "mixed",
            "in",
            b"Content-Type: text/plain\r\n\r\ninner text",
            b"Content-Type: application/zip; name=data.zip\r\n\r\nPK",
        ),
    )
    body = multipart(
        "mixed",
        "out",
        b"Content-Type: text/plain\r\n\r\nsee below",
        b"Content-Type: message/rfc822\r\nContent-Disposition: attachment\r\n\r\n" + inner,
    )
    text = extract(
        message("Subject: Fwd", "Content-Type: multipart/mixed; boundary=out", body=body)
    )
    assert text.subject == "Fwd"
    assert text.body.split("\n") == [
        "see below",
        "Forwarded réport",
        "Inner Sender <inner@example.com>",
        "inner text",
    ]
    assert text.attachments == ("data.zip",)


def test_zero_byte_message() -> None:
    assert extract(b"") == ArchiveText()


def test_header_only_message() -> None:
    text = extract(b"Subject: only a header\r\nFrom: a@example.com")
    assert (text.subject, text.sender, text.body) == ("only a header", "a@example.com", "")


def test_message_without_header() -> None:
    assert extract(b"just some words\r\n\r\nand more").body == "just some words\n\nand more"


def test_50_mb_message_is_read_within_the_caps() -> None:
    """A 50 MB message returns, its body text cut at MAX_BODY_CHARS."""
    line = b"lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor\r\n"
    huge = message(
        "Subject: big", "Content-Type: text/plain", body=line * (50_000_000 // len(line) + 1)
    )
    assert len(huge) > 50_000_000
    text = extract(huge)
    assert text.subject == "big"
    assert len(text.body) == MAX_BODY_CHARS
    assert text.body.startswith("lorem ipsum")


def test_50_mb_attachment_keeps_the_text_before_it() -> None:
    blob = base64.encodebytes(b"\0" * 36_000_000).replace(b"\n", b"\r\n")
    body = multipart(
        "mixed",
        "b",
        b"Content-Type: text/plain\r\n\r\nthe report",
        b"Content-Type: application/octet-stream; name=big.bin\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + blob,
    )
    text = extract(message("Content-Type: multipart/mixed; boundary=b", body=body))
    assert (text.body, text.attachments) == ("the report", ("big.bin",))


def test_huge_header_is_cut() -> None:
    """A 1 MB subject and a 50,000-line To: are cut, and the body is still found."""
    msg = message(
        "Subject: start " + "x" * 1_000_000,
        "To: " + ",\r\n ".join(f"user{i}@example.com" for i in range(50_000)),
        "From: a@example.com",
        body="body text",
    )
    text = extract(msg)
    assert text.subject.startswith("start x")
    assert len(text.subject) == MAX_FIELD_CHARS
    assert text.recipients.startswith("user0@example.com, user1@example.com")
    assert len(text.recipients) <= MAX_FIELD_CHARS
    assert text.body == "body text"


def test_multipart_without_boundary_is_read_as_text() -> None:
    msg = message("Content-Type: multipart/mixed", body="--x\r\n\r\nsome words\r\n--x--")
    assert "some words" in extract(msg).body


def test_multipart_with_boundary_that_never_occurs_is_read_as_text() -> None:
    msg = message("Content-Type: multipart/mixed; boundary=zzz", body="--x\r\n\r\nsome words")
    assert "some words" in extract(msg).body


def test_unterminated_parts() -> None:
    """A multipart nobody closed: the last part runs to the end."""
    body = b"preamble\r\n--b\r\nContent-Type: text/plain\r\n\r\nfirst\r\n--b\r\n\r\nsecond, cut"
    text = extract(message("Content-Type: multipart/mixed; boundary=b", body=body))
    assert text.body == "first\nsecond, cut"


def test_empty_parts_and_boundary_lookalikes() -> None:
    body = b"--b\r\n--b\r\n\r\n--bx is no delimiter\r\n--b--\r\nepilogue"
    text = extract(message("Content-Type: multipart/mixed; boundary=b", body=body))
    assert text.body == "--bx is no delimiter"


def test_garbage() -> None:
    for garbage in (b"\x00\xff\xfe" * 1000, b":\r\n \r\n:", b"\r\n\r\n\r\n", b"=?utf-8?b?", b"--"):
        assert isinstance(extract(garbage), ArchiveText)


def test_deep_nesting_is_bounded() -> None:
    """3,000 nested multiparts (beyond the recursion limit) and 3,000 nested messages."""
    deep = b"Subject: deep\r\n" + b"".join(
        b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
        for i in range(3000)
    )
    assert extract(deep + b"\r\ninnermost").subject == "deep"
    nested = (
        b"Subject: outer\r\n" + b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n" * 3000
    )
    text = extract(nested + b"\r\ntext")
    assert text.subject == "outer"
    assert "inner" in text.body


def test_many_parts_are_capped() -> None:
    part = b"Content-Type: text/plain\r\n\r\nword"
    body = multipart("mixed", "b", *([part] * 5000))
    text = extract(message("Content-Type: multipart/mixed; boundary=b", body=body))
    assert 0 < text.body.count("word") < 1000


def test_nul_and_surrogates_never_come_out() -> None:
    msg = message(
        "Subject: a\x00b",
        "Content-Type: text/plain; charset=utf-7",
        body=b"+2D3cAA- x\x00y",
    )
    text = extract(msg)
    assert "\x00" not in text.subject + text.body
    text.body.encode("utf-8")


def test_bare_cr_line_ends() -> None:
    text = extract(b"Subject: old mac\rFrom: a@example.com\r\rbody text\r")
    assert (text.subject, text.sender, text.body) == ("old mac", "a@example.com", "body text")


# --- properties ---------------------------------------------------------------


def assert_well_formed(text: ArchiveText) -> None:
    """Every field a ``str`` (or ``None``) a store can keep, within the caps."""
    for value, cap in (
        (text.subject, MAX_FIELD_CHARS),
        (text.sender, MAX_FIELD_CHARS),
        (text.recipients, MAX_FIELD_CHARS),
        (text.message_id, MAX_ID_CHARS),
        (text.body, MAX_BODY_CHARS),
        *((name, MAX_NAME_CHARS) for name in text.attachments),
    ):
        assert isinstance(value, str)
        assert len(value) <= cap
        assert "\x00" not in value
        value.encode("utf-8")  # no surrogates
    assert text.date is None or isinstance(text.date, float)


MIME_TOKENS = st.sampled_from(
    [
        b"\r\n",
        b"\n",
        b"\r",
        b" ",
        b"\t",
        b":",
        b";",
        b"=",
        b'"',
        b"--",
        b"b",
        b"Content-Type: ",
        b"multipart/mixed; boundary=b",
        b"multipart/alternative; boundary=b",
        b"message/rfc822",
        b"text/html",
        b"text/plain; charset=",
        b"utf-8",
        b"utf-7",
        b"x-bogus",
        b"Content-Transfer-Encoding: ",
        b"base64",
        b"quoted-printable",
        b"Content-Disposition: attachment; filename*=utf-8''%C3",
        b"Subject: ",
        b"From: ",
        b"Date: ",
        b"Message-ID: <",
        b"=?utf-8?b?",
        b"=?utf-8?q?",
        b"?=",
        b"<p>",
        b"<script>",
        b"<!--",
        b"&amp;",
        b"\xc3",
        b"\xff",
        b"\x00",
    ]
)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000) | st.lists(MIME_TOKENS | st.binary(max_size=8)).map(b"".join))
@example(b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n--b--")
@example(b"Subject: =?utf-16?b?2D0=?=\r\n\r\n")
def test_any_bytes_give_well_formed_text(data: bytes) -> None:
    """No input makes ``extract`` raise or give a field a store cannot keep."""
    assert_well_formed(extract(data))


CHARSETS = {"utf-8": None, "iso-8859-1": "latin-1", "iso-8859-15": "iso8859_15"}


def words_in(charset: str) -> st.SearchStrategy[list[str]]:
    """Words of letters that ``charset`` can encode."""
    codec = CHARSETS[charset]
    letters = st.characters(categories=["L"], codec=codec)
    return st.lists(st.text(letters, min_size=1, max_size=12), min_size=1, max_size=30)


@st.composite
def generated_messages(draw: st.DrawFn) -> tuple[bytes, list[str], list[str]]:
    """A message with a random subject and body, charset and transfer encoding."""
    charset = draw(st.sampled_from(sorted(CHARSETS)))
    subject_words = draw(words_in(charset))
    body_words = draw(words_in(charset))
    separators = draw(
        st.lists(st.sampled_from([" ", "\r\n", "  ", "\t"]), min_size=len(body_words))
    )
    body_text = "".join(
        w + s for w, s in zip(body_words, separators[: len(body_words)], strict=True)
    )
    raw_body = body_text.encode(charset)
    encoding = draw(st.sampled_from(["8bit", "base64", "quoted-printable"]))
    if encoding == "base64":
        raw_body = base64.encodebytes(raw_body)
    elif encoding == "quoted-printable":
        raw_body = binascii.b2a_qp(raw_body)
    subject = email.header.Header(" ".join(subject_words), charset).encode()
    msg = message(
        "Subject: " + subject,
        f"Content-Type: text/plain; charset={charset}",
        f"Content-Transfer-Encoding: {encoding}",
        body=raw_body,
    )
    return msg, subject_words, body_words


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(generated_messages())
def test_generated_message_words_are_found(case: tuple[bytes, list[str], list[str]]) -> None:
    """The words of a message's subject and body are the words of its extracted text."""
    msg, subject_words, body_words = case
    text = extract(msg)
    assert text.subject.split() == subject_words
    assert text.body.split() == body_words


@given(words_in("utf-8"), words_in("utf-8"))
def test_generated_multipart_words_are_found(plain: list[str], html: list[str]) -> None:
    """Plain and HTML parts of a mixed multipart both give their words."""
    body = multipart(
        "mixed",
        "b",
        b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + " ".join(plain).encode(),
        b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes("<p>{}</p>".format("<br>".join(html)).encode()),
    )
    text = extract(message("Content-Type: multipart/mixed; boundary=b", body=body))
    assert text.body.split() == plain + html
