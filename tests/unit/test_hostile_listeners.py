"""Listeners bind the configured address only: learner rank 0's rendezvous store and the weight
transfer's control store (torch's TCPStore listens on every interface unless handed a socket).
127.0.0.2 is loopback too, so a store bound to 127.0.0.1 refuses it while one on `*` accepts it."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import datetime, socket
import torch
from archer_async.weight_sync.protocol import Control, SyncInit, free_port
from learner.distributed import init_process_group

def reachable(host, port):
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False

init = SyncInit(host="127.0.0.1", store_port=free_port(), world_size=2, backend="gloo", timeout_s=10.0,
                rank=0)
master = Control(init, is_master=True, timeout_s=10)
peer = Control(init, is_master=False, timeout_s=10)
peer.set("k", 7)
assert master.get("k") == 7
print("control", reachable("127.0.0.1", init.store_port), reachable("127.0.0.2", init.store_port))
port = free_port()
init_process_group(0, 1, "127.0.0.1", port, torch.device("cpu"), 30)
print("pg", reachable("127.0.0.1", port), reachable("127.0.0.2", port))
"""


def test_stores_listen_on_the_given_host_only():
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = dict(ln.split(" ", 1) for ln in r.stdout.splitlines() if ln.startswith(("control", "pg")))
    assert lines["control"] == "True False", r.stdout  # 127.0.0.1 only, not every interface
    assert lines["pg"] == "True False", r.stdout
