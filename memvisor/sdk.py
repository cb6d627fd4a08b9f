"""The Python SDK: `Sandbox(memory_mib=256).run(["echo", "hi"])`, or a sandbox that stays up:

    with Sandbox(memory_mib=256).start() as live:
        live.exec(["echo", "hi"])
        live.exec(["cat"], stdin=b"data")

Layers merge like the CLI's: the config file < the SDK's arguments and `with_*` calls. A Sandbox is an
immutable description; every `run()` boots a fresh VM and tears it down; `start()` boots one and returns a
LiveSandbox handle whose `exec()` may be called many times, from several threads at once.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from memvisor import config, policy
from memvisor.errors import MemvisorError
from memvisor.host.result import OutputFn, RunResult
from memvisor.host.sandbox import Instance
from memvisor.image import build
from memvisor.snapshot import park, statedir, template
from memvisor.snapshot.manifest import Manifest

__all__ = ["DEFAULT_TIMEOUT_S", "LiveSandbox", "RunResult", "Sandbox", "Template"]
# The SDK's blocking calls end within this by default (exit 124, `timed_out`): a workload that never ends must
# not hang its caller. Pass a larger number, or timeout=None to wait without limit.
DEFAULT_TIMEOUT_S = 600.0


class Sandbox:
    """A sandbox description: a policy. `run()` boots it, runs one command, and tears it down."""

    def __init__(self, memory_mib: int | None = None, cpus: int | None = None, *, timeout: float | None = None,
                 root: bool | None = None, config_file: Path | str | Literal[False] | None = None,
                 **settings: object) -> None:
        """Keyword arguments are policy field names (see memvisor.policy.SETTINGS); None means "not set".

        `config_file`: a TOML file to read first; None reads the default file if it exists; False reads none.
        """
        given = {"memory_mib": memory_mib, "cpus": cpus, "timeout": timeout, "root": root, **settings}
        unknown = set(given) - set(policy.SETTINGS_BY_FIELD)
        if unknown:
            raise TypeError(f"unknown Sandbox setting(s): {', '.join(sorted(unknown))}")
        layer = {k: policy.coerce(policy.SETTINGS_BY_FIELD[k], v, "sdk") for k, v in given.items() if v is not None}
        if config_file is False:
            file_layer: tuple[str, dict[str, object]] = ("config", {})
        else:
            file_layer = config.load(Path(config_file) if config_file else None, explicit=config_file is not None)
        self._layers: tuple[tuple[str, Mapping[str, object]], ...] = (file_layer, ("sdk", layer))
        self.policy = policy.merge(*self._layers)

    def _with(self, **changes: object) -> Sandbox:
        clone = object.__new__(Sandbox)
        layer = {k: policy.coerce(policy.SETTINGS_BY_FIELD[k], v, "sdk") for k, v in changes.items()}
        clone._layers = (*self._layers, ("sdk", layer))
        clone.policy = policy.merge(*clone._layers)
        return clone

    def with_policy(self, **changes: object) -> Sandbox:
        """A copy with some policy fields changed."""
        return self._with(**changes)

    def with_swap(self, size_mib: int, mode: policy.SwapMode | str | None = None,
                  allow_weaker: bool | None = None, discard: bool | None = None) -> Sandbox:
        """A copy with guest disk swap of `size_mib` MiB (mode: default confidential, whose tags in guest RAM refuse
        changed, moved and replayed pages; `discard`: give freed swap back to the host, not with authenticated)."""
        changes: dict[str, object] = {"swap_size_mib": size_mib}
        if mode is not None:
            changes["swap_mode"] = mode
        if allow_weaker is not None:
            changes["allow_weaker_swap"] = allow_weaker
        if discard is not None:
            changes["swap_discard"] = discard
        return self._with(**changes)

    def with_zram(self, percent: int, algorithm: str | None = None) -> Sandbox:
        """A copy with a zram swap device of `percent`% of guest RAM in front of the disk swap."""
        changes: dict[str, object] = {"zram_percent": percent}
        if algorithm is not None:
            changes["zram_algorithm"] = algorithm
        return self._with(**changes)

    def run(self, argv: list[str], *, env: Mapping[str, str] | None = None, stdout: OutputFn | None = None,
            stderr: OutputFn | None = None, kernel_args: tuple[str, ...] = (),
            timeout: float | None = DEFAULT_TIMEOUT_S) -> RunResult:
        """Boot, run `argv` (empty: the image's Entrypoint/Cmd, with `image=`), tear down. Output goes to the
        callbacks if given, else into the result (at most the policy's output_limit_mib per stream:
        `result.truncated`). `timeout` (seconds, boot included) applies
        unless the policy sets one; None: no limit. Warnings (e.g. a swap step-down) are logged to the
        "memvisor" logger and listed in result.report."""
        image = build.ensure()
        pol = self.policy if self.policy.timeout is not None else dataclasses.replace(self.policy, timeout=timeout)
        with Instance(pol, image, kernel_args=kernel_args) as vm:
            return vm.run(list(argv), env=dict(env or {}), on_stdout=stdout, on_stderr=stderr)

    def start(self, kernel_args: tuple[str, ...] = ()) -> LiveSandbox:
        """Boot the sandbox and wait for its agent; the handle runs commands until `stop()` (or the end of a
        `with` block). Raises MemvisorError if it cannot start."""
        vm = Instance(self.policy, build.ensure(), kernel_args=kernel_args)
        try:
            vm.start()
            vm.wait_ready()
        except BaseException:
            vm.close()
            raise
        return LiveSandbox(vm)

    def __repr__(self) -> str:
        fields = {f.name: getattr(self.policy, f.name) for f in dataclasses.fields(self.policy)
                  if f.name != "sources" and getattr(self.policy, f.name) != getattr(policy.DEFAULT, f.name)}
        return f"Sandbox({', '.join(f'{k}={v!r}' for k, v in fields.items())})"


class LiveSandbox:
    """A running sandbox (from `Sandbox.start()`): run commands in it, then stop it."""

    def __init__(self, vm: Instance, origin: Template | None = None) -> None:
        self._vm = vm
        self.id = vm.id
        self._origin = origin  # the template it is a clone of
        self._parked: Manifest | None = None
        self._ever_parked = False  # then the state directory may hold its snapshot or kept disks
        self._state: statedir.State | None = None

    @property
    def parked(self) -> bool:
        return self._parked is not None

    def _state_dir(self) -> statedir.State:
        """The state directory, opened (with its key, made if the directory holds nothing wrapped yet) on first use
        and held until stop()."""
        if self._state is None:
            self._state = statedir.open(create_key=True)
        return self._state

    def park(self) -> None:
        """Park the sandbox (docs/parking.md): its state goes to a sealed snapshot in memvisor's state directory
        and its VMM exits, so it holds no host memory; `resume()` or the next `exec()` brings it back. Raises
        MemvisorError while a command runs (the sandbox then keeps running)."""
        if self._parked is None:
            self._parked, _ = park.park(self._state_dir(), self._vm, {
                "policy": policy.to_json(self._vm.policy), "image": self._vm.image.manifest.get("key")},
                template=self._origin.manifest if self._origin else None)
            self._ever_parked = True

    def resume(self) -> float | None:
        """Resume a parked sandbox; returns the seconds it took (None if it was running). On failure it stays
        parked and MemvisorError says why."""
        if self._parked is None:
            return None
        vm = Instance(self._vm.policy, self._vm.image, sandbox_id=self.id, kernel_args=self._vm.kernel_args)
        if self._origin is not None:
            vm.clone_ram_fd = self._origin.ram_fd()
        figures = park.resume(self._state_dir(), vm, self._parked,
                              template=self._origin.manifest if self._origin else None)
        self._vm, self._parked = vm, None
        return figures.seconds

    def freeze(self, name: str) -> Template:
        """Make this sandbox (started with `templatable=True`) template `name` (docs/templates.md): it becomes
        the template (its VMM exits; this handle is done). Raises MemvisorError if it cannot (it then runs on)."""
        if self._parked is not None:
            raise MemvisorError(f"sandbox {self.id} is parked", hint="resume it first")
        state = statedir.open(create_key=True)
        try:
            meta, fd, _ = template.freeze(state, self._vm, name, {"policy": policy.to_json(self._vm.policy),
                                                                  "image": self._vm.image.manifest.get("key")})
        except BaseException:
            state.close()
            raise
        return Template(name, meta, fd, self._vm.policy, self._vm.image, state)

    def exec(self, argv: list[str], *, env: Mapping[str, str] | None = None, cwd: str | None = None,
             root: bool = False, stdin: bytes | None = None, timeout: float | None = DEFAULT_TIMEOUT_S,
             stdout: OutputFn | None = None, stderr: OutputFn | None = None) -> RunResult:
        """Run one command and wait for it; its output goes to the callbacks if given, else into the result
        (at most the policy's output_limit_mib per stream: `result.truncated`). `timeout`: kill it after that
        many seconds (exit 124, `timed_out`); None: no limit. A parked sandbox is resumed first."""
        self.resume()
        return self._vm.exec(list(argv), env=dict(env or {}), cwd=cwd, uid=0 if root else None, stdin=stdin,
                             timeout=timeout, on_stdout=stdout, on_stderr=stderr)

    def stop(self) -> None:
        """Power the guest off and release everything, a parked snapshot included (safe to call twice)."""
        if self._vm.process is not None and self._vm.process.poll() is None:
            self._vm.shutdown()
        self._vm.close()
        if self._ever_parked:
            state = self._state_dir()
            state.remove(self.id)  # a parked snapshot, or the disks a resumed sandbox keeps there
            state.forget(self.id)
            self._parked, self._ever_parked = None, False
        if self._state is not None:
            self._state.close()
            self._state = None

    def __enter__(self) -> LiveSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"LiveSandbox({self.id})"


class Template:
    """A frozen sandbox (from `LiveSandbox.freeze()`): `clone()` starts sandboxes that share its RAM, each its own
    machine before its first command (docs/templates.md). `remove()` (or the end of a `with` block) deletes it;
    stop its clones first."""

    def __init__(self, name: str, meta: Manifest, fd: int, pol: policy.Policy, image: build.Image,
                 state: statedir.State) -> None:
        self.name = name
        self.manifest = meta
        self._fd, self._policy, self._image, self._state = fd, pol, image, state

    def ram_fd(self) -> int:
        """The template's sealed RAM (its clones map it)."""
        if self._fd < 0:
            raise MemvisorError(f"template {self.name} was removed")
        return self._fd

    def clone(self) -> LiveSandbox:
        """Start a clone (seconds under TCG, not a boot). Raises MemvisorError if it cannot become its own
        machine (it is then stopped)."""
        vm = Instance(self._policy, self._image)
        template.clone(self._state, vm, self.manifest, self.ram_fd())
        return LiveSandbox(vm, origin=self)

    def remove(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            try:
                template.remove(self._state, self.name, self.manifest)
            finally:
                self._state.close()

    def __enter__(self) -> Template:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"Template({self.name})"
