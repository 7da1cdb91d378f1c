"""
The test SMTP server, ``DownstreamServer``, for tests that need "the
organisation's server" on a real socket.

It lives in ``mailhub.sink``, which ``mailhub sink`` runs for people trying
the hub; this module keeps the name tests and third-party test suites import
it by (``python -m mailhub.testing.downstream`` runs it too).
"""

from mailhub.sink import DownstreamServer, ReceivedMessage, main

__all__ = ["DownstreamServer", "ReceivedMessage", "main"]

if __name__ == "__main__":
    main()
