"""`archer-async train` and `archer-async resume`: one run, top to bottom.

    preflight        model directory, data files, resources: clear errors before anything starts
    run directory    config.resolved.yaml, logs/<role>.log, status.json
    Ray              a local cluster (or launch.ray_address); every role placed by its declared resources
    buffer           durable replay buffer (restored from the checkpoint's consumed state on resume)
    learner ranks    FSDP2 process group; rank 0 samples from the buffer and sends weights
    actors           vLLM engines generating continuously; weights arrive in flight
    loop             learner step -> weight sync (version v+1) -> metrics row -> eval / checkpoint
    end              final eval, checkpoint, HF export; Ctrl-C or a failure stops every role

In `launch.mode: sync` the buffer's staleness bound is 0: actors generate exactly one batch per
version, so generation and training alternate (the baseline of the asynchronous mode).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

from archer_async.config import Config, UserError, to_yaml
from archer_async.metrics import MetricsWriter, write_run_status
from archer_async.runlog import atomic_write_text, setup_role_logging

from launch import cluster
from launch.roles import StartupError, construct_all, place, wait

log = logging.getLogger("launch")


def train_main(cfg: Config) -> int:
    """Start a new run in cfg.run_dir (which must not hold a run already)."""
    rd = Path(cfg.run_dir)
    if (rd / "checkpoints").exists() or (rd / "buffer").exists():
        raise UserError(f"run_dir {str(rd)!r} already holds a run: `archer-async resume {rd}` continues it")
    return Run(cfg, resume=False).execute()


def resume_main(cfg: Config) -> int:
    """Continue the run in cfg.run_dir from checkpoints/latest and its persisted buffer."""
    return Run(cfg, resume=True).execute()


class Run:
    """One training run (new or resumed) driven from this process."""

    def __init__(self, cfg: Config, resume: bool):
        if cfg.launch.mode == "sync":
            # generate exactly one batch per weight version, then train on it: no overlap, no staleness
            cfg = cfg.model_copy(deep=True)
            cfg.buffer.max_staleness = 0
        self.cfg = cfg
        self.resume = resume
        self.run_dir = Path(cfg.run_dir).resolve()
        self.hosts: dict[str, Any] = {}
        self.learners: list = []
        self.actors: list = []
        self.buffer = None
        self.writer: Optional[MetricsWriter] = None
        self.dashboard = None
        self.eval_history: list[tuple[int, float]] = []

    # ------------------------------------------------------------------------------------------
    def execute(self) -> int:
        cfg = self.cfg
        pre = cluster.preflight(cfg, self.resume)          # UserError before anything starts
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.resume:
            atomic_write_text(self.run_dir / "config.resolved.yaml", to_yaml(cfg))
        driver_log = setup_role_logging(self.run_dir, "driver", redirect_std=False)
        _console(f"run directory: {self.run_dir}  (driver log: {driver_log})")
        write_run_status(self.run_dir, "running", total_steps=cfg.learner.total_steps, pid=os.getpid())
        status, rc = "failed", 1
        old_handler = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        try:
            cluster.start_ray(cfg, pre)
            self._start_roles(pre)
            self._loop(pre)
            status, rc = "finished", 0
        except KeyboardInterrupt:
            _console("interrupted: stopping every role (the last checkpoint stays valid)")
            status, rc = "stopped", 130
        except (StartupError, UserError) as e:
            _console(f"error: {e}")
            status, rc = "failed", 1
        finally:
            signal.signal(signal.SIGTERM, old_handler)
            self._shutdown()
            write_run_status(self.run_dir, status)
        return rc

    # ------------------------------------------------------------------------------------------
    def _start_roles(self, pre: "cluster.Preflight") -> None:
        """Place every role by its declared resources, then construct them (deadline: launch.startup_timeout_s)."""
        cfg, run_dir, env = self.cfg, str(self.run_dir), cluster.role_env()
        t0, deadline = time.time(), cfg.launch.startup_timeout_s
        _console(f"starting roles: buffer, {cfg.learner.num_ranks} learner rank(s), {cfg.actors.num_actors} actor(s)")
        self.buffer = self.hosts["buffer"] = place("buffer", run_dir, num_cpus=0.1,
                                                   node_label=cfg.buffer.node_label, env=env)
        for r in range(cfg.learner.num_ranks):
            self.hosts[f"learner{r}"] = place(f"learner{r}", run_dir, num_cpus=cfg.learner.cpus_per_rank,
                                              num_gpus=cfg.learner.gpus_per_rank, node_label=cfg.learner.node_label,
                                              env=env)
        self.learners = [self.hosts[f"learner{r}"] for r in range(cfg.learner.num_ranks)]
        for i in range(cfg.actors.num_actors):
            self.hosts[f"actor{i}"] = place(f"actor{i}", run_dir, num_cpus=cfg.actors.cpus_per_actor,
                                            num_gpus=cfg.actors.gpus_per_actor, node_label=cfg.actors.node_label,
                                            env=env)
        self.actors = [self.hosts[f"actor{i}"] for i in range(cfg.actors.num_actors)]
        # Rendezvous points live on learner rank 0's node: its process group and the weight-transfer store.
        rank0 = self.learners[0]
        master_addr = wait(rank0.node_ip.remote(), deadline, "placement", ["learner0"])
        master_port, sync_port = wait([rank0.free_port.remote(), rank0.free_port.remote()], 60, "ports", ["learner0"])
        self.sync_init = cluster.make_sync(cfg, master_addr, sync_port)
        restore_buffer = (pre.restore.get("extra_state") or {}).get("buffer") if self.resume else None
        version0 = int(pre.restore.get("version", 0)) if self.resume else 0
        specs = {"buffer": ("buffer.service:BufferService", (cfg, run_dir, restore_buffer))}
        construct_all(self.hosts, specs, deadline)       # actors and learners find the buffer in run_dir
        for r in range(cfg.learner.num_ranks):
            specs[f"learner{r}"] = ("learner.trainer:Learner", (cfg, r, cfg.learner.num_ranks, master_addr,
                                                                 master_port, run_dir, str(pre.model_path)))
        for i in range(cfg.actors.num_actors):
            specs[f"actor{i}"] = ("actors.rollout:RolloutActor", (cfg, i, run_dir),
                                  {"sync_init": self.sync_init.for_rank(i + 1).to_dict(),
                                   "model_path": str(pre.model_path), "initial_version": version0})
        del specs["buffer"]
        nodes = construct_all(self.hosts, specs, max(1.0, deadline - (time.time() - t0)))
        for role, node in nodes.items():
            log.info("%s on %s", role, node)
        _console(f"roles up in {time.time() - t0:.0f} s on {len(set(nodes.values()))} node(s)")

    # ------------------------------------------------------------------------------------------
    def _loop(self, pre: "cluster.Preflight") -> None:
        cfg = self.cfg
        start_step, version = 0, 0
        if self.resume:
            extra = self._learners("load_checkpoint", str(pre.checkpoint), what="checkpoint restore")[0] or {}
            start_step, version = int(pre.restore["step"]), int(pre.restore["version"])
            for a, st in zip(self.actors, extra.get("actors", [])):
                wait(a.call.remote("load_data_state", st), 60, "data cursor restore")
            _console(f"resumed at step {start_step}, weight version {version}")
        # actors get the learner's weights (restored ones on resume) before any rollout
        self._sync_weights(version)
        self._start_dashboard()
        self.writer = MetricsWriter(self.run_dir, cfg.wandb, resume_step=start_step if self.resume else None)
        if not self.resume and cfg.launch.eval_every:
            self._evaluate(0, {})
        for a in self.actors:
            wait(a.call.remote("start"), 60, "start of generation")
        total = cfg.learner.total_steps
        _console(f"training steps {start_step + 1}..{total}")
        step = start_step
        for step in range(start_step + 1, total + 1):
            m = self._learners("step_from_buffer", what=f"training step {step}")[0]
            version = int(m["version"])
            sync = self._sync_weights(version)
            row = {**_scalars(m), "step": step, "version": version, "sync/seconds": sync["seconds"],
                   "staleness/hist": m.get("staleness/hist", {})}
            row.update(self._actor_metrics())
            row.update(self._buffer_metrics())
            if cfg.launch.eval_every and (step % cfg.launch.eval_every == 0 or step == total):
                self._evaluate(step, row)
            self.writer.log(row)
            _console(_progress_line(row, total))
            if step % cfg.learner.checkpoint_every == 0 or step == total:
                self._checkpoint(step, version)
        if cfg.learner.export_hf_every == 0 or step % max(1, cfg.learner.export_hf_every):
            path = self._learners("export_hf", step, what="HF export")[0]
            _console(f"exported Hugging Face model: {path}")
        if len(self.eval_history) >= 2:
            (s0, a0), (s1, a1) = self.eval_history[0], self.eval_history[-1]
            _console(f"held-out accuracy: {100 * a0:.1f}% at step {s0} -> {100 * a1:.1f}% at step {s1} "
                     f"({100 * (a1 - a0):+.1f} points)")

    # ------------------------------------------------------------------------------------------
    def _learners(self, method: str, *args, what: str, timeout: Optional[float] = None) -> list:
        """Call `method` on every learner rank (collective) and wait; errors name the rank."""
        refs = [h.call.remote(method, *args) for h in self.learners]
        return wait(refs, timeout or max(self.cfg.sync.timeout_s, 3600), what,
                    [f"learner{r}" for r in range(len(self.learners))])

    def _sync_weights(self, version: int) -> dict:
        """Learner ranks gather and send; actors receive and load in flight. One call per role."""
        t0 = time.time()
        init = self.sync_init.for_rank(0).to_dict()
        lrefs = [h.call.remote("broadcast_weights", version, init) for h in self.learners]
        arefs = [a.call.remote("update_weights", version) for a in self.actors]
        deadline = self.cfg.sync.timeout_s + 60
        res = wait(lrefs, deadline, f"weight sync to version {version}", ["learner"])[0]
        acts = wait(arefs, deadline, f"weight sync to version {version}",
                    [f"actor{i}" for i in range(len(self.actors))])
        failed = [f"actor{i}: {r.get('error')}" for i, r in enumerate(acts) if not r.get("ok", True)]
        if not res.get("ok", True) or failed:
            raise StartupError(f"weight sync to version {version} failed: {res.get('error') or '; '.join(failed)}")
        return {"seconds": time.time() - t0}

    def _actor_metrics(self) -> dict:
        stats = [wait(a.call.remote("stats"), 60, "stats", [f"actor{i}"]) for i, a in enumerate(self.actors)]
        tps = sum(s.get("actor/tokens_per_s", 0.0) for s in stats)
        wfw = max((s.get("actor/wait_for_weights_s", 0.0) for s in stats), default=0.0)
        return {"actor/tokens_per_s": tps, "actor/wait_for_weights_s": wfw,
                "actor/in_flight": sum(s.get("actor/in_flight", 0) for s in stats)}

    def _buffer_metrics(self) -> dict:
        s = wait(self.buffer.call.remote("metrics"), 60, "stats", ["buffer"])
        return {k: v for k, v in s.items() if isinstance(v, (int, float))}

    def _evaluate(self, step: int, row: dict) -> None:
        """Held-out avg@K / pass@K with the actors' engines (eval temperature), added to `row`."""
        from archer_async.evaluation import summarize

        cfg = self.cfg
        rows = cluster.eval_rows(cfg)
        shards = [rows[i::len(self.actors)] for i in range(len(self.actors))]
        refs = [a.call.remote("evaluate_rewards", shard, cfg.launch.eval_k) for a, shard in zip(self.actors, shards) if shard]
        per_problem = [r for part in wait(refs, 3600, "held-out evaluation", ["actors"]) for r in part]
        s = summarize(per_problem, cfg.launch.eval_k)
        row.update({"eval/accuracy": s["avg_at_k"], "eval/pass_at_k": s["pass_at_k"]})
        self.eval_history.append((step, s["avg_at_k"]))
        _console(f"eval step {step}: avg@{s['k']} {100 * s['avg_at_k']:.1f}%  pass@{s['k']} "
                 f"{100 * s['pass_at_k']:.1f}%  ({s['problems']} problems)")
        if step == 0 and self.writer is not None:
            self.writer.log({"step": 0, "version": 0, **{k: row[k] for k in ("eval/accuracy", "eval/pass_at_k")}})

    def _checkpoint(self, step: int, version: int) -> None:
        actors = [wait(a.call.remote("data_state"), 60, "data cursor", [f"actor{i}"]) for i, a in enumerate(self.actors)]
        extra = {"actors": actors}  # rank 0 adds the buffer's consumed state it holds
        path = self._learners("save_checkpoint", step, extra, what=f"checkpoint step {step}")[0]
        log.info("checkpoint %s", path)

    def _start_dashboard(self) -> None:
        if not self.cfg.dashboard.enabled:
            return
        from launch.dashboard import start_dashboard

        server, url = start_dashboard(self.run_dir, self.cfg.dashboard.host, self.cfg.dashboard.port,
                                      fallback_to_free_port=True)
        self.dashboard = server
        _console(f"dashboard: {url}")

    def _shutdown(self) -> None:
        import ray

        for i, a in enumerate(self.actors):
            _quiet(lambda: ray.get(a.call.remote("stop"), timeout=60))
        for h in self.learners:
            _quiet(lambda: ray.get(h.call.remote("close"), timeout=30))
        if self.buffer is not None:
            _quiet(lambda: ray.get(self.buffer.call.remote("stop"), timeout=60))
        if self.writer is not None:
            self.writer.close()
        if self.dashboard is not None:
            self.dashboard.shutdown()
            self.dashboard.server_close()
        cluster.stop_ray()


def _scalars(m: dict) -> dict:
    return {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _progress_line(row: dict, total: int) -> str:
    def f(key, fmt):
        v = row.get(key)
        return fmt.format(v) if isinstance(v, (int, float)) else "-"
    return (f"step {row['step']}/{total}  v{row['version']}  reward {f('reward/mean', '{:.3f}')}  "
            f"gen {f('actor/tokens_per_s', '{:.0f}')} tok/s  train {f('learner/tokens_per_s', '{:.0f}')} tok/s  "
            f"stale {f('staleness/mean', '{:.2f}')}  sync {f('sync/seconds', '{:.2f}')} s  "
            f"wait data {f('learner/wait_for_data_s', '{:.1f}')} s")


def _console(msg: str) -> None:
    print(f"[archer-async] {msg}", flush=True)
    log.info(msg)


def _quiet(fn) -> None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - shutting down: report, keep stopping the rest
        log.warning("shutdown step failed: %s", e)


def _raise_keyboard_interrupt(*_):
    raise KeyboardInterrupt


if __name__ == "__main__":
    from archer_async.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
