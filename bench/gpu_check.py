"""The checks of `bench/gpu_check.sh` that are not `bench.gpu_learner`; each prints one JSON line and
exits non-zero when its check fails.

    python -m bench.gpu_check loss  [--cpu-dry]   # the objective on CUDA against CPU float32
    python -m bench.gpu_check ckpt  [--cpu-dry]   # DCP checkpoint + RNG restore + HF export of a learner
    python -m bench.gpu_check sync  [--cpu-dry]   # sender -> receiver, two processes, one device: host memory
    python -m bench.gpu_check nccl                # the same through NCCL: bit-exact or refused, never hung

--cpu-dry runs the same code with the CPU as "the device" and tiny shapes (a smoke test of the
script on a machine without GPU: it checks the code paths, not CUDA).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _device(cpu_dry: bool) -> torch.device:
    if cpu_dry:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --cpu-dry for the CPU smoke test)")
    return torch.device("cuda", 0)


def _emit(check: str, ok: bool, **fields) -> int:
    print(json.dumps({"check": check, "ok": bool(ok), **fields}), flush=True)
    return 0 if ok else 1


# ----------------------------------------------------------------------------------------------
def check_loss(cpu_dry: bool) -> int:
    """policy_loss + its gradient w.r.t. the logits, from the same inputs on CPU float32 and on the
    device (float32 logits, and bf16 logits as the learner feeds them)."""
    from archer_async.loss import LossConfig, entropy_from_logits, logprobs_from_logits, policy_loss

    dev = _device(cpu_dry)
    b, t, v = (2, 32, 257) if cpu_dry else (2, 1024, 151936)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(b, t, v, generator=g) * 3
    ids = torch.randint(0, v, (b, t), generator=g)
    old = torch.randn(b, t, generator=g) * 0.1 - 2.0
    ref = old + torch.randn(b, t, generator=g) * 0.05
    adv = torch.randn(b, 1, generator=g).expand(b, t).contiguous()
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, t // 2:] = False
    cfg = LossConfig()

    def run(device: torch.device, dtype: torch.dtype):
        x = logits.to(device=device, dtype=dtype).detach().clone().requires_grad_(True)
        lp = logprobs_from_logits(x, ids.to(device))
        ent = entropy_from_logits(x)
        loss, _ = policy_loss(lp, lp.detach(), old.to(device), ref.to(device), ent,
                              adv.to(device), mask.to(device), cfg)
        loss.backward()
        return loss.detach().double().cpu(), x.grad.double().cpu()

    l_cpu, g_cpu = run(torch.device("cpu"), torch.float32)
    l_dev, g_dev = run(dev, torch.float32)
    l_bf, g_bf = run(dev, torch.bfloat16)
    scale = g_cpu.abs().max().item() or 1.0
    out = {"device": str(dev), "shape": [b, t, v], "loss_cpu_fp32": l_cpu.item(), "loss_dev_fp32": l_dev.item(),
           "loss_dev_bf16_logits": l_bf.item(),
           "loss_rel_diff_fp32": abs(l_dev.item() - l_cpu.item()) / max(abs(l_cpu.item()), 1e-12),
           "grad_max_rel_diff_fp32": (g_dev - g_cpu).abs().max().item() / scale,
           "loss_rel_diff_bf16": abs(l_bf.item() - l_cpu.item()) / max(abs(l_cpu.item()), 1e-12)}
    ok = out["loss_rel_diff_fp32"] < 1e-4 and out["grad_max_rel_diff_fp32"] < 1e-3 and out["loss_rel_diff_bf16"] < 5e-2
    return _emit("loss", ok, **out)


# ----------------------------------------------------------------------------------------------
def check_ckpt(cpu_dry: bool) -> int:
    """A 1-rank learner (FSDP2) on the device: one step, checkpoint, a second step; then a fresh learner
    loads the checkpoint and repeats the second step: same loss, same RNG draws (the CUDA generator
    included on a GPU); the HF export loads in transformers with the learner's weights."""
    from archer_async.config import Config
    from bench.gpu_learner import TINY, build_model_dir, free_port, make_groups
    from learner.trainer import Learner

    dev = _device(cpu_dry)
    gpu = dev.type == "cuda"
    dtype_name = "bfloat16" if gpu else "float32"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mdir = build_model_dir(tmp / "model", TINY, dev, torch.bfloat16 if gpu else torch.float32)
        cfg = Config.model_validate({
            "run_dir": str(tmp / "run"), "model": {"dtype": dtype_name},
            "learner": {"num_ranks": 1, "gpus_per_rank": 1 if gpu else 0, "batch_groups": 1, "mini_batch_groups": 1,
                        "micro_batch_size": 1}})
        groups = make_groups(2, 128, 16, TINY["vocab_size"])

        def draws():
            d = {"cpu": torch.rand(4).tolist()}
            if gpu:
                d["cuda"] = torch.rand(4, device=dev).tolist()
            return d

        lrn = Learner(cfg, 0, 1, "127.0.0.1", free_port(), tmp / "run", mdir)
        lrn.step(groups)
        path = lrn.save_checkpoint(1, {"note": "gpu_check"})
        after_save = draws()
        second = lrn.step(groups)["loss"]
        export = lrn.export_hf(1)
        ids = torch.tensor([groups[0].prompt_ids[:16]])
        with torch.no_grad():
            learner_logits = lrn.model(ids.to(dev)).logits.float().cpu()
        lrn.close()
        del lrn
        lrn = Learner(cfg, 0, 1, "127.0.0.1", free_port(), tmp / "run", mdir)
        extra = lrn.load_checkpoint(str(path))
        after_load = draws()
        again = lrn.step(groups)["loss"]
        lrn.close()
        rng_files = sorted(p.name for p in (Path(path) / "rng").iterdir())
        rng_state = torch.load(Path(path) / "rng" / rng_files[0], weights_only=False)
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32)
        with torch.no_grad():
            logits = hf(ids).logits
        export_diff = ((logits - learner_logits).abs().max() / learner_logits.abs().max().clamp_min(1e-6)).item()
        out = {"device": str(dev), "checkpoint": Path(path).name, "extra_state": extra,
               "loss_step2": second, "loss_step2_after_restore": again, "rng_equal": after_save == after_load,
               "cuda_rng_saved": "cuda" in rng_state, "hf_export_logits_finite": bool(torch.isfinite(logits).all()),
               "hf_export_vs_learner_logits_max_rel_diff": export_diff}
    # CPU: bit-identical; CUDA: kernels may pick other reduction orders between two processes' worth of
    # state, so a relative 1e-5 on the loss of the same weights and batch
    out["loss_abs_diff"] = abs(second - again)
    tol = 1e-5 * max(1.0, abs(second)) if gpu else 0.0
    ok = (out["rng_equal"] and out["loss_abs_diff"] <= tol and out["cuda_rng_saved"] == gpu
          and out["hf_export_logits_finite"] and export_diff < (2e-2 if gpu else 1e-4))
    return _emit("ckpt", ok, **out)


