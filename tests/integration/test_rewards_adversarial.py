"""Adversarial programs: each must score fail or timeout, leave no process and no file outside its work
dir, and not disturb the grader or the next sample. They run in parallel through one RewardPool.

The expected outputs are secrets of the host (a file's content, a server's reply, a token), so a program
only "passes" if its attack works. Programs of the functional format try to fake the end of the tests.
Every capability the sandbox offers has its attacks: numpy, pandas and ctypes are visible (read-only),
exit()/quit() exist, the LeetCode helpers are defined, and functional tests run in a second process.
"""

import json
import os
import secrets
import socket
import threading
from pathlib import Path

import pytest

from archer_async.config import RewardsConfig
from rewards import RewardPool
from rewards.sandbox import GRADER_DIR, _site_dir, sandbox_processes

pytestmark = pytest.mark.integration

TOKEN = secrets.token_hex(8)
SECRET = secrets.token_hex(12)
HOST_SECRET = Path(f"/tmp/archer-host-secret-{TOKEN}")
WRITE_TARGETS = [f"/tmp/pwn-{TOKEN}", f"/var/tmp/pwn-{TOKEN}", f"/dev/shm/pwn-{TOKEN}", f"/pwn-{TOKEN}",
                 f"/root/pwn-{TOKEN}", f"{os.getcwd()}/pwn-{TOKEN}", f"/usr/lib/pwn-{TOKEN}"]


def R(code: str) -> str:
    return f"</think>\n```python\n{code}\n```"


def stdio(expected: str) -> str:
    return json.dumps({"inputs": [""], "outputs": [expected]})


FUNCTIONAL = json.dumps({"functional": "def check(candidate):\n    assert candidate(2) == 4\n"
                                       "    assert candidate(3) == 9\ncheck(square)\n"})
LCB_CALL = json.dumps([{"input": "3", "output": "9", "testtype": "functional", "metadata": {"func_name": "square"}}])

# A wrong `square`: the attacks below must not turn it into a pass.
WRONG = "def square(x):\n    return x + 1\n"
LEAK_NONCE = """
def _leak(values):
    import os
    for v in values:
        if isinstance(v, bytes):
            v = v.decode('latin1')
        if isinstance(v, str) and len(v) == 32:
            for fd in range(0, 40):
                try:
                    os.write(fd, (v + ' PASS\\n' + v + ' RESULT 9\\n' + v + ' END\\n').encode())
                except OSError:
                    pass
"""


SCAN_MEMORY = """
import numpy as np, os, re
from numpy.lib.stride_tricks import as_strided
base = np.zeros(1, dtype=np.uint8)
found = set()
for span in (1 << 16, 1 << 20, 1 << 24):
    try:
        view = as_strided(base, shape=(span,), strides=(1,))
        found.update(re.findall(rb"[0-9a-f]{32}", view.tobytes()))
    except Exception:
        break
for tok in found:
    for fd in range(0, 40):
        try:
            os.write(fd, tok + b' VERDICT {"status": "pass", "reason": "x"}\\n')
        except OSError:
            pass
"""


