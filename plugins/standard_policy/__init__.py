"""
The ``standard`` delivery policy (entry point ``mailhub.policies``:
``standard``): retries every ``retry_minutes`` from each site in turn,
staggered, for ``lifetime_days``, then bounces; holds a reject storm.  The
policy itself is in ``policy``.
"""

from mailhub.plugins.standard_policy.policy import StandardPolicy, plugin

__all__ = ["StandardPolicy", "plugin"]
