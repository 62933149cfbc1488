"""Run one untrusted Python program in a fresh bubblewrap sandbox, with hard limits.

Layout of one run (`BwrapSandbox.run` for a stdin/stdout program, `run_harness` for a functional or
call-based test run):

    prlimit (AS, CPU, FSIZE, NOFILE, NPROC)  ->  bwrap (as root, no user namespace)
        new PID / net / IPC / UTS / cgroup namespaces, --die-with-parent, --new-session, --clearenv
        filesystem: an empty tmpfs root; read-only: the interpreter binary, its stdlib, the system
        shared libraries, setpriv, the grader's own files (GRADER_DIR) and, in the interpreter's
        site-packages (otherwise empty), the packages of rewards.sandbox_packages and what they need
        (numpy, pandas by default); /dev (null, zero, urandom, ...); a size-capped tmpfs /tmp
      run:          setpriv (a random non-root uid/gid, no groups, no capabilities, no_new_privs)
                    -> python -I /tmp/main.py
      run_harness:  python -I -S boot.py -> two setprivs, two random uids: the harness (reads the
                    payload, writes the verdict) and the solution's process, joined by two pipes

`python -I` without -S: the site module runs, so `exit()` / `quit()` exist and the exposed packages
import, as they do under `python file.py` in Archer's grader. RLIMIT_NPROC binds only non-root uids,
so the uid switch is what stops fork bombs; a fresh random uid per run keeps one run's processes from
using up another's quota, and in a harness run keeps the solution from signalling, tracing or reading
the harness. The PID namespace's init is bwrap with PDEATHSIG=SIGKILL: killing the outer bwrap at the
deadline, or the command (the harness) exiting, kills every process of the run, `setsid()` orphans
included. Nothing of the host but these read-only files is visible and nothing is writable outside
/tmp, which lives in memory and vanishes with the run.

`NoSandbox` (rewards.sandbox=none) runs the same programs bare, for trusted data only.
"""

from __future__ import annotations

import json
import logging
import math
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

GRADER_DIR = "/opt/archer-grader"
"""Where the grader's in-sandbox programs are mounted read-only."""
GRADER_FILES = ("boot.py", "harness.py", "runner.py", "wire.py", "prelude.py", "lcb_compat.py")
THREAD_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")
"""Set to 1 in every run (as Archer's code_exec sets OPENBLAS_NUM_THREADS=1): one thread per program."""

# C modules with interpreter test hooks; hidden inside the sandbox. (_ctypes stays: pandas imports
# ctypes; the verdict never depends on in-process secrets, see harness.py, and the sandbox's walls
# are the kernel's: namespaces, uids, no capabilities, rlimits.)
_HIDDEN_MODULE_PREFIXES = ("_testcapi", "_testinternalcapi", "_testbuffer", "_testmultiphase",
                           "_testclinic", "_testimportmultiple", "_testsinglephase", "_xxtestfuzz",
                           "xxlimited", "_xxsubinterpreters", "_xxinterpchannels")


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot run programs on this machine (raised at pool start-up, never per sample)."""


@dataclass
class Limits:
    """Resource limits of one program run."""

    timeout_s: float = 30.0
    cpu_time_s: int | None = None
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
    uids: tuple = ()

    @property
    def stderr_tail(self) -> str:
        """Last line of stderr (the exception, usually), shortened."""
        lines = [ln for ln in self.stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
        return lines[-1][:160] if lines else ""


def _prlimit_args(lim: Limits, timeout_s: float | None = None) -> list[str]:
    """prlimit argv; RLIMIT_CPU is cpu_time_s, or the run's deadline rounded up when that is None."""
    mb = 1024 * 1024
    cpu = lim.cpu_time_s if lim.cpu_time_s is not None else math.ceil(timeout_s or lim.timeout_s) + 1
    return [shutil.which("prlimit") or "/usr/bin/prlimit",
            f"--as={lim.memory_mb * mb}", f"--cpu={max(1, int(cpu))}",
            f"--fsize={lim.workdir_mb * mb}", f"--nofile={lim.max_open_files}",
            f"--nproc={lim.max_processes}", "--core=0", "--"]


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


