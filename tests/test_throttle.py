"""Pacing per route: the concurrency window, back pressure, recovery."""

import weakref

from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from mailhub.delivery.throttle import FIRST_PAUSE, READ_AHEAD, RouteThrottle, is_back_pressure
from mailhub.model import Reply

OK = Reply(250, "2.0.0", "OK")
BUSY = Reply(452, "4.3.1", "Insufficient system resources")
REFUSED = Reply(421, "4.4.1", "Connection refused")
NO_USER = Reply(550, "5.1.1", "no such user")


def started(throttle, n):
    ds = [throttle.acquire() for _ in range(n)]
    return sum(d.called for d in ds), ds


def test_back_pressure_is_recognised():
    assert is_back_pressure(BUSY)
    assert is_back_pressure(Reply(421, "4.3.2", "not accepting"))
    assert not is_back_pressure(REFUSED)
    assert not is_back_pressure(Reply(550, "5.3.1", "permanent"))


def test_window_starts_at_max_connections():
    t = RouteThrottle(4, Clock())
    count, _ = started(t, 10)
    assert count == 4 and t.waiting == 6


def test_back_pressure_halves_the_window_and_pauses_briefly():
    clock = Clock()
    t = RouteThrottle(8, clock, random=lambda: 0.5)
    count, ds = started(t, 20)
    assert count == 8
    t.release([BUSY])
    assert t.window == 4
    assert t.paused_until - clock.seconds() == FIRST_PAUSE
    assert sum(d.called for d in ds) == 8  # paused: nothing new starts
    clock.advance(FIRST_PAUSE - 0.1)
    assert sum(d.called for d in ds) == 8
    for _ in range(7):
        t.release([OK])
    clock.advance(0.1)
    # After the pause, at most the (slowly widening) window runs at once.
    assert t.active == int(t.window) and t.active in (4, 5)


def test_pause_doubles_while_pressure_lasts_up_to_the_maximum_and_resets_on_success():
    clock = Clock()
    t = RouteThrottle(8, clock, max_pause=4, random=lambda: 0.5)
    for expected in (1, 2, 4, 4):
        t.acquire()
        t.release([BUSY])
        assert t.paused_until - clock.seconds() == expected
        clock.advance(expected)
    t.acquire()
    t.release([OK])
    t.acquire()
    t.release([BUSY])
    assert t.paused_until - clock.seconds() == 1


def test_pauses_are_jittered_so_nodes_do_not_resume_in_step():
    """Two nodes pushed back at the same moment come back at different times."""
    clock = Clock()
    a = RouteThrottle(8, clock, random=lambda: 0.1)
    b = RouteThrottle(8, clock, random=lambda: 0.9)
    for t in (a, b):
        t.acquire()
        t.release([BUSY])
    assert a.paused_until != b.paused_until
    assert 0.5 <= a.paused_until - clock.seconds() < b.paused_until - clock.seconds() <= 1.5


def test_attempts_already_running_go_on_during_a_pause():
    """A pause stops new attempts only: the route is not left idle while the server has room."""
    clock = Clock()
    t = RouteThrottle(4, clock, random=lambda: 0.5)
    started(t, 4)
    t.release([BUSY])
    assert t.active == 3


def test_attempts_stay_within_the_nodes_share():
    t = RouteThrottle(10, Clock())
    asked: list[int] = []
    t = RouteThrottle(10, Clock(), on_demand=lambda: asked.append(t.demand()))
    t.set_share(2)
    count, ds = started(t, 5)
    assert count == 2 and t.waiting == 3
    assert asked and asked[-1] == 5  # it asks for more
    t.set_share(4)
    assert sum(d.called for d in ds) == 4
    t.set_share(1)  # a smaller share: running attempts go on, none starts
    t.release([OK])
    t.release([OK])
    t.release([OK])
    assert t.active == 1 and sum(d.called for d in ds) == 4
    t.release([OK])
    assert t.active == 1 and all(d.called for d in ds)


def test_share_of_zero_starts_nothing():
    t = RouteThrottle(3, Clock())
    t.set_share(0)
    count, _ = started(t, 2)
    assert count == 0 and t.demand() == 2


