"""Start the workload: fork, drop to the sandbox user, exec. Guest only, stdlib only.

Hand-written instead of `subprocess` because importing subprocess costs ~0.4 s of TCG translation at boot, and
this is the only process the guest starts. It does what subprocess.Popen(user=, group=, extra_groups=[],
start_new_session=True, restore_signals=True, close_fds=True) does, and reports an exec failure through a
close-on-exec pipe as subprocess does.
"""

from __future__ import annotations

# The C module under `signal` (no stub in typeshed): `signal` itself imports enum, ~0.4 s at boot under TCG.
import _signal  # type: ignore[import-not-found]
import os


class Child:
    """A started workload: its pid, a pidfd that polls readable when it exits, and its output pipes."""

    def __init__(self, pid: int, stdout: int, stderr: int, stdin: int | None = None) -> None:
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.stdout = stdout
        self.stderr = stderr
        self.stdin = stdin  # the write end of its stdin pipe, or None (stdin is /dev/null)

    def wait(self) -> int:
        """Reap it: its exit code, or -signo if a signal killed it (subprocess's convention)."""
        _, status = os.waitpid(self.pid, 0)
        os.close(self.pidfd)
        return os.waitstatus_to_exitcode(status)


def _exec_path(argv: list[str], env: dict[str, str]) -> None:
    """execvpe without os.get_exec_path (which imports `warnings`): try each PATH entry, report the first
    error that is not ENOENT/ENOTDIR, like execvp(3)."""
    if "/" in argv[0]:
        os.execve(argv[0], argv, env)
    first: OSError | None = None
    for folder in env.get("PATH", "/usr/bin:/bin").split(":"):
        try:
            os.execve(os.path.join(folder or ".", argv[0]), argv, env)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            first = first or exc
    raise first or FileNotFoundError(2, "command not found", argv[0])


def spawn(argv: list[str], env: dict[str, str], cwd: str, uid: int, stdin: bool = False,
          cgroup: str | None = None, root: str | None = None, gid: int | None = None) -> Child:
    """fork + exec `argv` as `uid` (and `gid`, default the uid; no supplementary groups) in a new session; stdin
    a pipe (`stdin`) or /dev/null; in `cgroup` (a cgroup v2 directory) if given: the child moves itself there
    before it drops root, so nothing it runs ever lives outside it; chrooted into `root` (the user's image) if
    given, before it drops root and before `cwd` is entered.

    Raises OSError (with the errno exec or chdir failed with) if the program cannot be started.
    """
    in_r, in_w = os.pipe2(os.O_CLOEXEC) if stdin else (-1, -1)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # child: only async-signal-safe-ish work, and never return into the init
        try:
            os.setsid()
            os.dup2(in_r if stdin else os.open("/dev/null", os.O_RDONLY), 0)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            # PID 1's Python ignores SIGPIPE; a workload expects the default.
            for sig in (_signal.SIGPIPE, _signal.SIGXFSZ):
                _signal.signal(sig, _signal.SIG_DFL)
            if cgroup is not None:
                procs = os.open(f"{cgroup}/cgroup.procs", os.O_WRONLY)
                os.write(procs, b"0")
                os.close(procs)
            if root is not None:
                os.chroot(root)
            group = uid if gid is None else gid
            if uid != 0 or group != 0:
                os.setgroups([])
                os.setgid(group)
                os.setuid(uid)
            os.chdir(cwd)
            os.closerange(3, status_w)
            os.closerange(status_w + 1, 1 << 16)
            _exec_path(argv, env)
        except BaseException as exc:
            errno = exc.errno if isinstance(exc, OSError) and exc.errno else 0
            os.write(status_w, f"{errno}:{exc!r}".encode(errors="replace")[:512])
        finally:
            os._exit(127)
    for fd in (out_w, err_w, status_w, *((in_r,) if stdin else ())):
        os.close(fd)
    failure = os.read(status_r, 512)
    os.close(status_r)
    if failure:
        os.waitpid(pid, 0)
        for fd in (out_r, err_r, *((in_w,) if stdin else ())):
            os.close(fd)
        errno_text, _, detail = failure.decode(errors="replace").partition(":")
        errno = int(errno_text) if errno_text.isdigit() else 0
        raise OSError(errno, os.strerror(errno) if errno else f"cannot start the program: {detail}", argv[0])
    if stdin:
        os.set_blocking(in_w, False)
    return Child(pid, out_r, err_r, in_w if stdin else None)