def exposed_packages(names) -> list[tuple[str, str]]:
    """(host path, entry name) of every site-packages entry of the distributions providing the import
    names `names` and of everything they require (installed ones; extras not followed)."""
    import importlib.metadata as md
    from packaging.requirements import Requirement

    by_module = md.packages_distributions()
    todo = [d for n in names for d in by_module.get(n, [])]
    missing = [n for n in names if n not in by_module]
    if missing:
        log.info("rewards.sandbox_packages not installed, not visible in the sandbox: %s", missing)
    seen: set[str] = set()
    entries: dict[str, str] = {}
    while todo:
        name = todo.pop()
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in seen:
            continue
        seen.add(key)
        root = Path(str(dist.locate_file("")))
        for f in dist.files or []:
            top = f.parts[0]
            if top not in ("..", "__pycache__") and not top.endswith(".pth") and (root / top).exists():
                entries.setdefault(top, str(root / top))
        for req in dist.requires or []:
            r = Requirement(req)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
    return sorted((path, top) for top, path in entries.items())


def _site_dir() -> str:
    """The site-packages directory the sandbox's interpreter (`python -I`, base prefix) puts on sys.path."""
    import site
    dirs = site.getsitepackages([sys.base_prefix])
    return dirs[0]


class BwrapSandbox:
    """Every `run` / `run_harness` is a fresh bubblewrap sandbox (see the module docstring)."""

    kind = "bwrap"

    def __init__(self, limits: Limits, packages=("numpy", "pandas")):
        self.limits = limits
        self.bwrap = shutil.which("bwrap") or "/usr/bin/bwrap"
        self.setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
        for tool in (self.bwrap, self.setpriv, _prlimit_args(limits)[0]):
            if not os.access(tool, os.X_OK):
                raise SandboxUnavailable(f"{tool} is missing (install bubblewrap and util-linux), or set "
                                         "rewards.sandbox=none for trusted data only")
        # the base interpreter (a venv's python finds its stdlib through pyvenv.cfg, not visible inside)
        self.python = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
        self.packages = exposed_packages(packages)
        self._static = self._static_args()

    def _static_args(self) -> list[str]:
        """bwrap arguments shared by every run: namespaces and the read-only filesystem."""
        args = ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                "--die-with-parent", "--new-session", "--clearenv", "--setenv", "PATH", "/usr/bin",
                "--setenv", "LANG", "C.UTF-8"]
        for var in THREAD_ENV:
            args += ["--setenv", var, "1"]
        binds: list[tuple[str, str]] = []
        links: list[tuple[str, str]] = []
        multiarch = sysconfig.get_config_var("MULTIARCH") or ""
        for top in ("/lib", "/lib64"):  # merged /usr: symlinks; otherwise the library dirs themselves
            if os.path.islink(top):
                links.append((os.readlink(top), top))
            elif os.path.isdir(top):
                sub = os.path.join(top, multiarch)
                d = sub if multiarch and os.path.isdir(sub) and top == "/lib" else top
                binds.append((d, d))
        for p in (f"/usr/lib/{multiarch}" if multiarch else "/usr/lib", "/usr/lib64"):
            if os.path.isdir(p) and not os.path.islink(p):
                binds.append((p, p))
        stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
        platstdlib = os.path.realpath(sysconfig.get_path("platstdlib", vars={"platbase": sys.base_exec_prefix}))
        binds += [(self.python, self.python), (stdlib, stdlib)]
        if not platstdlib.startswith(stdlib + os.sep) and platstdlib != stdlib:
            binds.append((platstdlib, platstdlib))
        libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
        if libdir and soname and ".so" in soname and os.path.exists(os.path.join(libdir, soname)):
            lib = os.path.join(libdir, soname)
            binds.append((lib, lib))  # a shared libpython (found through RPATH)
        binds.append((self.setpriv, self.setpriv))
        here = os.path.dirname(os.path.abspath(__file__))
        binds += [(os.path.join(here, f), f"{GRADER_DIR}/{f}") for f in GRADER_FILES]
        made = {"/"}
        for src, dest in binds:
            parent = Path(dest).parent
            chain = [p for p in reversed([parent, *parent.parents]) if str(p) not in made]
            for d in chain:
                made.add(str(d))
                args += ["--perms", "0755", "--dir", str(d)]
            args += ["--ro-bind", src, dest]
            made.add(dest)
        for target, link in links:
            args += ["--symlink", target, link]
        # site-packages: empty but for the exposed packages (read-only)
        site_dir = _site_dir()
        for d in {os.path.join(stdlib, "site-packages"), site_dir}:
            if d != site_dir and os.path.isdir(d):
                args += ["--tmpfs", d, "--remount-ro", d]
        args += ["--perms", "0755", "--tmpfs", site_dir]
        for src, name in self.packages:
            args += ["--ro-bind", src, os.path.join(site_dir, name)]
        args += ["--remount-ro", site_dir]
        for d in {stdlib, platstdlib, os.path.join(stdlib, "lib-dynload")}:
            if os.path.isdir(d):
                for name in sorted(os.listdir(d)):
                    if name.startswith(_HIDDEN_MODULE_PREFIXES) and name.endswith(".so"):
                        args += ["--ro-bind", "/dev/null", os.path.join(d, name)]
        args += ["--dev", "/dev", "--perms", "1777", "--size", str(self.limits.workdir_mb * 1024 * 1024),
                 "--tmpfs", "/tmp", "--chdir", "/tmp"]
        return args

    @staticmethod
    def _setpriv_args(setpriv: str, uid: int) -> list[str]:
        return [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
                "--bounding-set=-all", "--no-new-privs", "--"]

    def run(self, source: str, stdin: bytes = b"", *, timeout_s: float | None = None) -> RunResult:
        """Run `source` as /tmp/main.py with `stdin`; returns after exit, deadline or output cap.

        By the time this returns, every process of the run is gone (the PID namespace died with bwrap).
        """
        uid = UID_BASE + secrets.randbelow(UID_SPAN)
        src_fd = os.memfd_create("main.py", 0)
        try:
            os.write(src_fd, source.encode("utf-8", "surrogatepass"))
            os.lseek(src_fd, 0, os.SEEK_SET)
            command = ["--perms", "0444", "--file", str(src_fd), "/tmp/main.py", "--",
                       *self._setpriv_args(self.setpriv, uid), self.python, "-I", "/tmp/main.py"]
            return self._launch(command, stdin, timeout_s, (uid,), (src_fd,))
        finally:
            os.close(src_fd)

    def run_harness(self, payload: bytes, *, timeout_s: float | None = None) -> RunResult:
        """One harness run (harness.py + runner.py as two fresh uids) reading `payload` on stdin."""
        uid_h = UID_BASE + secrets.randbelow(UID_SPAN)
        uid_s = UID_BASE + secrets.randbelow(UID_SPAN)
        while uid_s == uid_h:
            uid_s = UID_BASE + secrets.randbelow(UID_SPAN)
        command = ["--", self.python, "-I", "-S", f"{GRADER_DIR}/boot.py", self.python, self.setpriv,
                   str(uid_h), str(uid_s), f"{GRADER_DIR}/harness.py", f"{GRADER_DIR}/runner.py"]
        return self._launch(command, payload, timeout_s, (uid_h, uid_s), ())

    def _launch(self, command: list[str], stdin: bytes, timeout_s: float | None, uids: tuple,
                pass_fds: tuple) -> RunResult:
        lim = self.limits
        timeout = lim.timeout_s if timeout_s is None else timeout_s
        st_r, st_w = os.pipe()
        try:
            argv = [*_prlimit_args(lim, timeout), self.bwrap, *self._static, "--json-status-fd", str(st_w),
                    *command]
            started = time.monotonic()
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, pass_fds=(*pass_fds, st_w), env={},
                                        start_new_session=True)
            except OSError as e:
                return RunResult("infra_error", None, b"", b"", f"sandbox failed to start: {e}", 0.0, uids[0], uids)
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
                for u in uids:
                    _wait_gone(u, 5.0)

            status, out, err = _communicate(proc, stdin, deadline, lim.max_output_bytes)
            res = _finish(proc, status, out, err, deadline, started, kill)
            res.uid, res.uids = uids[0], uids
            os.set_blocking(st_r, True)
            st = bytes(status_buf) + _read_all(st_r)
        finally:
            for fd in (st_r, st_w):
                if fd >= 0:
                    os.close(fd)
        if len(uids) > 1:
            for u in uids:  # the harness exited: the namespace is being torn down
                _wait_gone(u, 5.0)
        if b"child-pid" not in st and res.status != "timeout":
            res.status = "infra_error"
            res.reason = "sandbox failed to start: " + (res.stderr_tail or f"bwrap exit {res.returncode}")
        return res

    def probe(self) -> None:
        """Raise SandboxUnavailable unless a program runs here as a non-root uid, isolated from the host,
        with exit() and the exposed packages, and a harness run reports through its channel."""
        check = ("import os, socket, importlib.util\n"
                 "assert os.getuid() != 0 and os.geteuid() != 0, 'root'\n"
                 "assert not os.path.exists('/etc/passwd') and not os.path.exists('/proc/1'), 'host visible'\n"
                 "try:\n    socket.create_connection(('1.1.1.1', 53), timeout=1); raise SystemExit('net')\n"
                 "except OSError:\n    pass\n"
                 f"missing = [n for n in {sorted({n.split('.')[0] for _, n in self.packages if not n.endswith(('.dist-info', '.libs', '.py'))})!r} if importlib.util.find_spec(n) is None]\n"
                 "assert not missing, f'packages not visible: {missing}'\n"
                 "print('probe-ok', os.getuid(), os.getpid())\n"
                 "exit()\n")
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
        _probe_harness(self)