def test_rate_spaces_attempts():
    """``max_rate`` 2/s with the whole share: an attempt every half second."""
    clock = Clock()
    t = RouteThrottle(4, clock, rate=2.0)
    ds = [t.acquire() for _ in range(4)]
    assert sum(d.called for d in ds) == 1
    clock.advance(0.5)
    assert sum(d.called for d in ds) == 2
    clock.pump([0.5, 0.5])
    assert sum(d.called for d in ds) == 4


def test_rate_follows_the_share():
    """With half the connections, the node starts half the hub's rate."""
    clock = Clock()
    t = RouteThrottle(4, clock, rate=2.0)
    t.set_share(2)
    ds = [t.acquire() for _ in range(2)]
    assert sum(d.called for d in ds) == 1
    clock.advance(0.5)
    assert sum(d.called for d in ds) == 1
    clock.advance(0.5)
    assert sum(d.called for d in ds) == 2


def test_status_says_why_attempts_wait():
    clock = Clock()
    t = RouteThrottle(4, clock, random=lambda: 0.5)
    t.set_share(1)
    started(t, 3)
    assert "share is 1 of 4" in t.status()["why"]
    t.release([BUSY])
    status = t.status()
    assert status["state"] == "back-pressure" and "back pressure since" in status["why"]
    assert "452 4.3.1" in status["why"]


def test_window_widens_with_deliveries_up_to_the_maximum():
    t = RouteThrottle(4, Clock())
    t.window = 1.0
    for _ in range(50):
        t.acquire()
        t.release([OK])
    assert t.window == 4


def test_route_that_comes_back_restarts_at_a_quarter_and_reports_recovery():
    t = RouteThrottle(20, Clock())
    t.acquire()
    assert t.release([REFUSED]) is False
    assert t.down
    t.acquire()
    assert t.release([OK]) is True
    assert t.window == 5
    t.acquire()
    assert t.release([OK]) is False


def test_permanent_failures_do_not_mark_the_route_down():
    t = RouteThrottle(4, Clock())
    t.acquire()
    t.release([NO_USER])
    assert not t.down and t.failed == 1 and t.window == 4


def test_cancelled_waiter_leaves_the_queue():
    t = RouteThrottle(1, Clock())
    t.acquire()
    waiting = t.acquire()
    waiting.addErrback(lambda f: None)
    waiting.cancel()
    assert t.waiting == 0


def test_status_reports_progress():
    clock = Clock()
    t = RouteThrottle(4, clock)
    for _ in range(3):
        t.acquire()
        t.release([OK])
    status = t.status()
    assert status["delivered"] == 3 and status["delivered_last_minute"] == 3
    clock.advance(61)
    assert t.status()["delivered_last_minute"] == 0


def test_one_episode_of_back_pressure_is_answered_once():
    """Twelve attempts in flight all hit the same 452: one halving, one pause."""
    clock = Clock()
    t = RouteThrottle(12, clock, max_pause=300, random=lambda: 0.5)
    started(t, 12)
    for _ in range(12):
        t.release([BUSY])
    assert t.window == 6
    assert t.paused_until - clock.seconds() == FIRST_PAUSE
    assert t.back_pressure == 12


def told_acquire(t, told, name):
    return t.acquire(lambda: told.append(name))


def test_soon_is_called_once_an_attempt_is_among_the_next_windows_to_start():
    t = RouteThrottle(2, Clock())
    told: list[str] = []
    ds = [told_acquire(t, told, name) for name in "abcdefghi"]
    # a, b start; c to f are the next two windows to start; g, h, i wait
    # further back.
    assert READ_AHEAD == 2
    assert [d.called for d in ds] == [True, True] + [False] * 7
    assert told == list("abcdef")
    t.release([OK])
    assert ds[2].called and told == list("abcdefg")
    t.release([OK])
    t.release([OK])
    assert told == list("abcdefghi")
    # Each once, whatever comes after.
    for _ in range(6):
        t.release([OK])
    assert all(d.called for d in ds)
    assert told == list("abcdefghi")


