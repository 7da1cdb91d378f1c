"""The standard policy's schedule, against a fixed clock and fixed jitter."""

from zope.interface.verify import verifyObject

from mailhub.interfaces import IDeliveryPolicy, IPolicyPlugin
from mailhub.model import Action, Address, Entry, Recipient, Reply
from mailhub.plugins.standard_policy import StandardPolicy, plugin

A = Address("alice", "example.com")
B = Address("bob", "example.com")
OK = Reply(250, "2.0.0", "OK")
TEMP = Reply(451, "4.3.0", "try later")
PERM = Reply(550, "5.1.1", "no such user")
DAY = 86400.0


def policy(nodes=("dallas", "losangeles"), **kw):
    return StandardPolicy(nodes=nodes, jitter=kw.pop("jitter", 0.0), **kw)


def entry(attempts=0, created=0.0, recipients=(A,), last=None):
    """An entry; tried ``attempts`` times, the last reply ``last`` (a deferral by default)."""
    if last is None and attempts:
        last = TEMP
    return Entry(
        id="e1", message_id="m1", route="smtp:mx.example.com:25", sender=Address("s", "sender.example"),
        recipients=tuple(Recipient(r, reply=last) for r in recipients), created=created, attempts=attempts,
    )


def test_plugin_and_policy_provide_their_interfaces():
    assert verifyObject(IPolicyPlugin, plugin)
    assert verifyObject(IDeliveryPolicy, plugin.make({"nodes": ["dallas", "losangeles"]}, None))


def test_success_delivers():
    d = policy().decide(entry(), {A: OK}, 100.0, "dallas")
    assert [o.action for o in d.outcomes] == [Action.DELIVERED]
    assert d.next_attempt is None


def test_deferral_goes_to_the_other_node_after_ten_minutes():
    d = policy().decide(entry(), {A: TEMP}, 100.0, "dallas")
    assert d.outcomes[0].action is Action.RETRY
    assert d.next_attempt == 100.0 + 600
    assert d.next_node == "losangeles"
    d2 = policy().decide(entry(attempts=1), {A: TEMP}, 700.0, "losangeles")
    assert d2.next_node == "dallas"
    assert d2.next_attempt == 700.0 + 600


def test_each_node_retries_an_entry_every_twenty_minutes():
    p = policy()
    now, node, attempts = 0.0, "dallas", 0
    seen: dict[str, list[float]] = {"dallas": [], "losangeles": []}
    while now < 3 * 3600:
        seen[node].append(now)
        d = p.decide(entry(attempts=attempts), {A: TEMP}, now, node)
        now, node, attempts = d.next_attempt, d.next_node, attempts + 1
    for times in seen.values():
        gaps = {round(b - a) for a, b in zip(times, times[1:], strict=False)}
        assert gaps == {1200}


def test_single_node_retries_every_retry_minutes():
    d = policy(nodes=("dallas",)).decide(entry(), {A: TEMP}, 0.0, "dallas")
    assert d.next_attempt == 1200.0
    assert d.next_node == "dallas"


def test_jitter_moves_the_attempt_within_bounds():
    early = StandardPolicy(nodes=("a", "b"), jitter=0.1, random=lambda: 0.0)
    late = StandardPolicy(nodes=("a", "b"), jitter=0.1, random=lambda: 1.0)
    assert early.decide(entry(), {A: TEMP}, 0.0, "a").next_attempt == 540.0
    assert late.decide(entry(), {A: TEMP}, 0.0, "a").next_attempt == 660.0


def test_temporary_failure_after_lifetime_expires():
    d = policy().decide(entry(created=0.0), {A: TEMP}, 7 * DAY, "dallas")
    assert d.outcomes[0].action is Action.EXPIRED
    assert d.next_attempt is None


def test_last_retry_is_scheduled_at_the_moment_of_expiry():
    d = policy().decide(entry(created=0.0, attempts=5), {A: TEMP}, 7 * DAY - 60, "dallas")
    assert d.next_attempt == 7 * DAY


def test_permanent_failure_on_first_attempt_fails_the_recipient():
    d = policy().decide(entry(recipients=(A, B)), {A: PERM, B: OK}, 0.0, "dallas")
    assert {o.recipient: o.action for o in d.outcomes} == {A: Action.FAILED, B: Action.DELIVERED}


def test_rebuilt_server_rejecting_everything_after_a_deferral_holds():
    d = policy().decide(entry(attempts=3, recipients=(A, B)), {A: PERM, B: PERM}, 0.0, "dallas")
    assert {o.action for o in d.outcomes} == {Action.HOLD}
    assert d.hold


def test_rejection_after_a_rejection_fails():
    """An entry held for a 5xx and released, rejected again, was not deferred before: it bounces."""
    d = policy().decide(entry(attempts=2, last=PERM), {A: PERM}, 0.0, "dallas")
    assert d.outcomes[0].action is Action.FAILED


def test_partial_rejection_after_a_deferral_still_fails_only_that_recipient():
    d = policy().decide(entry(attempts=3, recipients=(A, B)), {A: PERM, B: OK}, 0.0, "dallas")
    assert {o.recipient: o.action for o in d.outcomes} == {A: Action.FAILED, B: Action.DELIVERED}


def test_hold_rule_can_be_switched_off():
    p = plugin.make({"nodes": ["a", "b"], "hold_on_reject_after_deferral": False}, None)
    d = p.decide(entry(attempts=3), {A: PERM}, 0.0, "a")
    assert d.outcomes[0].action is Action.FAILED


def test_plugin_reads_minutes_and_days():
    p = plugin.make({"nodes": ["a", "b"], "retry_minutes": 30, "lifetime_days": 2}, None)
    assert p.retry_seconds == 1800 and p.lifetime == 2 * DAY


def test_plugin_rejects_bad_numbers_naming_the_key():
    import pytest

    with pytest.raises(ValueError, match="policy.retry_minutes"):
        plugin.make({"nodes": ["a"], "retry_minutes": "often"}, None)


# -- found by scripts/mutate ---------------------------------------------------


def test_reject_after_a_single_deferral_holds():
    """One deferral before is enough: an entry deferred once, then rejected for everyone, is held."""
    d = policy().decide(entry(attempts=1, recipients=(A, B)), {A: PERM, B: PERM}, 0.0, "dallas")
    assert {o.action for o in d.outcomes} == {Action.HOLD}


def test_deferral_by_a_node_not_in_the_list_goes_to_the_first_node():
    """A node the policy does not know (a removed site) passes a deferred entry to the first node."""
    d = policy().decide(entry(), {A: TEMP}, 0.0, "paris")
    assert d.next_node == "dallas"


def test_deferral_without_nodes_is_for_any_node():
    """A policy with no node list gives the next attempt to no particular node."""
    p = policy(nodes=())
    d = p.decide(entry(), {A: TEMP}, 0.0, "dallas")
    assert (d.next_node, d.next_attempt) == (None, 20 * 60.0)


def test_recipient_the_transport_gave_no_reply_for_is_retried():
    """A recipient missing from the transport's replies is a temporary failure (451 4.3.0), never a bounce."""
    d = policy().decide(entry(recipients=(A, B)), {A: OK}, 0.0, "dallas")
    outcomes = {o.recipient: o for o in d.outcomes}
    assert outcomes[A].action is Action.DELIVERED
    assert (outcomes[B].action, outcomes[B].reply.code) == (Action.RETRY, 451)
