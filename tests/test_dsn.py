"""RFC 3464 delivery status notifications."""

import email
import email.policy

from mailhub.delivery.dsn import build_dsn
from mailhub.model import Action, Address, Entry, Outcome, Recipient, Reply

SENDER = Address("sender", "outside.example")
A = Address("alice", "example.com")
ORIGINAL = b"From: sender@outside.example\r\nSubject: hello\r\nMessage-ID: <x@y>\r\n\r\nbody line\r\n"


def entry(sender=SENDER):
    return Entry(id="e1", message_id="m1", route="smtp:mail.example.com:25", sender=sender,
                 recipients=(Recipient(A),), created=1_700_000_000.0)


def parse(data: bytes):
    return email.message_from_bytes(data, policy=email.policy.default)


def test_dsn_is_a_multipart_report_to_the_envelope_sender_from_the_null_sender():
    env, data = build_dsn("mx.hub.example", entry(), [Outcome(A, Action.FAILED, Reply(550, "5.1.1", "no such user"))],
                          ORIGINAL, 1_700_000_100.0)
    assert env.sender is None
    assert env.recipients == (SENDER,)
    msg = parse(data)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    status = data.decode()
    assert "Final-Recipient: rfc822; alice@example.com" in status
    assert "Action: failed" in status
    assert "Status: 5.1.1" in status
    assert "Diagnostic-Code: smtp; 550 5.1.1 no such user" in status
    assert "Reporting-MTA: dns; mx.hub.example" in status
    assert "Subject: hello" in parts[2].get_payload() if isinstance(parts[2].get_payload(), str) else True
    assert b"Subject: hello" in data and b"body line" not in data


def test_expired_recipient_reports_delivery_time_expired_with_last_error():
    _, data = build_dsn("mx.hub.example", entry(), [Outcome(A, Action.EXPIRED, Reply(421, "4.4.1", "refused"))],
                        ORIGINAL, 1_700_000_000.0 + 7 * 86400)
    text = data.decode()
    assert "Status: 4.4.7" in text
    assert "Diagnostic-Code: smtp; 421 4.4.1 refused" in text
    assert "7 day(s)" in text


def test_no_dsn_to_the_null_sender():
    assert build_dsn("h", entry(sender=None), [Outcome(A, Action.FAILED, Reply(550))], ORIGINAL, 0.0) is None


def test_dsn_lines_end_in_crlf_only():
    _, data = build_dsn("h.example", entry(), [Outcome(A, Action.FAILED, Reply(550, "5.0.0", "a\nb"))], ORIGINAL, 0.0)
    assert data.count(b"\n") == data.count(b"\r\n")
    assert data.count(b"\r") == data.count(b"\r\n")