def attacks(port: int) -> list[tuple[str, str, str]]:
    """(name, ground truth, response) of every adversarial program."""
    s = stdio
    host = str(HOST_SECRET)
    a = [
        # network
        ("tcp to host server", s("PONG-" + SECRET), R(f"import socket\nc=socket.create_connection(('127.0.0.1',{port}),1)\n"
                                                     "print(c.recv(100).decode())")),
        ("tcp to internet", s(SECRET), R("import socket\nsocket.create_connection(('1.1.1.1',80),1)\nprint('up')")),
        ("udp dns", s(SECRET), R("import socket\nprint(socket.gethostbyname('example.com'))")),
        ("unix socket scan", s(SECRET), R("import socket,glob\nfor p in glob.glob('/run/**/*.sock',recursive=True)+"
                                          "glob.glob('/tmp/**',recursive=True):\n    print(p)")),
        # reading host files and other samples' files
        ("read host secret", s(SECRET), R(f"print(open('{host}').read())")),
        ("read passwd", s(Path("/etc/passwd").read_text()), R("print(open('/etc/passwd').read())")),
        ("list host root", s(" ".join(sorted(os.listdir("/")))), R("import os\nprint(' '.join(sorted(os.listdir('/'))))")),
        ("read repo file", s(Path("pyproject.toml").read_text() if Path("pyproject.toml").exists() else SECRET),
         R(f"print(open('{os.getcwd()}/pyproject.toml').read())")),
        ("read proc environ", s(SECRET), R("print(open('/proc/1/environ').read())")),
        ("read own env", s(SECRET), R("import os\nprint(os.environ)")),
        ("other sample writer", s(SECRET), R(f"open('/tmp/shared-{TOKEN}','w').write('{SECRET}')\nimport time\n"
                                             "time.sleep(1.5)\nprint('x')")),
        ("other sample reader", s(SECRET), R(f"import time\ntime.sleep(0.5)\nprint(open('/tmp/shared-{TOKEN}').read())")),
        # writing outside the work dir
        ("write outside", s(SECRET), R("import os\nfor p in " + repr(WRITE_TARGETS) + ":\n    try:\n"
                                       "        open(p,'w').write('x')\n    except OSError:\n        pass\nprint('w')")),
        ("write big file", s(SECRET), R("f=open('/tmp/big','wb')\nwhile True: f.write(b'x'*(1<<20))")),
        # process and resource abuse
        ("fork bomb", s(SECRET), R("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass")),
        ("thread bomb", s(SECRET), R("import threading,time\nwhile True:\n    threading.Thread(target=time.sleep,"
                                     "args=(100,)).start()")),
        ("memory bomb", s(SECRET), R("x = bytearray(8 * 1024**3)\nprint(len(x))")),
        ("memory creep", s(SECRET), R("a=[]\nwhile True: a.append(bytearray(10**7))")),
        ("fork memory", s(SECRET), R("import os\nfor _ in range(4):\n    os.fork()\na=[]\n"
                                     "while True: a.append(bytearray(10**7))")),
        ("ignore sigterm", s(SECRET), R("import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: pass")),
        ("sleep forever", s(SECRET), R("import time\ntime.sleep(3600)")),
        ("setsid orphan", s(SECRET), R("import os,time\nif os.fork()==0:\n    os.setsid()\n    time.sleep(3600)\n"
                                       "print('parent done')")),
        ("double fork daemon", s(SECRET), R("import os,time\nif os.fork()==0:\n    if os.fork()==0:\n        os.setsid()\n"
                                            "        time.sleep(3600)\n    os._exit(0)\nprint('bye')")),
        ("kill parent", s(SECRET), R("import os,signal\nfor p in (os.getppid(), 1, -1):\n    try:\n"
                                     "        os.kill(p, signal.SIGKILL)\n    except OSError as e:\n        print(e)")),
        ("kill grader pids", s(SECRET), R("import os,signal\nfor p in range(2, 5000):\n    try:\n"
                                          "        os.kill(p, signal.SIGKILL)\n    except OSError:\n        pass\nprint('k')")),
        ("setuid root", s(SECRET), R("import os\nos.setuid(0)\nprint(open('/etc/shadow').read())")),
        ("ctypes", s(SECRET), R("import ctypes\nprint(ctypes.CDLL(None).getpid())")),
        ("posix system", s(SECRET), R("import posix\nprint(posix.system('cat /etc/passwd'))")),
        ("posix exec shell", s(SECRET), R("import posix\nposix.execv('/bin/sh', ['sh', '-c', 'id'])")),
        ("subprocess", s(SECRET), R("import subprocess\nprint(subprocess.check_output(['ls', '/']))")),
        ("mount proc", s(SECRET), R("import os\nos.makedirs('/tmp/p', exist_ok=True)\nprint(os.listdir('/proc'))")),
        ("gigabytes stdout", s(SECRET), R("import sys\nb='x'*(1<<20)\nwhile True: sys.stdout.write(b)")),
        ("gigabytes stderr", s(SECRET), R("import sys\nb='x'*(1<<20)\nwhile True: sys.stderr.write(b)")),
        ("deep recursion", s(SECRET), R("import sys\nsys.setrecursionlimit(10**9)\ndef f(n): return f(n+1)\nf(0)")),
        # early exits and forged channels (functional and call-based)
        ("sys.exit at import", FUNCTIONAL, R("import sys\nsys.exit(0)\n" + WRONG)),
        ("os._exit in call", FUNCTIONAL, R("import os\ndef square(x):\n    os._exit(0)")),
        ("SystemExit in call", FUNCTIONAL, R("def square(x):\n    raise SystemExit(0)")),
        ("atexit pass", FUNCTIONAL, R("import atexit,os\natexit.register(lambda: print('PASS'))\n" + WRONG)),
        ("excepthook", FUNCTIONAL, R("import sys\nsys.excepthook=lambda *a: None\nthreading_excepthook=None\n" + WRONG)),
        ("kill self", FUNCTIONAL, R("import os,signal\ndef square(x):\n    os.kill(os.getpid(), signal.SIGKILL)")),
        ("guess channel", FUNCTIONAL, R("import os\nfor fd in range(40):\n    try:\n        os.write(fd, b'PASS\\nEND\\n')\n"
                                        "    except OSError:\n        pass\nos._exit(0)\n" + WRONG)),
        ("lying eq", FUNCTIONAL, R("class A:\n    def __eq__(s, o): return True\n    def __ne__(s, o): return False\n"
                                   "def square(x):\n    return A()")),
        ("lying int", FUNCTIONAL, R("class I(int):\n    def __eq__(s, o): return True\ndef square(x):\n    return I(0)")),
        ("lying bool", json.dumps({"functional": "assert square(3)\nassert not square(0)\n"}),
         R("class B:\n    def __bool__(s): return True\ndef square(x):\n    return B()")),
        ("patch builtins", FUNCTIONAL, R("import builtins,operator\nbuiltins.all=lambda *a: True\n"
                                         "operator.eq=lambda a,b: True\nbuiltins.exec=lambda *a, **k: None\n" + WRONG)),
        ("patch os.write", FUNCTIONAL, R("import os\n_w=os.write\nos.write=lambda fd,d: _w(fd, d.replace(b'FAIL',b'PASS'))\n"
                                         + WRONG)),
        ("walk frames", FUNCTIONAL, R(LEAK_NONCE + "import sys\ndef square(x):\n    f=sys._getframe(0)\n    while f:\n"
                                      "        _leak(list(f.f_locals.values()))\n        f=f.f_back\n    return 0")),
        ("traceback frames", FUNCTIONAL, R(LEAK_NONCE + "def square(x):\n    try:\n        1/0\n    except Exception as e:\n"
                                           "        f=e.__traceback__.tb_frame\n        while f:\n"
                                           "            _leak(list(f.f_locals.values()))\n            f=f.f_back\n    return 0")),
        ("gc scan", FUNCTIONAL, R(LEAK_NONCE + "import gc\ndef square(x):\n    for o in gc.get_objects():\n"
                                  "        if isinstance(o, dict): _leak(list(o.values()))\n    return 0")),
        ("signal frame", FUNCTIONAL, R(LEAK_NONCE + "import signal\ndef h(sig, frame):\n    while frame:\n"
                                       "        _leak(list(frame.f_locals.values()))\n        frame=frame.f_back\n"
                                       "signal.signal(signal.SIGALRM, h)\nsignal.setitimer(signal.ITIMER_REAL, 0.01, 0.01)\n"
                                       "def square(x):\n    import time\n    time.sleep(0.3)\n    return 0")),
        ("settrace", FUNCTIONAL, R(LEAK_NONCE + "import sys,threading\ndef t(frame, ev, arg):\n"
                                   "    _leak(list(frame.f_locals.values()))\n    return t\nsys.settrace(t)\n"
                                   "threading.settrace(t)\n" + WRONG)),
        ("read harness stdin", FUNCTIONAL, R(LEAK_NONCE + "import sys,json\ntry:\n    _leak([json.loads(sys.stdin.read())"
                                             "['nonce']])\nexcept Exception:\n    pass\n" + WRONG)),
        ("main module globals", FUNCTIONAL, R(LEAK_NONCE + "import sys\nm=sys.modules['__main__']\n"
                                              "_leak(list(vars(m).values()))\nm._make_helpers=lambda: (lambda *a: True,)*2\n"
                                              + WRONG)),
        ("call lying eq", LCB_CALL, R("class A(int):\n    def __eq__(s, o): return True\n"
                                      "class Solution:\n    def square(self, x): return A(0)")),
        ("call early exit", LCB_CALL, R("import os\nclass Solution:\n    def square(self, x): os._exit(0)")),
        # the capabilities added for dataset parity: numpy / pandas / ctypes, exit(), helpers, two processes
        ("numpy write outside", s(SECRET), R("import numpy as np\nfor p in " + repr(WRITE_TARGETS) + ":\n    try:\n"
                                             "        np.save(p, np.zeros(3))\n    except Exception:\n        pass\nprint('w')")),
        ("numpy read host file", s(SECRET), R(f"import numpy as np\nprint(np.fromfile('{host}', dtype='S1').tobytes().decode())")),
        ("pandas read host file", s(SECRET), R(f"import pandas as pd\nprint(pd.read_csv('{host}', header=None)[0][0])")),
        ("write site-packages", s(SECRET), R("import numpy, os\nd = os.path.dirname(numpy.__file__)\n"
                                             "open(os.path.join(d, 'pwn.py'), 'w').write('x')\nprint('w')")),
        ("ctypes setuid", s(SECRET), R("import ctypes\nlibc = ctypes.CDLL(None)\nlibc.setuid(0)\nlibc.setgid(0)\n"
                                       "print(open('/etc/shadow').read())")),
        ("ctypes unshare mount", s(SECRET), R("import ctypes, os\nlibc = ctypes.CDLL(None)\n"
                                              "print(libc.unshare(0x10000000 | 0x00020000))\nos.makedirs('/tmp/h', exist_ok=True)\n"
                                              "print(libc.mount(b'/', b'/tmp/h', None, 4096 | 16384, None))\n"
                                              f"print(open('/tmp/h{host}').read())")),
        ("ctypes raw socket", s("PONG-" + SECRET), R(f"import ctypes, socket\nlibc = ctypes.CDLL(None)\nlibc.unshare(0x40000000)\n"
                                                     f"c = socket.create_connection(('127.0.0.1', {port}), 1)\nprint(c.recv(100).decode())")),
        ("ctypes ptrace harness", FUNCTIONAL, R("import ctypes, os\nlibc = ctypes.CDLL(None)\n"
                                                "for pid in range(1, 64):\n    if pid != os.getpid():\n"
                                                "        libc.ptrace(16, pid, 0, 0)\n" + WRONG)),
        ("kill the harness", FUNCTIONAL, R("import os, signal\nfor pid in range(1, 200):\n    if pid != os.getpid():\n"
                                           "        try:\n            os.kill(pid, signal.SIGKILL)\n        except OSError:\n"
                                           "            pass\n" + WRONG)),
        ("numpy memory scan", FUNCTIONAL, R(SCAN_MEMORY + WRONG)),
        ("garbage on the pipes", FUNCTIONAL, R("import os\nfor fd in range(3, 40):\n    try:\n"
                                               "        os.write(fd, b'\\x7f' * 8 + b'[\"ok\"')\n    except OSError:\n"
                                               "        pass\n" + WRONG)),
        ("huge reply", FUNCTIONAL, R("def square(x):\n    return [0] * 10**8")),
        ("deep reply", FUNCTIONAL, R("def square(x):\n    a = []\n    for _ in range(10**5):\n        a = [a]\n    return a")),
        ("shadow test helper", json.dumps({"functional": "assert is_same_list(build(), list_node([1]))\n"}),
         R("def build():\n    return None\ndef is_same_list(a, b):\n    return True")),
        ("shadow builtin", json.dumps({"functional": "assert abs(f(1.33) - 0.33) < 1e-6\n"}),
         R("def abs(x):\n    return 0\ndef f(x):\n    return 5.0")),
        ("patch numpy", json.dumps({"functional": "import numpy as np\nassert np.allclose(f(1), 2.0)\n"}),
         R("import numpy as np\nnp.allclose = lambda *a, **k: True\ndef f(x):\n    return 7.0")),
        ("module exit()", FUNCTIONAL, R("exit()\n" + WRONG)),
        ("module quit()", FUNCTIONAL, R("quit()\n" + WRONG)),
        ("exit() in call", FUNCTIONAL, R("def square(x):\n    exit(0)")),
        ("hijack harness imports", FUNCTIONAL, R("import os\nfor d in ('/tmp', " + repr(GRADER_DIR) + ", " + repr(_site_dir())
                                                 + "):\n    for m in ('json.py', 'wire.py', 'lcb_compat.py'):\n"
                                                 "        try:\n            open(os.path.join(d, m), 'w').write('raise SystemExit')\n"
                                                 "        except OSError:\n            pass\n" + WRONG)),
        ("lcb stdin forged output", json.dumps([{"input": "", "output": SECRET, "testtype": "stdin", "metadata": {}}]),
         R("import os\nfor fd in range(0, 40):\n    try:\n        os.write(fd, b'x')\n    except OSError:\n        pass\nprint('nope')")),
        ("call forged lines", LCB_CALL, R("import os\nfor fd in range(40):\n    try:\n"
                                          "        os.write(fd, b'RESULT 9\\nEND\\n')\n    except OSError:\n        pass\n"
                                          "class Solution:\n    def square(self, x): return 0")),
    ]
    return a


