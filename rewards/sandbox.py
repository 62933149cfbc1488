"""Run one untrusted Python program in a fresh bubblewrap sandbox, with hard limits.

Layout of one run (`BwrapSandbox.run`):

    prlimit (AS, CPU, FSIZE, NOFILE, NPROC)  ->  bwrap (as root, no user namespace)
        new PID / net / IPC / UTS / cgroup namespaces, --die-with-parent, --new-session, --clearenv
        filesystem: an empty tmpfs root; read-only: the interpreter binary, its stdlib (site-packages
        hidden, _ctypes and the _test* C modules hidden), the system shared libraries, setpriv;
        /dev (null, zero, urandom, ...); a size-capped tmpfs /tmp (the work dir, the program file)
      -> setpriv: a random non-root uid/gid per run, no groups, no capabilities, no_new_privs
      -> python -I -S /tmp/main.py

RLIMIT_NPROC binds only non-root uids, so the uid switch is what stops fork bombs; a fresh random uid
per run keeps one run's processes from using up another's quota. The PID namespace's init is bwrap with
PDEATHSIG=SIGKILL: killing the outer bwrap at the deadline kills every process of the run, `setsid()`
orphans included. Nothing of the host but the interpreter and libraries is visible and nothing is
writable outside /tmp, which lives in memory and vanishes with the run.

`NoSandbox` (rewards.sandbox=none) runs the same programs bare, for trusted data only.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

UID_BASE = 1_100_000_000
"""Sandboxed programs run as a random uid in [UID_BASE, UID_BASE + UID_SPAN)."""
UID_SPAN = 1 << 24
STDERR_KEEP = 4096
"""Bytes of stderr kept for the failure reason (the rest is drained and dropped)."""

# C modules that give raw memory access or test hooks; hidden inside the sandbox.
_HIDDEN_MODULE_PREFIXES = ("_ctypes", "_testcapi", "_testinternalcapi", "_testbuffer", "_testmultiphase",
                           "_testclinic", "_testimportmultiple", "_testsinglephase", "_xxtestfuzz",
                           "xxlimited", "_xxsubinterpreters", "_xxinterpchannels")


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot run programs on this machine (raised at pool start-up, never per sample)."""


@dataclass
class Limits:
    """Resource limits of one program run."""

    timeout_s: float = 5.0
    cpu_time_s: int = 5
    memory_mb: int = 1024
    max_output_bytes: int = 1_000_000
    max_processes: int = 32
    max_open_files: int = 64
    workdir_mb: int = 64


