"""Boot benchmark: memvisor's guest vs the same kernel with a bare busybox /init.

Both boot with the same QEMU command line (memvisor's backend builds it for both, same devices, same kernel
arguments); runs alternate so host noise hits both alike. Measured, median of N runs each:
  - time to guest init: guest uptime when /init starts (kernel boot + initramfs unpack + interpreter start);
  - time to command:    guest uptime when the command is started;
  - wall:               host time from VMM start to VMM exit (memvisor: to the command's exit report).
Goal (issue #2): memvisor's init adds <= 10% to the time to command. Not a test: prints a table, writes a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from memvisor import paths, policy, proc
from memvisor.host import launch
from memvisor.host.sandbox import Instance
from memvisor.host.vmm.base import VMSpec
from memvisor.host.vmm.qemu import QemuBackend
from memvisor.image import build
from memvisor.image.build import Image
from memvisor.image.cpio import CpioWriter

BASELINE_INIT = b"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
read up rest < /proc/uptime; echo "BENCH init $up"
read up rest < /proc/uptime; echo "BENCH cmd $up"
echo hi
/bin/busybox poweroff -f
"""


def baseline_initramfs(work: Path) -> Path:
    """A busybox-only initramfs from the same busybox-static package the image uses."""
    debs = sorted((paths.cache_dir() / "debs").glob("busybox-static_*.deb"))
    if not debs:
        sys.exit("bench: no cached busybox-static package; run `memvisor image build` first")
    proc.run(["dpkg-deb", "-x", str(debs[-1]), str(work / "bb")])
    out = work / "baseline.cpio"
    with out.open("wb") as f, CpioWriter(f) as c:
        for d in ("bin", "proc", "dev"):
            c.add_dir(d)
        c.add_device("dev/console", char=True, major=5, minor=1)
        c.add_file("bin/busybox", (work / "bb/bin/busybox").read_bytes(), 0o755)
        c.add_file("init", BASELINE_INIT, 0o755)
    return out


def boot_baseline(image: Image, initrd: Path, work: Path, memory: int) -> dict[str, float]:
    """One baseline boot; the same QEMU command line memvisor would use, with this initramfs."""
    console_ours, console_theirs = socket.socketpair()
    ours, theirs = socket.socketpair()
    qmp = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    qmp.bind(str(work / f"qmp-{time.monotonic_ns()}.sock"))
    qmp.listen(1)
    # Started the way a sandbox starts its VMM (host/sandbox.py, host/launch.py: kernel and initramfs as fds, an
    # unprivileged uid, its own namespaces), so the two kinds differ only in their initramfs.
    kernel_fd, initrd_fd = os.open(image.vmlinux, os.O_RDONLY), os.open(initrd, os.O_RDONLY)
    spec = VMSpec(name="memvisor-bench", memory_mib=memory, cpus=1, kernel=Path(f"/proc/self/fd/{kernel_fd}"),
                  initrd=Path(f"/proc/self/fd/{initrd_fd}"), cmdline=tuple(policy.to_cmdline(policy.merge())),
                  console_fd=console_theirs.fileno(), qmp_fd=qmp.fileno(), channel_fd=theirs.fileno())
    argv = QemuBackend().command(spec)
    start = time.monotonic()
    fds = (qmp.fileno(), theirs.fileno(), console_theirs.fileno(), kernel_fd, initrd_fd)
    vmm = launch.spawn_vmm(argv, pass_fds=fds, log=work / "vmm.log", user=paths.vmm_user(spec.name))
    os.close(kernel_fd)
    os.close(initrd_fd)
    try:
        vmm.wait(timeout=120)  # the baseline's few console lines fit the socket's buffer until it exits
    finally:
        if vmm.poll() is None:
            vmm.kill()
            vmm.wait()
    if vmm.returncode != 0:
        sys.exit(f"bench: the baseline VMM exited with {vmm.returncode}: {(work / 'vmm.log').read_text()[-400:]}")
    wall = time.monotonic() - start
    console_theirs.close()
    text = b"".join(iter(lambda: console_ours.recv(65536), b"")).decode(errors="replace")
    for s in (ours, theirs, qmp, console_ours):
        s.close()
    marks = {line.split()[1]: float(line.split()[2]) for line in text.splitlines() if line.startswith("BENCH ")}
    return {"init": marks["init"], "command": marks["cmd"], "wall": wall}


def boot_memvisor(image: Image, memory: int) -> dict[str, float]:
    """One memvisor boot running `echo hi`."""
    start = time.monotonic()
    with Instance(policy.merge(("bench", {"memory_mib": memory})), image) as vm:
        result = vm.run(["echo", "hi"])
    wall = time.monotonic() - start
    guest = result.report["guest"]
    return {"init": guest["init_started_uptime"], "command": guest["command_started_uptime"], "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="boots of each kind (default 5)")
    parser.add_argument("--memory", type=int, default=256, help="guest MiB (default 256)")
    parser.add_argument("--out", type=Path, default=Path("bench/out"), help="where to write boot.png/json")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()

    image = build.ensure()
    samples: dict[str, list[dict[str, float]]] = {"busybox": [], "memvisor": []}
    with tempfile.TemporaryDirectory(prefix="memvisor-bench-") as tmp:
        work = Path(tmp)
        initrd = baseline_initramfs(work)
        for i in range(args.runs):
            samples["busybox"].append(boot_baseline(image, initrd, work, args.memory))
            samples["memvisor"].append(boot_memvisor(image, args.memory))
            print(f"run {i + 1}/{args.runs}: busybox {samples['busybox'][-1]}, memvisor {samples['memvisor'][-1]}",
                  file=sys.stderr)

    med = {kind: {m: statistics.median(s[m] for s in runs) for m in ("init", "command", "wall")}
           for kind, runs in samples.items()}
    rows = [("time to guest init (s, guest uptime)", "init"), ("time to command (s, guest uptime)", "command"),
            ("wall, VMM start to end (s)", "wall")]
    print(f"\nboot benchmark: median of {args.runs} runs, {args.memory} MiB guest, "
          f"{QemuBackend().accel().upper()}, kernel {image.manifest['kernel_version']}")
    print(f"{'metric':40} {'busybox':>9} {'memvisor':>9} {'ratio':>7}")
    for label, key in rows:
        b, m = med["busybox"][key], med["memvisor"][key]
        print(f"{label:40} {b:9.3f} {m:9.3f} {m / b:7.2f}")
    overhead = med["memvisor"]["command"] / med["busybox"]["command"] - 1
    print(f"memvisor init adds {overhead:+.0%} to the time to command (goal: <= +10%)")

    args.out.mkdir(parents=True, exist_ok=True)
    result = {"runs": args.runs, "memory_mib": args.memory, "median": med, "samples": samples,
              "overhead_time_to_command": overhead}
    (args.out / "boot.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(med, args.out / "boot.png")
    if args.json:
        print(json.dumps(result))


def plot(med: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    metrics = ["init", "command", "wall"]
    for i, kind in enumerate(("busybox", "memvisor")):
        ax.bar([x + i * 0.38 for x in range(3)], [med[kind][m] for m in metrics], width=0.38, label=kind)
    ax.set_xticks([x + 0.19 for x in range(3)], ["time to init", "time to command", "wall (host)"])
    ax.set_ylabel("seconds (median)")
    ax.set_title("Guest boot: memvisor init vs bare busybox init")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
