"""
``mailhub archive`` as an operator types it, wrong more often than right:
import, export, hold, audit and search against a SQLite archive, no hub
running (the command opens the archive itself).  Each case comes from an
operator's walk through the README: the message, the exit status, and that
nothing is lost or changed behind the operator's back.
"""

from __future__ import annotations

import json
import mailbox
import os
import subprocess
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from hubprocess import BIN, free_port, hub_config, mailhub_cli
from mailhub.archive.text import extract
from mailhub.config import load
from mailhub.model import Address, ArchivedMessage
from mailhub.plugin import load_plugin

DAY = 86400.0


def config(tmp_path: Path, retention_days: int = 30) -> Path:
    text = hub_config(tmp_path / "spool.db", free_port(), {"dallas": free_port()})
    text += f'[archive]\nplugin = "sqlite"\npath = "{tmp_path / "archive.db"}"\nretention_days = {retention_days}\n'
    path = tmp_path / "hub.toml"
    path.write_text(text)
    return path


def mbox_text(*messages: tuple[str, float, str]) -> str:
    """An mbox of (subject, received time, body) messages, LF line ends, as mail tools write it."""
    out = []
    for i, (subject, when, body) in enumerate(messages):
        stamp = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(when))
        out.append(
            f"From someone@outside.example {stamp}\n"
            f"From: someone@outside.example\nTo: alice@example.com\nSubject: {subject}\n"
            f"Message-ID: <m{i}.{int(when)}@outside.example>\n\n{body}\n\n"
        )
    return "".join(out)