@dataclass
class RunResult:
    """Outcome of one program run. status: ok (ran to exit), timeout, output_limit, infra_error."""

    status: str
    returncode: int | None
    stdout: bytes
    stderr: bytes
    reason: str = ""
    seconds: float = 0.0
    uid: int | None = None

    @property
    def stderr_tail(self) -> str:
        """Last line of stderr (the exception, usually), shortened."""
        lines = [ln for ln in self.stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
        return lines[-1][:160] if lines else ""


def _prlimit_args(lim: Limits) -> list[str]:
    mb = 1024 * 1024
    return [shutil.which("prlimit") or "/usr/bin/prlimit",
            f"--as={lim.memory_mb * mb}", f"--cpu={max(1, int(lim.cpu_time_s))}",
            f"--fsize={lim.workdir_mb * mb}", f"--nofile={lim.max_open_files}",
            f"--nproc={lim.max_processes}", f"--core=0", "--"]


def _communicate(proc: subprocess.Popen, stdin: bytes, deadline: float, max_out: int
                 ) -> tuple[str, bytes, bytes]:
    """Feed stdin and drain stdout/stderr until exit, the deadline or the output cap.

    Returns (status, stdout, stderr_head) with status ok / timeout / output_limit; never buffers
    more than max_out + 64 KiB of stdout, whatever the program prints.
    """
    sel = selectors.DefaultSelector()
    out, err = bytearray(), bytearray()
    view, pos = memoryview(stdin), 0
    if proc.stdin is not None:
        if stdin:
            os.set_blocking(proc.stdin.fileno(), False)
            sel.register(proc.stdin, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
    sel.register(proc.stdout, selectors.EVENT_READ)
    sel.register(proc.stderr, selectors.EVENT_READ)
    status = "ok"
    try:
        while len(sel.get_map()) > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                status = "timeout"
                break
            for key, _ in sel.select(timeout=min(left, 0.5)):
                f = key.fileobj
                if f is proc.stdin:
                    try:
                        pos += os.write(f.fileno(), view[pos:pos + 65536])
                    except (BrokenPipeError, OSError):
                        pos = len(view)
                    if pos >= len(view):
                        sel.unregister(f)
                        f.close()
                    continue
                chunk = os.read(f.fileno(), 65536)
                if not chunk:
                    sel.unregister(f)
                    continue
                if f is proc.stdout:
                    out += chunk
                    if len(out) > max_out:
                        status = "output_limit"
                        return status, bytes(out[:max_out]), bytes(err)
                elif len(err) < STDERR_KEEP:
                    err += chunk[:STDERR_KEEP - len(err)]
    finally:
        sel.close()
    return status, bytes(out), bytes(err)


def _finish(proc: subprocess.Popen, status: str, out: bytes, err: bytes, deadline: float,
            started: float, kill=None) -> RunResult:
    """Wait for the process (killing it with `kill()` past the deadline) and classify the run."""
    if status == "ok":
        try:
            proc.wait(timeout=max(0.05, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            status = "timeout"
    if status != "ok":
        (kill or proc.kill)()
        proc.wait()
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None and not f.closed:
            f.close()
    rc = proc.returncode
    reason = {"timeout": "deadline exceeded", "output_limit": "output limit exceeded"}.get(status, "")
    if status == "ok" and rc in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
        status, reason = "timeout", "cpu time limit"
    return RunResult(status, rc, out, err, reason, time.monotonic() - started)


class BwrapSandbox:
    """Every `run` is a fresh bubblewrap sandbox (see the module docstring)."""

    kind = "bwrap"

    def __init__(self, limits: Limits):
        self.limits = limits
        self.bwrap = shutil.which("bwrap") or "/usr/bin/bwrap"
        self.setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
        for tool in (self.bwrap, self.setpriv, _prlimit_args(limits)[0]):
            if not os.access(tool, os.X_OK):
                raise SandboxUnavailable(f"{tool} is missing (install bubblewrap and util-linux), or set "
                                         "rewards.sandbox=none for trusted data only")
        # the base interpreter (a venv's python finds its stdlib through pyvenv.cfg, not visible inside)
        self.python = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
        self._static = self._static_args()

    def _static_args(self) -> list[str]:
        """bwrap arguments shared by every run: namespaces and the read-only filesystem."""
        args = ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                "--die-with-parent", "--new-session", "--clearenv", "--setenv", "PATH", "/usr/bin",
                "--setenv", "LANG", "C.UTF-8"]
        binds: list[str] = []
        links: list[tuple[str, str]] = []
        multiarch = sysconfig.get_config_var("MULTIARCH") or ""
        for top in ("/lib", "/lib64"):  # merged /usr: symlinks; otherwise the library dirs themselves
            if os.path.islink(top):
                links.append((os.readlink(top), top))
            elif os.path.isdir(top):
                sub = os.path.join(top, multiarch)
                binds.append(sub if multiarch and os.path.isdir(sub) and top == "/lib" else top)
        for p in (f"/usr/lib/{multiarch}" if multiarch else "/usr/lib", "/usr/lib64"):
            if os.path.isdir(p) and not os.path.islink(p):
                binds.append(p)
        stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
        platstdlib = os.path.realpath(sysconfig.get_path("platstdlib", vars={"platbase": sys.base_exec_prefix}))
        binds += [self.python, stdlib]
        if not platstdlib.startswith(stdlib + os.sep) and platstdlib != stdlib:
            binds.append(platstdlib)
        libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
        if libdir and soname and ".so" in soname and os.path.exists(os.path.join(libdir, soname)):
            binds.append(os.path.join(libdir, soname))  # a shared libpython (found through RPATH)
        binds.append(self.setpriv)
        made = {"/"}
        for src in binds:
            parent = Path(src).parent
            chain = [p for p in reversed([parent, *parent.parents]) if str(p) not in made]
            for d in chain:
                made.add(str(d))
                args += ["--perms", "0755", "--dir", str(d)]
            args += ["--ro-bind", src, src]
            made.add(src)
        for target, link in links:
            args += ["--symlink", target, link]
        site = os.path.join(stdlib, "site-packages")
        if os.path.isdir(site):
            args += ["--tmpfs", site]
        for d in {stdlib, platstdlib, os.path.join(stdlib, "lib-dynload")}:
            if os.path.isdir(d):
                for name in sorted(os.listdir(d)):
                    if name.startswith(_HIDDEN_MODULE_PREFIXES) and name.endswith(".so"):
                        args += ["--ro-bind", "/dev/null", os.path.join(d, name)]
        args += ["--dev", "/dev", "--perms", "1777", "--size", str(self.limits.workdir_mb * 1024 * 1024),
                 "--tmpfs", "/tmp", "--chdir", "/tmp"]
        return args

    def run(self, source: str, stdin: bytes = b"", *, timeout_s: float | None = None) -> RunResult:
        """Run `source` as /tmp/main.py with `stdin`; returns after exit, deadline or output cap.

        By the time this returns, every process of the run is gone (the PID namespace died with bwrap).
        """
        lim = self.limits
        timeout = lim.timeout_s if timeout_s is None else timeout_s
        uid = UID_BASE + secrets.randbelow(UID_SPAN)
        src_fd = os.memfd_create("main.py", 0)
        st_r, st_w = os.pipe()
        try:
            os.write(src_fd, source.encode("utf-8", "surrogatepass"))
            os.lseek(src_fd, 0, os.SEEK_SET)
            argv = [*_prlimit_args(lim), self.bwrap, *self._static,
                    "--perms", "0444", "--file", str(src_fd), "/tmp/main.py",
                    "--json-status-fd", str(st_w), "--",
                    self.setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
                    "--bounding-set=-all", "--no-new-privs", "--", self.python, "-I", "-S", "/tmp/main.py"]
            started = time.monotonic()
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, pass_fds=(src_fd, st_w), env={},
                                        start_new_session=True)
            except OSError as e:
                return RunResult("infra_error", None, b"", b"", f"sandbox failed to start: {e}", 0.0, uid)
            os.close(st_w)
            st_w = -1
            deadline = started + timeout
            status_buf = bytearray()

            def kill() -> None:
                # Kill the namespace's init (bwrap's pid 1): the kernel then kills every process of the
                # run before init is reaped and the outer bwrap exits, so the run is over on return.
                os.set_blocking(st_r, False)
                try:
                    while chunk := os.read(st_r, 65536):
                        status_buf.extend(chunk)
                except BlockingIOError:
                    pass
                m = re.search(rb'"child-pid"\s*:\s*(\d+)', bytes(status_buf))
                if m:
                    try:
                        os.kill(int(m.group(1)), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                try:
                    proc.wait(timeout=5.0)
                except subprocess.TimeoutExpired:
                    proc.kill()
                _wait_gone(uid, 5.0)

            status, out, err = _communicate(proc, stdin, deadline, lim.max_output_bytes)
            res = _finish(proc, status, out, err, deadline, started, kill)
            res.uid = uid
            os.set_blocking(st_r, True)
            st = bytes(status_buf) + _read_all(st_r)
        finally:
            for fd in (src_fd, st_r, st_w):
                if fd >= 0:
                    os.close(fd)
        if b"child-pid" not in st and res.status != "timeout":
            res.status = "infra_error"
            res.reason = "sandbox failed to start: " + (res.stderr_tail or f"bwrap exit {res.returncode}")
        return res

    def probe(self) -> None:
        """Raise SandboxUnavailable unless a program runs here as a non-root uid, isolated from the host."""
        check = ("import os, socket\n"
                 "assert os.getuid() != 0 and os.geteuid() != 0, 'root'\n"
                 "assert not os.path.exists('/etc/passwd') and not os.path.exists('/proc/1'), 'host visible'\n"
                 "try:\n    socket.create_connection(('1.1.1.1', 53), timeout=1); raise SystemExit('net')\n"
                 "except OSError:\n    pass\n"
                 "print('probe-ok', os.getuid(), os.getpid())\n")
        res = self.run(check, timeout_s=max(10.0, self.limits.timeout_s))
        out = res.stdout.decode(errors="replace").split()
        if res.status != "ok" or res.returncode != 0 or out[:1] != ["probe-ok"] or out[1:2] != [str(res.uid)]:
            hint = ("" if os.geteuid() == 0 else "The sandbox switches every program to a fresh non-root uid "
                    "(RLIMIT_NPROC does not bind root), so the reward pool must run as root. ")
            raise SandboxUnavailable(hint +
                "The bubblewrap sandbox does not work on this machine "
                f"(status={res.status}, exit={res.returncode}, stderr={res.stderr_tail or res.reason!r}). "
                "Containers with Docker's default seccomp profile cannot create namespaces: run with "
                "--security-opt seccomp=unconfined or as root with bwrap installed; or set "
                "rewards.sandbox=none for trusted data only.")


class NoSandbox:
    """rewards.sandbox=none: programs run bare (own session, rlimits, temp dir). Trusted data only."""

    kind = "none"

    def __init__(self, limits: Limits):
        self.limits = limits
        self.python = os.path.realpath(sys.executable)

    def run(self, source: str, stdin: bytes = b"", *, timeout_s: float | None = None) -> RunResult:
        """Run `source` bare in a temp dir; the process group is killed afterwards."""
        lim = self.limits
        timeout = lim.timeout_s if timeout_s is None else timeout_s
        with tempfile.TemporaryDirectory(prefix="archer-score-") as d:
            Path(d, "main.py").write_text(source, encoding="utf-8", errors="surrogatepass")
            nolimit = Limits(**{**lim.__dict__, "max_processes": 4096})  # NPROC would count root's processes
            started = time.monotonic()
            try:
                proc = subprocess.Popen([*_prlimit_args(nolimit), self.python, "-I", "-S", "main.py"], cwd=d,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, start_new_session=True)
            except OSError as e:
                return RunResult("infra_error", None, b"", b"", f"failed to start: {e}", 0.0)
            deadline = started + timeout
            status, out, err = _communicate(proc, stdin, deadline, lim.max_output_bytes)
            res = _finish(proc, status, out, err, deadline, started)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        return res

    def probe(self) -> None:
        """Check that the interpreter runs at all."""
        res = self.run("print('probe-ok')", timeout_s=max(10.0, self.limits.timeout_s))
        if res.stdout.strip() != b"probe-ok":
            raise SandboxUnavailable(f"cannot run {self.python}: {res.stderr_tail or res.reason}")


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        b = os.read(fd, 65536)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


def _wait_gone(uid: int, timeout: float) -> None:
    """Poll until no process runs as `uid` (a killed PID namespace dies asynchronously)."""
    end = time.monotonic() + timeout
    while processes_of_uids({uid}) and time.monotonic() < end:
        time.sleep(0.005)


def processes_of_uids(uids) -> list[int]:
    """PIDs of live processes (zombies included) whose real uid is in `uids` (anything with `in`; reads /proc)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Uid:"):
                        if int(line.split()[1]) in uids:
                            found.append(int(name))
                        break
        except OSError:
            continue
    return found


def sandbox_processes() -> list[int]:
    """PIDs of every live process running as any sandbox uid (all pools on this machine)."""
    return processes_of_uids(range(UID_BASE, UID_BASE + UID_SPAN))


def make_sandbox(kind: str, limits: Limits, *, probe: bool = True):
    """The sandbox of `kind` ("bwrap" | "none"), probed unless probe=False."""
    if kind == "bwrap":
        sb = BwrapSandbox(limits)
    elif kind == "none":
        sb = NoSandbox(limits)
    else:
        raise SandboxUnavailable(f"unknown rewards.sandbox {kind!r} (bwrap or none)")
    if probe:
        sb.probe()
    return sb