def test_soon_follows_the_window():
    clock = Clock()
    t = RouteThrottle(4, clock)
    told: list[str] = []
    started(t, 4)
    for name in "abcdefghijklmnop":
        told_acquire(t, told, name)
    assert "".join(told) == "abcdefgh"  # two windows of 4
    # Back pressure halves the window: the first two windows of 2 are told
    # already, and no one more while it narrows and slowly widens again.
    t.release([BUSY])
    clock.advance(30)
    t.release([OK])
    t.release([OK])
    assert t.window < 3 and t.waiting == 15
    assert "".join(told) == "abcdefgh"
    # Wider than 3: the front of the queue moves up into two windows again.
    t.release([OK])
    assert int(t.window) == 3 and t.waiting == 13
    assert "".join(told) == "abcdefghi"
    while t.waiting:
        t.release([OK])
    assert "".join(told) == "abcdefghijklmnop"


def test_a_cancelled_waiter_is_not_told_and_frees_its_place():
    t = RouteThrottle(1, Clock())
    told: list[str] = []
    first = told_acquire(t, told, "first")
    second = told_acquire(t, told, "second")
    third = told_acquire(t, told, "third")
    fourth = told_acquire(t, told, "fourth")
    assert first.called and told == ["first", "second", "third"]
    second.addErrback(lambda f: None)
    second.cancel()
    # Third and fourth are now the next two to start: the fourth is told at
    # the next turn of the queue.
    told_acquire(t, told, "fifth").addErrback(lambda f: None)
    assert told == ["first", "second", "third", "fourth"]
    for d in (third, fourth):
        d.addErrback(lambda f: None)
        d.cancel()
    t.release([OK])
    assert told == ["first", "second", "third", "fourth", "fifth"]
    assert t.active == 1 and t.waiting == 0


def test_a_failing_soon_is_logged_and_takes_nothing_with_it():
    """A ``soon`` that raises (a store breaking its contract) costs neither a slot nor a waiter."""
    t = RouteThrottle(1, Clock())

    def broken() -> None:
        raise RuntimeError("read-ahead broke")

    with capturedLogs() as events:
        first = t.acquire(broken)
        second = t.acquire(broken)
        third = t.acquire(broken)
    assert first.called and not second.called
    t.release([OK])
    assert second.called and t.active == 1
    t.release([OK])
    assert third.called and t.active == 1
    failures = [e for e in events if "log_failure" in e]
    assert len(failures) == 3
    assert all(e["log_failure"].check(RuntimeError) for e in failures)


def test_a_cancelled_waiter_lets_go_of_its_soon():
    """The ``soon`` of a cancelled waiter is dropped with it, not kept until the queue moves."""
    t = RouteThrottle(1, Clock())
    t.acquire()
    told: list[str] = []

    class Soon:
        def __call__(self) -> None:
            told.append("soon")

    soon = Soon()
    ref = weakref.ref(soon)
    for _ in range(3):
        t.acquire()  # the next two windows of 1 are taken
    waiting = t.acquire(soon)
    del soon
    waiting.addErrback(lambda f: None)
    waiting.cancel()
    assert ref() is None
    assert told == []


def test_the_pace_of_a_drain_that_began_seconds_ago_is_not_averaged_over_a_minute():
    clock = Clock()
    t = RouteThrottle(20, clock)
    clock.advance(100)
    for _ in range(100):  # 100 deliveries in 8 s: 750 a minute
        t.acquire()
        t.release([OK])
        clock.advance(0.08)
    status = t.status()
    assert status["delivered_last_minute"] == 100
    assert status["pace_per_minute"] == 750
    # The first few deliveries promise no more than five seconds' worth.
    fresh = RouteThrottle(4, clock)
    fresh.acquire()
    fresh.release([OK])
    assert fresh.status()["pace_per_minute"] == 12
    # A minute on, the pace is the minute's count again.
    clock.advance(52)
    assert t.status()["pace_per_minute"] == t.status()["delivered_last_minute"] == 100
    clock.advance(61)
    assert t.status()["pace_per_minute"] == 0