@pytest.fixture(scope="module")
def server():
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    stop = threading.Event()

    def serve():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
                c.sendall(f"PONG-{SECRET}".encode())
                c.close()
            except OSError:
                continue
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    srv.close()


def test_adversarial_suite(server):
    HOST_SECRET.write_text(SECRET)
    try:
        cfg = RewardsConfig(workers=6, timeout_s=2.0, functional_timeout_s=4.0, lcb_timeout_s=2.0, cpu_time_s=2,
                            memory_mb=512, max_processes=16, max_output_bytes=100_000, workdir_mb=16)
        programs = attacks(server)
        assert len(programs) >= 75
        with RewardPool(cfg) as pool:
            rewards = pool.score([("livecodebench", gt, resp) for _, gt, resp in programs], training=False)
            results = {name: (r.status, r.reason) for (name, _, _), r in zip(programs, rewards)}
            bad = {k: v for k, v in results.items() if v[0] not in ("fail", "timeout")}
            assert not bad, bad
            # the harness outlived the attacks on it and ran the tests to a failing assert
            for name in ("kill the harness", "ctypes ptrace harness", "numpy memory scan", "module exit()"):
                assert results[name][0] == "fail", (name, results[name])
            for name in ("kill the harness", "ctypes ptrace harness"):
                assert "AssertionError" in results[name][1], (name, results[name])
            assert not os.path.exists(os.path.join(os.path.dirname(__import__("numpy").__file__), "pwn.py"))
            assert sandbox_processes() == []  # no process of any scored program is left
            for p in WRITE_TARGETS + [f"/tmp/shared-{TOKEN}"]:
                assert not os.path.exists(p), p
            assert HOST_SECRET.read_text() == SECRET
            # the next samples are not disturbed: honest solutions of every format still pass
            honest = [
                ("livecodebench", stdio("42"), R("print(42)")),
                ("humanevalplus", FUNCTIONAL, R("def square(x):\n    return x * x")),
                ("livecodebench", LCB_CALL, R("class Solution:\n    def square(self, x): return x * x")),
            ]
            after = pool.score(honest, training=False)
            assert [r.status for r in after] == ["pass"] * 3, after
        assert sandbox_processes() == []
    finally:
        HOST_SECRET.unlink(missing_ok=True)
