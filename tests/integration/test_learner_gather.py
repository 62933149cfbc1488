"""The batched full-weight gather (learner.weights.gather_bucket) against DTensor.full_tensor, per
parameter, on real FSDP2 shards over gloo: 2 and 3 spawned ranks on 127.0.0.1, uneven dim-0 sizes
(including a rank with an empty shard), fp32 and bf16."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.learner import spawn

pytestmark = pytest.mark.integration


def _compare(rank, world, port, out_dir):
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from learner.weights import _full, gather_bucket, iter_full_weights

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3), torch.nn.Embedding(1, 4),
                                    torch.nn.Linear(3, 130))
        fully_shard(model, mesh=mesh)
        params = list(model.parameters())
        report = {"local_rows": [p.to_local().shape[0] for p in params], "equal": []}
        for dtype in (torch.float32, torch.bfloat16):
            batched = gather_bucket(params, dtype)
            single = [_full(p, dtype) for p in params]
            report["equal"].append(all(a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
                                       for a, b in zip(batched, single)))
        # through the public iterator, several buckets: rank 0 gets every tensor, the others none
        got = list(iter_full_weights(model, rank, torch.float32, bucket_bytes=200))
        single = [_full(p, torch.float32) for p in params]  # collectives: every rank
        report["iter_names"] = [n for n, _ in got]
        report["iter_equal"] = all(torch.equal(t, f) for (_, t), f in zip(got, single))
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        dist.barrier()  # as Learner.close: no rank tears its group down while a peer still uses it
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_learner_batched_gather_equals_full_tensor(tmp_path, world):
    spawn(_compare, world, str(tmp_path), err_dir=tmp_path)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    assert all(r["equal"] == [True, True] for r in reports), reports
    if world == 3:  # the 1-row embedding leaves two ranks without rows; the 5-row layer is split 2/2/1
        assert [r["local_rows"][0] for r in reports] == [2, 2, 1]
        assert [r["local_rows"][4] for r in reports] == [1, 0, 0]
    names = ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "3.weight", "3.bias"]
    assert reports[0]["iter_names"] == names and reports[0]["iter_equal"]
    assert all(r["iter_names"] == [] for r in reports[1:])
