"""Listeners bind the configured address only: learner rank 0's rendezvous store and the weight
transfer's control store (torch's TCPStore listens on every interface unless handed a socket).
127.0.0.2 is loopback too, so a store bound to 127.0.0.1 refuses it while one on `*` accepts it.
And a client of either port without the run's token sees none of the group's keys and cannot change
them (every key lives under the secret; a TCPStore cannot list its keys)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import datetime, socket
import torch
from archer_async.weight_sync.protocol import Control, free_port, make_sync_init
from learner.distributed import init_process_group

def reachable(host, port):
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False

init = make_sync_init(1, host="127.0.0.1", timeout_s=10.0)
assert len(init.token) >= 32, init.token
master = Control(init, is_master=True, timeout_s=10)
peer = Control(init.for_rank(1), is_master=False, timeout_s=10)
peer.set("k", 7)
assert master.get("k") == 7
print("control", reachable("127.0.0.1", init.store_port), reachable("127.0.0.2", init.store_port))
outsider = torch.distributed.TCPStore("127.0.0.1", init.store_port, is_master=False, wait_for_workers=False,
                                      timeout=datetime.timedelta(seconds=5))
print("outsider-sees", outsider.check([Control.PREFIX + "k"]), outsider.num_keys() > 0)
outsider.set(Control.PREFIX + "k", "666")
print("after-outsider-set", master.get("k"))
port = free_port()
init_process_group(0, 1, "127.0.0.1", port, torch.device("cpu"), 30, store_token="s3cret")
print("pg", reachable("127.0.0.1", port), reachable("127.0.0.2", port))
pg_outsider = torch.distributed.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False,
                                         timeout=datetime.timedelta(seconds=5))
torch.distributed.barrier()  # the group's own rendezvous keys are written now
n = pg_outsider.num_keys()
pg_outsider.set("probe", "x")
print("pg-outside-keys", n > 0, pg_outsider.num_keys() == n + 1)
"""


def test_stores_listen_on_the_given_host_only():
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = dict(ln.split(" ", 1) for ln in r.stdout.splitlines() if " " in ln)
    assert lines["control"] == "True False", r.stdout  # 127.0.0.1 only, not every interface
    assert lines["pg"] == "True False", r.stdout
    # the store holds keys, but none under the names the group uses: they live under the token
    assert lines["outsider-sees"] == "False True", r.stdout
    assert lines["after-outsider-set"] == "7", r.stdout
    assert lines["pg-outside-keys"] == "True True", r.stdout
