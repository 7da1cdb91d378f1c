"""
Test helpers for mailhub and for third-party plugin authors.

- ``mailhub.testing.store_contract``: the spool-store contract suites
  (``SpoolStoreContract``, ``NodeRegistryContract``,
  ``RouteCoordinationContract``, ``LeaseReclaimContract``,
  ``SpoolControlContract``); a store plugin's
  tests subclass them and provide a ``store`` fixture.
- ``mailhub.testing.archive_contract`` and ``mailhub.testing.account_contract``:
  the archive's and the accounts' contract suites (``ArchiveContract``,
  ``AccountStoreContract``); an archive plugin's tests subclass them and
  provide an ``archive`` fixture.
- ``mailhub.testing.transport_contract``: the transport contract suites
  (``TransportContract``, ``NetworkTransportContract``); a transport
  plugin's tests subclass them and provide a ``harness`` fixture (a
  ``TransportHarness``).
- ``mailhub.testing.downstream``: a real SMTP server to deliver to, that a test
  switches between accepting, deferring, rejecting, dropping and being down,
  with a connection limit (``452 4.3.1`` above it) like Exchange's.
- ``mailhub.testing.redis_server`` and ``mailhub.testing.postgres_server``: a
  private ``redis-server`` or PostgreSQL cluster in a temporary directory.
- ``mailhub.testing.dovecot``: a real Dovecot LMTP server in a temporary
  directory (``apt-get install dovecot-core dovecot-lmtpd``).
- ``mailhub.testing.http_receiver``: a real ``twisted.web`` server that takes
  the ``http`` transport's POSTs and answers as a test tells it to.
"""
