"""Start the harness and the solution's process of one functional / call-based run, as two uids.

    python -I -S boot.py PYTHON SETPRIV UID_HARNESS UID_SOLUTION HARNESS.py RUNNER.py

Inside the sandbox this runs as root (it is the sandbox's command) and runs no untrusted code: it
makes two pipes, forks, and each side execs setpriv to drop to its own non-root uid, no capabilities,
no_new_privs, before starting Python. The solution's process gets stdin /dev/null, stdout joined to
stderr and its two pipe ends; the harness keeps the sandbox's stdin (the payload) and stdout (the
verdict). SETPRIV "-" (rewards.sandbox=none) starts both as the current user.
"""

import os
import sys


def _argv(python: str, setpriv: str, uid: str, script: str, fds: tuple[int, int]) -> list[str]:
    tail = [python, "-I", script, str(fds[0]), str(fds[1])]
    if setpriv == "-":
        return tail
    return [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all", "--no-new-privs", "--", *tail]


def _solution_side(python, setpriv, uid, runner, to_sol_r, to_sol_w, to_h_r, to_h_w) -> None:
    os.close(to_sol_w)
    os.close(to_h_r)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(2, 1)
    os.close(null)
    for fd in (to_sol_r, to_h_w):
        os.set_inheritable(fd, True)
    argv = _argv(python, setpriv, uid, runner, (to_sol_r, to_h_w))
    os.execv(argv[0], argv)


def main() -> None:
    python, setpriv, uid_h, uid_s, harness, runner = sys.argv[1:7]
    to_sol_r, to_sol_w = os.pipe()
    to_h_r, to_h_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            _solution_side(python, setpriv, uid_s, runner, to_sol_r, to_sol_w, to_h_r, to_h_w)
        finally:
            os._exit(127)  # exec failed
    os.close(to_sol_r)
    os.close(to_h_w)
    for fd in (to_sol_w, to_h_r):
        os.set_inheritable(fd, True)
    argv = _argv(python, setpriv, uid_h, harness, (to_sol_w, to_h_r))
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
