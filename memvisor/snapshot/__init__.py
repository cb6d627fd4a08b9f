"""Parked state: what a parked sandbox or a template keeps on disk, and the moves in and out of it.

Sealed streams (seal.py), the root-only state directory and its committed snapshots (statedir.py), parking and
resuming a running sandbox (park.py, park_ram.py), templates' frozen RAM and their clones (template.py).

The layer sits above memvisor/host (it drives a host Instance through QMP and its control channel) and below
memvisor/service (the daemon decides when to park): it imports host, never service; host never imports it.
"""
