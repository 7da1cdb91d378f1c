"""RFC 3464 delivery status notifications."""

import email
import email.policy

from attrs import evolve as attrs_evolve

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


# -- found by scripts/mutate ---------------------------------------------------


def test_rejection_without_enhanced_code_reports_status_5_0_0():
    """A server that does not send enhanced codes (``550 no such user``): the DSN's status is 5.0.0."""
    _, data = build_dsn("mx.hub.example", entry(), [Outcome(A, Action.FAILED, Reply(550, "", "no such user"))],
                        ORIGINAL, 1_700_000_100.0)
    text = data.decode()
    assert "Status: 5.0.0" in text
    assert "Diagnostic-Code: smtp; 550 no such user" in text


def test_dsn_tells_the_sender_in_plain_words_which_recipient_failed_and_why():
    """The text part, for people: that delivery failed, then one line per recipient with its last error."""
    _, data = build_dsn("mx.hub.example", entry(), [Outcome(A, Action.FAILED, Reply(550, "5.1.1", "no such user"))],
                        ORIGINAL, 1_700_000_100.0)
    assert (
        b"Your message could not be delivered to the recipients below.\r\n"
        b"\r\n"
        b"<alice@example.com>: 550 5.1.1 no such user\r\n"
    ) in data


def test_remote_mta_names_the_route_host_only_when_it_is_one():
    """``Remote-MTA`` names the server of an smtp/lmtp route; not for ``smtp:mx`` (looked up) or http."""

    def dsn_for(route: str) -> str:
        e = Entry(id="e1", message_id="m1", route=route, sender=SENDER, recipients=(Recipient(A),),
                  created=1_700_000_000.0)
        _, data = build_dsn("mx.hub.example", e, [Outcome(A, Action.FAILED, Reply(550, "5.1.1", "no"))],
                            ORIGINAL, 1_700_000_100.0)
        return data.decode()

    assert "Remote-MTA: dns; mail.example.com\r\n" in dsn_for("smtp:mail.example.com:25")
    assert "Remote-MTA: dns; dovecot.example.com\r\n" in dsn_for("lmtp:dovecot.example.com:24")
    assert "Remote-MTA" not in dsn_for("smtp:mx")
    assert "Remote-MTA" not in dsn_for("http:https://mail.example.com/in")


def test_remote_mta_names_the_server_host_and_never_a_unix_socket():
    outcome = [Outcome(A, Action.FAILED, Reply(550, "5.1.1", "no such user"))]
    _, data = build_dsn("mx.hub.example", entry(), outcome, ORIGINAL, 1_700_000_100.0)
    assert b"Remote-MTA: dns; mail.example.com\r\n" in data
    local = attrs_evolve(entry(), route="lmtp:unix:/run/dovecot/lmtp")
    _, data = build_dsn("mx.hub.example", local, outcome, ORIGINAL, 1_700_000_100.0)
    assert b"Remote-MTA" not in data
    assert b"Final-Recipient: rfc822; alice@example.com" in data
