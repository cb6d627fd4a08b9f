"""`memvisor serve`: a daemon that owns long-lived sandboxes behind an HTTP/JSON API.

A layer above memvisor/host/: nothing in host/ (or below) imports this package, and the host layer stays
usable without it (`memvisor run`, the SDK).
"""