# ----------------------------------------------------------------------------------------------
def _raw(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def _receiver(init: dict, device: str, version: int, q) -> None:
    from actors.weight_receiver import WeightReceiver

    try:
        rx = WeightReceiver(init, device=torch.device(device))
        rx.connect()
        got = {name: _raw(t) for name, t in rx.receive(expected_version=version)}  # plain bytes cross the queue
        q.put({"ok": True, "tensors": got})
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        q.put({"ok": False, "error": f"{type(e).__name__}: {e}"[:500]})


def _transfer(backend: str, dev: torch.device, named: dict, timeout_s: float) -> dict:
    from archer_async.weight_sync import make_sync_init
    from learner.weight_sender import WeightSender

    init = make_sync_init(1, backend=backend, timeout_s=timeout_s)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    rx_device = str(dev) if backend == "nccl" else "cpu"
    proc = ctx.Process(target=_receiver, args=(init.for_rank(1).to_dict(), rx_device, 1, q), daemon=True)
    proc.start()
    res: dict = {"backend": backend}
    tx = WeightSender(init)
    try:
        t0 = time.perf_counter()
        tx.connect()
        stats = tx.send(list(named.items()), 1)
        res.update(send_s=round(time.perf_counter() - t0, 3), bytes=stats["bytes"])
        got = q.get(timeout=timeout_s)
        if not got["ok"]:
            res.update(ok=False, error=got["error"])
        else:
            res["bit_exact"] = all(_raw(named[k]) == v for k, v in got["tensors"].items()) \
                and set(got["tensors"]) == set(named)
            res["ok"] = res["bit_exact"]
    except BaseException as e:  # noqa: BLE001 - the outcome is the report
        res.update(ok=False, error=f"{type(e).__name__}: {e}"[:500])
    finally:
        tx.close()
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    return res


def _weights(dev: torch.device, cpu_dry: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    n, shape = (4, (256, 1024)) if cpu_dry else (24, (2048, 8960))  # 24 x 35 MiB in bf16 on a GPU
    return {f"w{i}": torch.randn(*shape, generator=g).to(device=dev, dtype=torch.bfloat16) for i in range(n)}


def check_sync(cpu_dry: bool) -> int:
    """Weights from a sender process's device to a receiver process on the SAME device through host
    memory (gloo), the path sync.backend auto picks for co-located roles: must be bit-exact."""
    from launch.colocation import choose_backend

    dev = _device(cpu_dry)
    auto = choose_backend("auto", {"learner0": ["GPU-same"], "actor0": ["GPU-same"]}).backend
    res = _transfer("gloo", dev, _weights(dev, cpu_dry), 120)
    return _emit("sync", auto == "gloo" and res.get("ok", False), device=str(dev), auto_backend_when_shared=auto,
                 host_memory=res)


def check_nccl(cpu_dry: bool) -> int:
    """The NCCL branch of sender/receiver between two processes on ONE GPU. NCCL refuses two ranks of one
    communicator on one device, which is why the launcher never builds this group (`launch.colocation`);
    the check passes when the transfer is either bit-exact or refused with an error, and fails when it
    hangs past its deadline (the script's timeout) or corrupts the weights."""
    dev = _device(cpu_dry)
    if dev.type != "cuda":
        return _emit("nccl", True, device=str(dev), skipped="no CUDA device (--cpu-dry)")
    res = _transfer("nccl", dev, _weights(dev, cpu_dry), 60)
    ok = res.get("ok", False) or ("error" in res and "bit_exact" not in res)  # refused, not corrupted
    return _emit("nccl", ok, device=str(dev), refused="error" in res, **res)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("check", choices=["loss", "ckpt", "sync", "nccl"])
    ap.add_argument("--cpu-dry", action="store_true", help="CPU as the device, tiny shapes (smoke test)")
    args = ap.parse_args()
    sys.exit({"loss": check_loss, "ckpt": check_ckpt, "sync": check_sync, "nccl": check_nccl}[args.check](args.cpu_dry))


if __name__ == "__main__":
    main()
