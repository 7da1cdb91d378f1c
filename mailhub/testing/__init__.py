"""
Test helpers for mailhub and for third-party plugin authors.

- ``mailhub.testing.store_contract``: the spool-store contract suite; a store
  plugin's tests subclass it and provide a ``store`` fixture.
- ``mailhub.testing.downstream``: a real SMTP server to deliver to, that a test
  switches between accepting, deferring, rejecting, dropping and being down.
"""