def _probe_harness(sb) -> None:
    """A two-process harness run of a trivial functional test must report pass through its channel."""
    nonce = secrets.token_hex(16)
    payload = json.dumps({"nonce": nonce, "mode": "functional", "solution": "def f():\n    return 1\n",
                          "test": "assert f() == 1\n"}).encode()
    res = sb.run_harness(payload, timeout_s=max(20.0, sb.limits.timeout_s))
    line = f"{nonce} VERDICT ".encode()
    if res.status != "ok" or line + b'{"status": "pass"' not in res.stdout:
        raise SandboxUnavailable(f"the sandbox's test harness does not run here (status={res.status}, "
                                 f"stderr={res.stderr_tail or res.reason!r})")


class NoSandbox:
    """rewards.sandbox=none: programs run bare (own session, rlimits, temp dir). Trusted data only."""

    kind = "none"

    def __init__(self, limits: Limits, packages=()):
        self.limits = limits
        self.python = sys.executable  # the venv's interpreter: its packages are all visible

    def run(self, source: str, stdin: bytes = b"", *, timeout_s: float | None = None) -> RunResult:
        """Run `source` bare in a temp dir; the process group is killed afterwards."""
        with tempfile.TemporaryDirectory(prefix="archer-score-") as d:
            Path(d, "main.py").write_text(source, encoding="utf-8", errors="surrogatepass")
            return self._bare([self.python, "-I", "main.py"], d, stdin, timeout_s)

    def run_harness(self, payload: bytes, *, timeout_s: float | None = None) -> RunResult:
        """The harness and the solution's process as the current user (no isolation between them)."""
        here = os.path.dirname(os.path.abspath(__file__))
        with tempfile.TemporaryDirectory(prefix="archer-score-") as d:
            argv = [self.python, "-I", "-S", os.path.join(here, "boot.py"), self.python, "-", "0", "0",
                    os.path.join(here, "harness.py"), os.path.join(here, "runner.py")]
            return self._bare(argv, d, payload, timeout_s)

    def _bare(self, argv: list[str], cwd: str, stdin: bytes, timeout_s: float | None) -> RunResult:
        lim = self.limits
        timeout = lim.timeout_s if timeout_s is None else timeout_s
        nolimit = Limits(**{**lim.__dict__, "max_processes": 4096})  # NPROC would count root's processes
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", **{v: "1" for v in THREAD_ENV}}
        started = time.monotonic()
        try:
            proc = subprocess.Popen([*_prlimit_args(nolimit, timeout), *argv], cwd=cwd, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
        except OSError as e:
            return RunResult("infra_error", None, b"", b"", f"failed to start: {e}", 0.0)
        deadline = started + timeout

        def kill() -> None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

        status, out, err = _communicate(proc, stdin, deadline, lim.max_output_bytes)
        res = _finish(proc, status, out, err, deadline, started, kill)
        kill()
        return res

    def probe(self) -> None:
        """Check that the interpreter and the harness run at all."""
        res = self.run("print('probe-ok')", timeout_s=max(10.0, self.limits.timeout_s))
        if res.stdout.strip() != b"probe-ok":
            raise SandboxUnavailable(f"cannot run {self.python}: {res.stderr_tail or res.reason}")
        _probe_harness(self)


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


def make_sandbox(kind: str, limits: Limits, *, probe: bool = True, packages=("numpy", "pandas")):
    """The sandbox of `kind` ("bwrap" | "none"), probed unless probe=False."""
    if kind == "bwrap":
        sb = BwrapSandbox(limits, packages)
    elif kind == "none":
        sb = NoSandbox(limits, packages)
    else:
        raise SandboxUnavailable(f"unknown rewards.sandbox {kind!r} (bwrap or none)")
    if probe:
        sb.probe()
    return sb
