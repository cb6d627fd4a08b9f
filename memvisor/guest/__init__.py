"""The guest side: stdlib-only Python shipped in the initramfs and run as PID 1 (`python3 -SI`).

Nothing here may import a third-party package or a host-side memvisor module (host/, image/, cli, sdk).
"""
