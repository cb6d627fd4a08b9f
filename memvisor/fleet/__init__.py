"""The fleet: many memvisor daemons sharing parked sandboxes (DESIGN.md "A fleet of hosts").

etcd holds membership (a node record under a lease), every sandbox's record and the generation fence; a shared
store holds the bundles. Modules: etcd.py (the only one that knows etcd's wire format), lease.py (a lease kept
alive), records.py (the key layout and the JSON of each value), membership.py (a node under a lease), fence.py
(every sandbox move one transaction; the fleet's generations), store.py (bundles in a directory), placement.py
(pure: which node has room and matches), errors.py.

The layer is used by memvisor/service (the daemon) and never imports it, nor the CLI or the SDK; host/ and
snapshot/ never import it (tests/unit/test_layers.py).
"""
