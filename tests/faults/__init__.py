"""
The fault suite: the hub under the faults a real MX meets, each test counting
messages by a unique id (sent, acknowledged, delivered, duplicated).  A
package, so that its modules import ``hubprocess`` from ``tests/`` whichever
directory pytest is given.
"""