def run(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return mailhub_cli(cfg, "archive", *args)


def search(cfg: Path, mailbox_: str, *query: str) -> dict:
    out = run(cfg, "search", "--mailbox", mailbox_, "--json", "--limit", "1000", *query)
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def one_line_error(out: subprocess.CompletedProcess[str], status: int) -> str:
    assert out.returncode == status, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    # Progress lines ("exported: 1/1") may come first; the error is one line of its own.
    lines = [line for line in out.stderr.strip().splitlines() if not line.startswith(("exported:", "imported:"))]
    assert len(lines) == 1, out.stderr
    return lines[0]


# -- import: nothing lost, nothing expired behind the operator's back ------------


def test_history_older_than_the_retention_is_refused_unless_kept(tmp_path: Path) -> None:
    cfg = config(tmp_path, retention_days=30)
    now = time.time()
    source = tmp_path / "bob.mbox"
    source.write_text(mbox_text(("old one", now - 90 * DAY, "a"), ("old two", now - 60 * DAY, "b"),
                                ("recent", now - 2 * DAY, "c")))
    refused = run(cfg, "import", "--mbox", str(source), "--mailbox", "bob@example.com")
    line = one_line_error(refused, 1)
    assert "2 of 3 messages are older than example.com's retention of 30 days" in line
    assert "Nothing was imported" in line and "--allow-expiry" in line
    assert search(cfg, "bob@example.com")["total"] == 0

    # A legal hold on the mailbox keeps them: the import goes ahead.
    held = run(cfg, "hold", "--mailbox", "bob@example.com", "--reason", "history")
    assert held.returncode == 0, held.stderr
    done = run(cfg, "import", "--mbox", str(source), "--mailbox", "bob@example.com", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["imported"] == 3

    # Without a hold, --allow-expiry says the operator knows.
    anyway = run(cfg, "import", "--mbox", str(source), "--mailbox", "carol@example.com", "--allow-expiry")
    assert anyway.returncode == 0, anyway.stderr
    assert "3 messages imported for carol@example.com" in anyway.stdout


def test_an_export_imports_back_unchanged_and_once(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    now = time.time()
    # As mail tools write it: body lines reading "From " quoted mboxrd style.
    quoted = ">From the desk of Alice\n>>From a quoted line\n>>>From twice quoted\nFromage"
    source = tmp_path / "in.mbox"
    source.write_text(mbox_text(("desk", now - DAY, quoted)))
    assert run(cfg, "import", "--mbox", str(source), "--mailbox", "alice@example.com").returncode == 0
    [item] = search(cfg, "alice@example.com")["items"]
    original = run(cfg, "show", item["id"], "--raw").stdout
    # (Read as text: the message's CRLF line ends come out as LF.)
    assert "\n\nFrom the desk of Alice\n>From a quoted line\n>>From twice quoted\nFromage\n" in original

    exported = tmp_path / "out.mbox"
    out = run(cfg, "export", "--mailbox", "alice@example.com", "--output", str(exported))
    assert out.returncode == 0, out.stderr
    # mboxrd on disk: one more ">" on each "From " line of the body.
    assert "\n" + quoted + "\n" in exported.read_text()

    again = run(cfg, "import", "--mbox", str(exported), "--mailbox", "alice@example.com", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) | {"source": ""} == {
        "mailbox": "alice@example.com", "source": "", "read": 1, "imported": 0, "already": 1,
        "folders": [], "skipped_folders": [],
    }
    assert search(cfg, "alice@example.com")["total"] == 1

    # Into another mailbox: the same message, byte for byte, quoting undone.
    assert run(cfg, "import", "--mbox", str(exported), "--mailbox", "dave@example.com").returncode == 0
    [copy] = search(cfg, "dave@example.com")["items"]
    assert run(cfg, "show", copy["id"], "--raw").stdout == original


@pytest_twisted.ensureDeferred
async def test_mail_the_hub_archived_is_not_imported_twice_from_its_export(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    hub = load(str(cfg))
    archive = load_plugin("mailhub.archives", "sqlite").make(hub.archive_section(), reactor)
    data = (b"From: x@outside.example\r\nTo: alice@example.com\r\nSubject: relayed\r\n"
            b"Message-ID: <relayed-1@outside.example>\r\n\r\nhello\r\n")
    try:
        await archive.add(ArchivedMessage("hub-1", time.time() - 3600.5, Address.parse("x@outside.example"),
                                          (Address.parse("alice@example.com"),), data, extract(data)))
    finally:
        await archive.close()
    exported = tmp_path / "alice.mbox"
    assert run(cfg, "export", "--mailbox", "alice@example.com", "--output", str(exported)).returncode == 0
    again = run(cfg, "import", "--mbox", str(exported), "--mailbox", "alice@example.com")
    assert again.returncode == 0, again.stderr
    assert "0 messages imported for alice@example.com" in again.stdout
    assert "1 was in the archive already" in again.stdout
    assert search(cfg, "alice@example.com")["total"] == 1


@pytest.mark.parametrize(
    "content",
    [
        "From: a@outside.example\nSubject: one message saved as .eml\n\nhello\n",
        "just some notes\n",
        "\x00\x01\x02binary\xff",
        # A message before the first "From " line would be dropped.
        "Subject: no From line\n\nlost?\n\nFrom x@y.example Mon Jan  5 10:00:00 2026\nSubject: two\n\nb\n",
    ],
    ids=["eml", "text", "binary", "no-leading-from"],
)
def test_what_is_not_an_mbox_is_refused_whole(tmp_path: Path, content: str) -> None:
    cfg = config(tmp_path)
    source = tmp_path / "x.mbox"
    source.write_bytes(content.encode("latin-1"))
    line = one_line_error(run(cfg, "import", "--mbox", str(source), "--mailbox", "alice@example.com",
                              "--allow-expiry"), 1)
    assert "does not start with a 'From ' line" in line and "nothing was imported" in line
    assert search(cfg, "alice@example.com")["total"] == 0


def test_missing_sources_are_named(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    line = one_line_error(run(cfg, "import", "--mbox", str(tmp_path / "nope.mbox"), "--mailbox", "a@example.com"), 1)
    assert line.endswith("nope.mbox: no such file or directory")
    line = one_line_error(run(cfg, "import", "--maildir", str(tmp_path / "Maildir"), "--mailbox", "a@example.com"), 1)
    assert "is not a Maildir (it has no cur/ and new/)" in line


def test_maildir_subfolders_are_named_and_imported_when_asked(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    md = mailbox.Maildir(str(tmp_path / "Maildir"), create=True)
    md.add(b"From: a@outside.example\nSubject: inbox\nDate: " + time.strftime(
        "%a, %d %b %Y %H:%M:%S +0000", time.gmtime()).encode() + b"\n\ninbox\n")
    sent = md.add_folder("Sent")
    sent.add(b"From: alice@example.com\nSubject: sent one\n\nsent\n")
    out = run(cfg, "import", "--maildir", str(tmp_path / "Maildir"), "--mailbox", "alice@example.com")
    assert out.returncode == 0, out.stderr
    assert "1 message imported" in out.stdout
    assert "1 subfolder not imported (Sent): add --folders to import it too" in out.stderr
    out = run(cfg, "import", "--maildir", str(tmp_path / "Maildir"), "--folders", "--mailbox", "alice@example.com",
              "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert (got["read"], got["imported"], got["already"], got["folders"]) == (2, 1, 1, ["Sent"])
    assert search(cfg, "alice@example.com")["total"] == 2


# -- export: the file is whole or untouched ----------------------------------------


def test_export_refuses_to_overwrite_and_names_what_it_cannot_write(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    source = tmp_path / "in.mbox"
    source.write_text(mbox_text(("one", time.time() - DAY, "x")))
    assert run(cfg, "import", "--mbox", str(source), "--mailbox", "alice@example.com").returncode == 0
    target = tmp_path / "keep.mbox"
    target.write_text("precious\n")
    line = one_line_error(run(cfg, "export", "--mailbox", "alice@example.com", "--output", str(target)), 2)
    assert "exists: add --force to replace it" in line
    assert target.read_text() == "precious\n"
    out = run(cfg, "export", "--mailbox", "alice@example.com", "--output", str(target), "--force", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["exported"] == 1 and len(mailbox.mbox(str(target))) == 1
    assert not (tmp_path / "keep.mbox.part").exists()

    line = one_line_error(run(cfg, "export", "--mailbox", "alice@example.com", "--output", str(tmp_path)), 2)
    assert "is a directory" in line
    line = one_line_error(
        run(cfg, "export", "--mailbox", "alice@example.com", "--output", str(tmp_path / "no" / "dir.mbox")), 1
    )
    assert "cannot write" in line and "No such file or directory" in line


def test_a_failed_write_is_reported(tmp_path: Path) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")  # a Linux device node
    cfg = config(tmp_path)
    source = tmp_path / "in.mbox"
    source.write_text(mbox_text(("one", time.time() - DAY, "x" * 100)))
    assert run(cfg, "import", "--mbox", str(source), "--mailbox", "alice@example.com").returncode == 0
    # A device is written in place (no temporary beside it): the write fails, and says so.
    line = one_line_error(run(cfg, "export", "--mailbox", "alice@example.com", "--output", "/dev/full"), 1)
    assert "writing /dev/full failed after" in line and "No space left on device" in line
    assert os.path.exists("/dev/full") and not os.path.isfile("/dev/full")
    assert not os.path.exists("/dev/full.part")


# -- hold, audit, search: mistakes are named ---------------------------------------


def test_hold_checks_what_it_is_given(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    line = one_line_error(run(cfg, "hold", "--domain", "nothere.example", "--reason", "y"), 2)
    assert "nothere.example is not a domain of this hub" in line
    line = one_line_error(run(cfg, "hold", "--mailbox", "alice@outside.example"), 2)
    assert "outside.example is not a domain of this hub" in line
    line = one_line_error(run(cfg, "hold", "--mailbox", "nobody@example.com", "--release"), 1)
    assert "no hold on mailbox nobody@example.com" in line
    assert json.loads(run(cfg, "holds", "--json").stdout) == []
    out = run(cfg, "hold", "--mailbox", "Alice@Example.com", "--json")
    assert json.loads(out.stdout)["scope"] == "mailbox alice@example.com"


@pytest.mark.parametrize("args", [
    ("audit", "--since", "2026-13-01"),
    ("audit", "--until", "2026-02-30"),
    ("audit", "--since", "yesterday"),
    ("search", "--domain", "example.com", "--cursor", "garbage", "x"),
    ("search", "--limit", "0"),
    ("search", "--limit", "-5"),
    ("audit", "--limit", "100000"),
    ("search", "--all"),
])
def test_bad_arguments_get_one_line_and_status_2(tmp_path: Path, args: tuple[str, ...]) -> None:
    cfg = config(tmp_path)
    out = run(cfg, *args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr


def test_scope_errors_name_the_options_the_command_has(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    line = one_line_error(run(cfg, "search", "--mailbox", "a@example.com", "--domain", "example.com"), 2)
    assert line.endswith("give only one of --mailbox, --domain")
    line = one_line_error(run(cfg, "export", "--mailbox", "a@example.com", "--all", "--output", "x"), 2)
    assert line.endswith("give only one of --mailbox, --domain, --all")


def test_redeliver_outside_the_hub_or_of_nothing(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    line = one_line_error(run(cfg, "redeliver", "--domain", "outside.example"), 2)
    assert "there is no route to re-deliver to" in line
    out = run(cfg, "redeliver", "--mailbox", "alice@example.com", "nothing-matches")
    assert out.returncode == 0 and out.stdout == "no messages of mailbox alice@example.com match: nothing to re-deliver\n"
    assert "woke" not in out.stdout + out.stderr


def test_audit_show_is_read_and_an_empty_log_says_so(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    assert run(cfg, "audit", "--action", "show").stdout == "no audit events match\n"
    source = tmp_path / "in.mbox"
    source.write_text(mbox_text(("one", time.time() - DAY, "x")))
    assert run(cfg, "import", "--mbox", str(source), "--mailbox", "alice@example.com").returncode == 0
    [item] = search(cfg, "alice@example.com")["items"]
    assert run(cfg, "show", item["id"]).returncode == 0
    [event] = json.loads(run(cfg, "audit", "--action", "show", "--json").stdout)
    assert (event["action"], event["scope"]) == ("read", item["id"])
    [imported] = json.loads(run(cfg, "audit", "--action", "import", "--json").stdout)
    assert str(source) in imported["detail"]  # the whole path, not as typed


def test_a_reader_that_goes_away_is_no_error(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    # `mailhub archive audit | head -0`: the pipe is closed before the first line.
    proc = subprocess.Popen([str(BIN / "mailhub"), "archive", "--config", str(cfg), "audit"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 1
    assert err == ""

