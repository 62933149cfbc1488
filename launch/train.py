"""`archer-async train` and `archer-async resume`: one run, top to bottom.

    run lock         RUN_DIR/driver.lock held for the whole run: a second driver exits 2 naming this one
    preflight        model directory, data files, resources: clear errors before anything starts
    Ray              a local cluster (or launch.ray_address) that must fit the roles' declared resources
    run directory    config.resolved.yaml, logs/<role>.log, status.json
    roles            every role placed by its declared resources (CPUs, GPUs, node label)
    buffer           durable replay buffer (restored from the checkpoint's consumed state on resume)
    learner ranks    FSDP2 process group; rank 0 samples from the buffer and sends weights
    actors           vLLM engines generating continuously; weights arrive in flight
    loop             learner step -> weight sync (version v+1) -> metrics row -> eval / checkpoint
    end              final eval, checkpoint, HF export; Ctrl-C or a failure stops every role

Exit codes: 0 finished; 130 stopped by Ctrl-C / SIGTERM (status.json "stopped", the last checkpoint
valid, `archer-async resume` continues); 2 bad input; 1 a role failed. Bad input found by preflight
(model, data, config, a cluster that cannot host the declared resources, an unreachable ray_address)
leaves no run directory and no Ray process; a failure after the roles began starting keeps the run
directory (logs/<role>.log, status.json "failed" with the error) for diagnosis.

In `launch.mode: sync` the buffer's staleness bound is 0: actors generate exactly one batch per
version, so generation and training alternate (the baseline of the asynchronous mode). With
`launch.policy_lag: k` the bound is k and the driver holds each weight sync until the actors have
stored their batch, so the learner at version v trains on data of version v - k exactly
(launch/policy_lag.py).
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Collection, Optional

from archer_async.config import Config, UserError, to_yaml
from archer_async.metrics import MetricsWriter, write_run_status
from archer_async.fsio import atomic_write_text, disk_full
from archer_async.staleness import initial_staleness, is_auto, next_staleness
from launch.runlog import setup_role_logging

from archer_async.roles import ACTOR, BUFFER, LEARNER

from launch import cluster, nodes
from launch.runlock import RunLock
from launch.progress import ProgressWatch
from launch.roles import (
    RoleDied, RoleError, RoleHandle, await_placement, construct_all, dead_roles, place, wait,
)

log = logging.getLogger("launch")


def train_main(cfg: Config) -> int:
    """Start a new run in cfg.run_dir (which must not hold a run already)."""
    lock = RunLock.acquire(cfg.run_dir)  # a live driver of this run: RunLocked, nothing touched
    rd = Path(cfg.run_dir)
    if (rd / "checkpoints").exists() or (rd / "buffer").exists():
        lock.release(cleanup=True)
        raise UserError(f"run_dir {str(rd)!r} already holds a run: `archer-async resume {rd}` continues it")
    return Run(cfg, resume=False).execute(lock)


def resume_main(cfg: Config) -> int:
    """Continue the run in cfg.run_dir from checkpoints/latest and its persisted buffer."""
    return Run(cfg, resume=True).execute(RunLock.acquire(cfg.run_dir))


class Run:
    """One training run (new or resumed) driven from this process."""

    def __init__(self, cfg: Config, resume: bool):
        if cfg.launch.mode == "sync":
            # generate exactly one batch per weight version, then train on it: no overlap, no staleness
            cfg = cfg.model_copy(deep=True)
            # launch.policy_lag k: actors run k batches ahead, each batch on its own weight version
            cfg.buffer.max_staleness = cfg.launch.policy_lag or 0
        self.cfg = cfg
        self.resume = resume
        self.staleness_bound = initial_staleness(cfg.buffer)  # eta the buffer enforces (auto: moves)
        self.run_dir = Path(cfg.run_dir).resolve()
        self.hosts: dict[str, Any] = {}
        self.where: dict[str, dict] = {}   # role -> {"node_id", "ip", "run_dir"}: where it runs and writes
        self.buffer_kwargs: dict = {}      # the buffer's endpoints and secret, as learners and actors get them
        self.last_checkpoint: Optional[str] = None  # the newest committed checkpoint (on learner rank 0's node)
        self.here: tuple = ()              # (Ray node id, run directory) of the driver
        self.constructing = False          # roles began to be constructed (the shutdown stops them)
        self._actor_rows_next: dict[int, int] = {}  # actor -> its next metrics row to copy (actors elsewhere)
        self.learners: list = []
        self.actors: list = []
        self.buffer = None
        self.writer: Optional[MetricsWriter] = None
        self.dashboard = None
        self.eval_history: list[tuple[int, float]] = []
        self.actor_states: list = []      # per actor: data_state of the last checkpoint (re-placed actors restart there)
        self.actor_restarts = 0
        self._actor_prev: dict[int, tuple[float, float]] = {}  # actor -> (wait total, idle total) at the last row
        self._row_t = time.monotonic()
        self._drops_prev: Optional[dict] = None  # the buffer's drop counts by reason at the last row
        self.actor_errors: dict[int, str] = {}  # actors alive but stopped generating (their last stats' error)
        self._waiting_step, self._stalled = 0, ""  # the step waiting for data; why no actor generates
        self.generating = False
        self.role_died = False
        self.progress = ProgressWatch(cfg.launch.no_progress_timeout_s, cfg.data.max_prompt_length,
                                      min_events=cfg.learner.batch_groups)

    # ------------------------------------------------------------------------------------------
    def execute(self, lock: RunLock) -> int:
        """The run, holding `lock` (the run directory's driver lock) until it ends."""
        try:
            return self._execute(lock)
        finally:
            lock.release()

    def _execute(self, lock: RunLock) -> int:
        cfg = self.cfg
        try:
            pre = cluster.preflight(cfg, self.resume)      # UserError before anything starts
        except BaseException:
            lock.release(cleanup=True)
            raise
        if self.resume and not pre.on_nodes and self._finished(pre):
            return 0
        old_handler = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        # Joining / starting Ray and the resource check belong to preflight: a run that cannot fit the
        # cluster (or is interrupted here) leaves no run directory and no Ray process behind.
        try:
            cluster.start_ray(cfg, pre)
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except BaseException:
            cluster.stop_ray()
            signal.signal(signal.SIGTERM, old_handler)
            lock.release(cleanup=True)
            raise
        # ray.init installs its own SIGTERM handler (sys.exit): SIGTERM must stop the run as Ctrl-C does
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        if not self.resume:
            atomic_write_text(self.run_dir / "config.resolved.yaml", to_yaml(cfg))
        driver_log = setup_role_logging(self.run_dir, "driver", redirect_std=False)
        _console(f"run directory: {self.run_dir}  (driver log: {driver_log})")
        if lock.stale_note():
            _console(lock.stale_note())
        write_run_status(self.run_dir, "running", total_steps=cfg.learner.total_steps, pid=os.getpid(), error=None)
        status, rc, error = "failed", 1, None
        try:
            if self._start_roles(pre):
                self._loop(pre)
            status, rc = "finished", 0
        except KeyboardInterrupt:
            _console("interrupted: stopping every role (the last checkpoint stays valid)")
            status, rc = "stopped", 130
        except (RoleError, UserError, OSError) as e:
            full = disk_full(e)
            if isinstance(e, OSError) and not full:
                raise
            msg = f"{full} (writing the run's files)" if isinstance(e, OSError) else str(e)  # one line, no traceback
            _console(f"error: {msg}")
            if self.last_checkpoint is not None or (self.run_dir / "checkpoints" / "latest").is_file():
                _console(f"the last checkpoint is intact: `archer-async resume {self.run_dir}` carries on from it")
            self.role_died = isinstance(e, RoleDied)
            status, rc, error = "failed", (EXIT_USER_ERROR if isinstance(e, UserError) else 1), msg
            write_run_status(self.run_dir, status, error=error)  # now: stopping the roles can take a minute
        finally:
            # a second Ctrl-C / SIGTERM must not cut the shutdown short (that would leave orphans)
            signal.signal(signal.SIGTERM, _ignore_while_stopping)
            old_int = signal.signal(signal.SIGINT, _ignore_while_stopping)
            try:
                self._shutdown()
                write_run_status(self.run_dir, status, **({"error": error} if error else {}))
            finally:
                signal.signal(signal.SIGINT, old_int)
                signal.signal(signal.SIGTERM, old_handler)
        return rc

    # ------------------------------------------------------------------------------------------
    def _start_roles(self, pre: "cluster.Preflight") -> bool:
        """Place every role by its declared resources, then construct them (deadline: launch.startup_timeout_s).
        False: a resumed run that turned out complete (read on its nodes): nothing was constructed."""
        cfg, run_dir, env = self.cfg, str(self.run_dir), cluster.role_env()
        t0, deadline = time.time(), cfg.launch.startup_timeout_s
        _console(f"starting roles: buffer, {cfg.learner.num_ranks} learner rank(s), {cfg.actors.num_actors} actor(s)")
        self.hosts["buffer"] = place("buffer", run_dir, num_cpus=0.1, node_label=cfg.buffer.node_label, env=env)
        self.buffer = RoleHandle(self.hosts["buffer"], BUFFER)
        for r in range(cfg.learner.num_ranks):
            self.hosts[f"learner{r}"] = place(f"learner{r}", run_dir, num_cpus=cfg.learner.cpus_per_rank,
                                              num_gpus=cfg.learner.gpus_per_rank, node_label=cfg.learner.node_label,
                                              env=env)
        self.learners = [RoleHandle(self.hosts[f"learner{r}"], LEARNER) for r in range(cfg.learner.num_ranks)]
        for i in range(cfg.actors.num_actors):
            self.hosts[f"actor{i}"] = place(f"actor{i}", run_dir, num_cpus=cfg.actors.cpus_per_actor,
                                            num_gpus=cfg.actors.gpus_per_actor, node_label=cfg.actors.node_label,
                                            env=env)
        self.actors = [RoleHandle(self.hosts[f"actor{i}"], ACTOR) for i in range(cfg.actors.num_actors)]
        await_placement(self.hosts, deadline)
        self.where = dict(zip(self.hosts, wait([h.where.remote() for h in self.hosts.values()], 60, "placement",
                                               list(self.hosts))))
        if pre.on_nodes and not nodes.resume_state_on_nodes(self.hosts, self.where, cfg, pre, _console):
            return False
        # Rendezvous points live on learner rank 0's node: its process group and the weight-transfer store.
        # Both stores listen on this address only (sync.host; by default loopback on a local cluster).
        # Every port is picked on the node that binds it (rank 0's ports here, the buffer's by the buffer).
        rank0 = self.hosts["learner0"]
        node_ip = self.where["learner0"]["ip"]
        master_addr = cfg.sync.host or (node_ip if cfg.launch.ray_address else "127.0.0.1")
        pg_token = secrets.token_hex(16)  # the learner group's rendezvous keys live under it (secret_namespace)
        master_port, sync_port = wait([rank0.free_port.remote(), rank0.free_port.remote()], 60, "ports", ["learner0"])
        members = ["learner0"] + [f"actor{i}" for i in range(cfg.actors.num_actors)]  # the transfer group
        gpus = wait([self.hosts[m].gpu_ids.remote() for m in members], deadline, "placement", members)
        self.sync_init = cluster.make_sync(cfg, master_addr, cfg.sync.store_port or sync_port,
                                           dict(zip(members, gpus)))
        restore_buffer = (pre.restore.get("extra_state") or {}).get("buffer") if self.resume else None
        version0 = int(pre.restore.get("version", 0)) if self.resume else 0
        self.model_path, self.version0 = str(pre.model_path), version0
        self.constructing = True  # from here on, the shutdown stops roles
        bcfg = cfg.model_copy(deep=True)
        bcfg.buffer.host = nodes.buffer_bind_host(cfg.buffer.host, self.where)
        placed = construct_all(self.hosts, {"buffer": (BUFFER, (bcfg, run_dir, restore_buffer))}, deadline)
        # learners and actors get the buffer's address and secret from the buffer role, over Ray
        endpoints, secret = wait([self.buffer.endpoints(), self.buffer.secret()], 60, "endpoints", ["buffer"])
        self.buffer_kwargs = {"buffer_endpoints": endpoints, "buffer_secret": secret}
        log.info("buffer listens on %s (ingest) and %s (control)", endpoints["ingest"], endpoints["control"])
        specs: dict[str, tuple] = {}
        for r in range(cfg.learner.num_ranks):
            specs[f"learner{r}"] = (LEARNER, (cfg, r, cfg.learner.num_ranks, master_addr, master_port, run_dir,
                                              str(pre.model_path)), dict(self.buffer_kwargs, store_token=pg_token))
        for i in range(cfg.actors.num_actors):
            specs[f"actor{i}"] = self._actor_spec(i, version0)
        placed.update(construct_all(self.hosts, specs, max(1.0, deadline - (time.time() - t0))))
        for role, node in placed.items():
            log.info("%s on %s", role, node)
        self._write_pids()
        _console(f"roles up in {time.time() - t0:.0f} s on {len(set(placed.values()))} node(s)")
        self.here = nodes.driver_view(self.run_dir)
        for line in nodes.write_nodes_file(self.run_dir, self.where, self.here):
            _console(line)
        return True

    def _finished(self, pre: "cluster.Preflight") -> bool:
        """A resume of a run whose last checkpoint is its final step and whose final export exists: says
        so, and nothing starts (a run stopped between its last checkpoint and export does resume)."""
        step, total = int(pre.restore["step"]), self.cfg.learner.total_steps
        if step < total or not (self.run_dir / "hf" / f"step-{step}" / "config.json").is_file():
            return False
        _console(f"the run is complete: step {step} of learner.total_steps={total}, exported to "
                 f"{self.run_dir / 'hf' / f'step-{step}'}; `archer-async resume {self.cfg.run_dir} "
                 f"learner.total_steps=N` trains on to step N")
        return True

    # ------------------------------------------------------------------------------------------
    def _loop(self, pre: "cluster.Preflight") -> None:
        cfg = self.cfg
        start_step, version = 0, 0
        if self.resume:
            extra = self._learners(lambda h: h.load_checkpoint(str(pre.checkpoint)), what="checkpoint restore")[0] or {}
            start_step, version = int(pre.restore["step"]), int(pre.restore["version"])
            self.last_checkpoint = str(pre.checkpoint)
            self.actor_states = list(extra.get("actors", []))
            for i, (a, st) in enumerate(zip(self.actors, self.actor_states)):
                self._actor_call(i, lambda a: a.load_data_state(st), what="data cursor restore")
            _console(f"resumed at step {start_step}, weight version {version}")
        # actors get the learner's weights (restored ones on resume) before any rollout
        self._sync_weights(version)
        self._start_dashboard()
        self.writer = MetricsWriter(self.run_dir, cfg.wandb, resume_step=start_step if self.resume else None)
        if not self.resume and cfg.launch.eval_every:
            self._evaluate(0, {})
        for i in range(len(self.actors)):
            self._actor_call(i, lambda a: a.start(), what="start of generation")
        self.generating = True
        total = cfg.learner.total_steps
        _console(f"training steps {start_step + 1}..{total}")
        step = start_step
        for step in range(start_step + 1, total + 1):
            m = self._train_step(step, version)
            if cfg.launch.mode == "sync" and cfg.launch.policy_lag:
                self._hold_for_lag(version)  # the actors finish version `version`'s batch before new weights
            sync = self._sync_weights(int(m["version"]), serving=version)
            version = int(m["version"])
            if cfg.launch.mode == "sync":  # the next batch starts only now, on the new weights
                wait(self.buffer.set_version(version), 60, "set_version", ["buffer"])
            self._adapt_staleness(m)
            row = {**_scalars(m), "step": step, "version": version, "sync/seconds": sync["seconds"],
                   "staleness/bound": self.staleness_bound,
                   "sync/learner_s": sync["learner_s"], "sync/sender_s": sync["sender_s"],
                   "staleness/hist": m.get("staleness/hist", {})}
            row.update(self._actor_metrics())
            self._copy_actor_rows(range(len(self.actors)))
            row.update(self._buffer_metrics())
            if cfg.launch.eval_every and (step % cfg.launch.eval_every == 0 or step == total):
                self._evaluate(step, row)
            self.writer.log(row)
            _console(_progress_line(row, total))
            if step % cfg.learner.checkpoint_every == 0 or step == total:
                self._checkpoint(step, version)
            every = cfg.learner.export_hf_every
            if every and step % every == 0 and step != total:
                path = self._learners(lambda h: h.export_hf(step), what=f"HF export step {step}")[0]
                log.info("exported Hugging Face model: %s", path)
        path = self._learners(lambda h: h.export_hf(step), what="HF export")[0]  # the final one, always
        _console(f"exported Hugging Face model: {path}")
        if len(self.eval_history) >= 2:
            (s0, a0), (s1, a1) = self.eval_history[0], self.eval_history[-1]
            _console(f"held-out accuracy: {100 * a0:.1f}% at step {s0} -> {100 * a1:.1f}% at step {s1} "
                     f"({100 * (a1 - a0):+.1f} points)")

    # ------------------------------------------------------------------------------------------
    def _adapt_staleness(self, m: dict) -> None:
        """buffer.max_staleness auto (async mode): move the buffer's bound after this step's ESS and
        mismatch KL (archer_async/staleness.py); every step's bound is logged as staleness/bound."""
        if not is_auto(self.cfg.buffer) or self.cfg.launch.mode == "sync":
            return
        new = next_staleness(self.staleness_bound, float(m.get("is/ess", float("nan"))),
                             float(m.get("is/mismatch_kl", float("nan"))), self.cfg.buffer)
        if new != self.staleness_bound:
            wait(self.buffer.set_max_staleness(new), 60, "set_max_staleness", ["buffer"])
            log.info("staleness bound %d -> %d (is/ess %.4f, is/mismatch_kl %.5f)", self.staleness_bound, new,
                     float(m.get("is/ess", float("nan"))), float(m.get("is/mismatch_kl", float("nan"))))
            self.staleness_bound = new

    def _hold_for_lag(self, version: int) -> None:
        """launch.policy_lag: wait until the actors serving `version` have stored their whole batch
        (launch/policy_lag.py), checking every 15 s that generation can still make progress."""
        from launch.policy_lag import batch_complete

        k, b = int(self.cfg.launch.policy_lag or 0), self.cfg.learner.batch_groups
        next_check = time.monotonic() + 15.0
        while True:
            s = wait(self.buffer.metrics(), 60, "stats", ["buffer"])
            if batch_complete(int(s["buffer/accepted"]), int(s["buffer/in_flight"]), version, k, b):
                return
            if time.monotonic() >= next_check:
                self._check_generation()
                next_check = time.monotonic() + 15.0
            time.sleep(0.1)

    def _learners(self, call: Callable[[RoleHandle], Any], *, what: str, timeout: Optional[float] = None,
                  check: Optional[Callable[[], None]] = None) -> list:
        """`call(handle)` on every learner rank (one collective method) and wait; errors name the rank."""
        refs = [call(h) for h in self.learners]
        return self._wait_learners(refs, timeout or max(self.cfg.sync.timeout_s, 3600), what, check)

    def _wait_learners(self, refs: list, timeout: float, what: str, check: Optional[Callable[[], None]] = None) -> list:
        """Wait for one collective call of every rank; the buffer's and every rank's death stops it."""
        try:
            return wait(refs, timeout, what, [f"learner{r}" for r in range(len(self.learners))],
                        watch=self._core_roles(), check=check)
        except RoleError as e:
            # a surviving rank often reports first (its collective lost a peer): name the dead process
            dead = [] if isinstance(e, RoleDied) else dead_roles(self._core_roles())
            if dead:
                raise RoleDied(f"{', '.join(dead)}: the process died during {what} (then: {e})") from None
            raise

    def _train_step(self, step: int, version: int) -> dict:
        """Training step `step` on every learner rank; its metrics (rank 0's).

        Actors that die are re-placed at the next weight sync, which follows the step. When none is left
        generating, the step cannot get its data: the learner stops waiting (nothing sampled), the actors
        are re-placed at once and get the current weights (`version`) as a weight sync, and the step
        starts again. Up to MAX_REPLACEMENTS_PER_STEP times; then the run stops naming the cause."""
        for _ in range(MAX_REPLACEMENTS_PER_STEP + 1):
            self._waiting_step, self._stalled = step, ""
            m = self._learners(lambda h: h.step_from_buffer(), what=f"training step {step}",
                               check=self._check_generation)[0]
            self._waiting_step = 0
            if not m.get("waiting_stopped"):
                return m
            _console(f"step {step}: {self._stalled}; re-placing actors, then the step goes on")
            self._sync_weights(version)
        raise NoProgress(f"{self._stalled}, after re-placing actors {MAX_REPLACEMENTS_PER_STEP} times in step {step}")

    def _check_generation(self) -> None:
        """Stop a training step that can never get data: every actor is dead or has stopped generating.
        While a step waits (`_train_step`) its wait ends and the actors are re-placed; elsewhere (the
        policy-lag hold) the run stops with the reason."""
        dead = set(dead_roles(self._actor_hosts()))
        stats = self._actor_stats(30, skip={int(r[len("actor"):]) for r in dead})
        why = no_generation_reason(dead, {f"actor{i}": st for i, st in stats.items()})
        if why and self._waiting_step:
            if not self._stalled:
                self._stalled = why
                wait(self.learners[0].stop_waiting(self._waiting_step), 60, "stop_waiting", ["learner0"])
            return
        if why:
            raise NoProgress(why + "; the learner would wait for data forever")
        if self.progress.timeout_s > 0:  # actors generate, but does anything reach the learner?
            why = self.progress.observe(time.time(), wait(self.buffer.stats(), 60, "stats", ["buffer"]),
                                        [st for st in stats.values() if st is not None])
            if why:
                raise NoProgress(why + " (launch.no_progress_timeout_s)")

    def _actor_stats(self, timeout_s: float, skip: Collection[int] = ()) -> dict[int, Optional[dict]]:
        """Every actor's stats, asked of all at once: {index: stats, or None when it did not answer
        within timeout_s (slow) or its process is gone}. A live actor that can no longer generate (e.g.
        its vLLM engine died) is recorded in self.actor_errors: re-placed at the next weight sync."""
        refs = {i: a.stats() for i, a in enumerate(self.actors) if i not in skip}
        deadline = time.time() + timeout_s
        out: dict[int, Optional[dict]] = {}
        for i, ref in refs.items():
            try:
                out[i] = wait(ref, max(0.1, deadline - time.time()), "stats", [f"actor{i}"])
            except RoleError as e:
                log.warning("actor stats: %s", e)
                out[i] = None
                continue
            why = _stopped_reason(out[i])
            if why:
                self.actor_errors[i] = why
        return out

    def _core_roles(self) -> dict:
        """Roles whose death stops the run (the buffer and every learner rank; actors are re-placed)."""
        return {r: h for r, h in self.hosts.items() if not r.startswith("actor")}

    def _actor_hosts(self) -> dict:
        """{"actor<i>": its Ray host} of every actor (for the liveness check)."""
        return {f"actor{i}": self.hosts[f"actor{i}"] for i in range(len(self.actors))}

    def _actor_spec(self, i: int, version: int) -> tuple:
        """construct_all spec of actor i, loading weights labelled `version`."""
        return (ACTOR, (self.cfg, i, str(self.run_dir)),
                {"sync_init": self.sync_init.for_rank(i + 1).to_dict(), "model_path": self.model_path,
                 "initial_version": int(version), **self.buffer_kwargs})

    def _sync_weights(self, version: int, serving: Optional[int] = None) -> dict:
        """Learner ranks gather and send; actors receive and load in flight. One call per role.

        A dead actor is re-placed first (it joins the transfer group at this update). An actor that
        dies during the update makes it fail within sync.timeout_s (the others keep their previous
        weights); the update is then retried once with a re-placed actor. Any other failed update is
        retried once as well (e.g. a transient rendezvous failure); a second failure stops the run with
        an error naming the peer.
        """
        t0 = time.time()
        init = self.sync_init.for_rank(0).to_dict()
        for attempt in range(2):
            fresh = self._heal_actors(version if serving is None else serving)
            lrefs = [h.broadcast_weights(version, init) for h in self.learners]
            arefs = [a.update_weights(version) for a in self.actors]
            deadline = self.cfg.sync.timeout_s + 60
            res = self._wait_learners(lrefs, deadline, f"weight sync to version {version}")[0]
            t_learn = time.time() - t0
            failed, died = [], []
            for i, ref in enumerate(arefs):
                try:
                    r = wait(ref, deadline, f"weight sync to version {version}", [f"actor{i}"])
                    if not r.get("ok", True):
                        failed.append(f"actor{i}: {r.get('error')}")
                except RoleError as e:
                    (died if isinstance(e, RoleDied) else failed).append(str(e))
            if res.get("ok", True) and not failed and not died:
                for i in fresh:
                    if self.generating:
                        self._actor_call(i, lambda a: a.start(), what="start of generation")
                return {"seconds": time.time() - t0, "learner_s": t_learn, "sender_s": res.get("seconds", 0.0)}
            if attempt == 0:  # aborted: every actor still serves its previous version; try once more
                self._actor_stats(30)  # records actors whose engine died: re-placed for the retry
                why = "; ".join(died + failed) or res.get("error")
                _console(f"weight sync to version {version} aborted ({why}); "
                         + ("re-placing and retrying" if died else "retrying once"))
                continue
            why = "; ".join(failed + died) or res.get("error")
            raise WeightSyncFailed(f"weight sync to version {version} failed: {why}")
        raise AssertionError("unreachable")

    def _actor_call(self, i: int, call: Callable[[RoleHandle], Any], *, what: str) -> Any:
        """`call(handle)` on actor i and wait; if its process died, log it and return None (it is
        re-placed, with the last checkpoint's data cursor, at the next weight sync, and started after it)."""
        try:
            return wait(call(self.actors[i]), 60, what, [f"actor{i}"])
        except RoleDied as e:
            log.warning("%s (re-placed at the next weight sync)", e)
            return None

    def _heal_actors(self, version: int) -> list[int]:
        """Re-place and re-construct every dead actor with its index (sample ids stay unique through
        RUN_DIR/actors/actor<i>.json) and the data cursor of the last checkpoint; returns their
        indices. They serve weights only after the next update and start generating after it."""
        dead = dead_roles(self._actor_hosts())
        stopped = {f"actor{i}": err for i, err in self.actor_errors.items() if f"actor{i}" not in dead}
        self.actor_errors = {}
        cfg, specs = self.cfg, {}
        for role in dead + sorted(stopped):  # placed, then constructed all at once
            i = int(role[len("actor"):])
            self.actor_restarts += 1
            why = f"stopped generating ({stopped[role]})" if role in stopped else "died"
            _console(f"{role} {why}: re-placing it (restart {self.actor_restarts}); generation goes on meanwhile")
            _quiet(lambda: __import__("ray").kill(self.hosts[role]))
            host = place(role, str(self.run_dir), num_cpus=cfg.actors.cpus_per_actor,
                         num_gpus=cfg.actors.gpus_per_actor, node_label=cfg.actors.node_label, env=cluster.role_env())
            self.hosts[role] = host
            self.actors[i] = RoleHandle(host, ACTOR)
            specs[role] = self._actor_spec(i, version)
        if not specs:
            return []
        construct_all(self.hosts, specs, cfg.launch.startup_timeout_s)
        fresh = sorted(int(role[len("actor"):]) for role in specs)
        for i in fresh:
            role = f"actor{i}"
            self.where[role] = wait(self.hosts[role].where.remote(), 60, "placement", [role])
            self._actor_rows_next.pop(i, None)  # a new process counts its rows from 0
            if i < len(self.actor_states) and self.actor_states[i]:
                wait(self.actors[i].load_data_state(self.actor_states[i]), 60, "data cursor restore", [role])
        self._write_pids()
        return fresh

    def _write_pids(self) -> None:
        """RUN_DIR/pids.json: {role: process id} (operators and the chaos harness find roles here)."""
        import json

        refs = {r: h.pid.remote() for r, h in self.hosts.items()}
        pids = {}
        for r, ref in refs.items():
            try:
                pids[r] = wait(ref, 30, "pid", [r])
            except RoleError:
                pass
        atomic_write_text(self.run_dir / "pids.json", json.dumps({"driver": os.getpid(), **pids}))

    def _actor_metrics(self) -> dict:
        """Per step: summed tokens/s; the mean over actors of the seconds each waited for weights and of the
        fraction of the step each was idle (no prompt in flight), from the actors' running totals."""
        now = time.monotonic()
        span, self._row_t = max(1e-6, now - self._row_t), now
        live = {i: st for i, st in self._actor_stats(60).items() if st is not None}  # dead: re-placed at the next sync
        waits, idles = [], []
        for i, st in live.items():
            wait_total, idle_total = float(st.get("actor/wait_for_weights_s", 0.0)), float(st.get("idle_s", 0.0))
            pw, pi = self._actor_prev.get(i, (0.0, 0.0))
            if wait_total < pw or idle_total < pi:  # a re-placed actor counts from 0 again
                pw = pi = 0.0
            waits.append(wait_total - pw)
            idles.append(min(1.0, (idle_total - pi) / span))
            self._actor_prev[i] = (wait_total, idle_total)
        stats = list(live.values())
        return {"actor/tokens_per_s": sum(s.get("actor/tokens_per_s", 0.0) for s in stats),
                "actor/wait_for_weights_s": sum(waits) / len(waits) if waits else 0.0,
                "actor/idle_frac": sum(idles) / len(idles) if idles else 0.0,
                "actor/in_flight": sum(s.get("actor/in_flight", 0) for s in stats)}

    def _copy_actor_rows(self, live: Collection[int]) -> None:
        """The new metrics rows of actors that write on another node, into the driver's actor_metrics.jsonl."""
        if self.here:  # roles started by this driver
            nodes.copy_actor_rows(self.actors, live, self.where, self.here, self._actor_rows_next, self.run_dir)

    def _buffer_metrics(self) -> dict:
        s = wait(self.buffer.metrics(), 60, "stats", ["buffer"])
        out = {k: v for k, v in s.items() if isinstance(v, (int, float))}
        out.update(drop_counts(s.get("buffer/dropped_by_reason") or {}, self._drops_prev))
        self._drops_prev = dict(s.get("buffer/dropped_by_reason") or {})
        return out

    def _evaluate(self, step: int, row: dict) -> None:
        """Held-out avg@K / pass@K with the actors' engines (eval temperature), added to `row`."""
        from launch.evaluation import summarize

        cfg = self.cfg
        rows = cluster.eval_rows(cfg)
        shards = [rows[i::len(self.actors)] for i in range(len(self.actors))]
        refs = [a.evaluate_rewards(shard, cfg.launch.eval_k) for a, shard in zip(self.actors, shards) if shard]
        per_problem = [r for part in wait(refs, 3600, "held-out evaluation", ["actors"]) for r in part]
        s = summarize(per_problem, cfg.launch.eval_k)
        row.update({"eval/accuracy": s["avg_at_k"], "eval/pass_at_k": s["pass_at_k"]})
        self.eval_history.append((step, s["avg_at_k"]))
        _console(f"eval step {step}: avg@{s['k']} {100 * s['avg_at_k']:.1f}%  pass@{s['k']} "
                 f"{100 * s['pass_at_k']:.1f}%  ({s['problems']} problems)")
        if step == 0 and self.writer is not None:
            self.writer.log({"step": 0, "version": 0, **{k: row[k] for k in ("eval/accuracy", "eval/pass_at_k")}})

    def _checkpoint(self, step: int, version: int) -> None:
        actors = []
        for i, a in enumerate(self.actors):
            try:
                actors.append(wait(a.data_state(), 60, "data cursor", [f"actor{i}"]))
            except RoleError as e:  # died since the last sync: keep its previous cursor (regenerated)
                log.warning("checkpoint: %s", e)
                actors.append(self.actor_states[i] if i < len(self.actor_states) else None)
        extra = {"actors": actors}  # rank 0 adds the buffer's consumed state it holds
        path = self._learners(lambda h: h.save_checkpoint(step, extra), what=f"checkpoint step {step}")[0]
        self.actor_states = actors
        self.last_checkpoint = str(path)
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

        if ray.is_initialized() and self.constructing:
            # every role stops concurrently within one deadline; after a role died, a collective close
            # could only wait for the dead peer, so the learners are then simply ended
            short = 20.0 if self.role_died else 60.0
            _stop_all([a.stop() for a in self.actors], short)
            if not self.role_died:
                _stop_all([h.close() for h in self.learners], 30.0)
            if self.buffer is not None:
                _stop_all([self.buffer.stop()], short)
        if self.writer is not None:
            self.writer.close()
        if self.dashboard is not None:
            self.dashboard.shutdown()
            self.dashboard.server_close()
        cluster.stop_ray()


def _stop_all(refs: list, timeout_s: float) -> None:
    import ray

    if not refs:
        return
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    for ref in ready:
        _quiet(lambda: ray.get(ref))
    if pending:
        log.warning("shutdown: %d role(s) did not stop within %.0f s (ended with the cluster)", len(pending), timeout_s)


DROP_REASONS = {"filtered:solve_none": "groups/dropped_solve_none", "filtered:solve_all": "groups/dropped_solve_all",
                "stale": "groups/dropped_stale", "filtered:infra_error": "groups/dropped_infra_error"}
"""The buffer's drop reasons (buffer.table.DropInfo.reason) -> the per-step metric counting them."""


def drop_counts(totals: dict, previous: Optional[dict]) -> dict:
    """Per-step drop counts by reason from the buffer's running totals now and at the previous step
    (None: the first step of this driver, which counts everything so far). A total that went down (a
    restarted buffer re-counts from its log) counts from 0."""
    out = {}
    for reason, name in DROP_REASONS.items():
        now, before = int(totals.get(reason, 0)), int((previous or {}).get(reason, 0))
        out[name] = now - before if now >= before else now
    return out


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


def no_generation_reason(dead: set, stats: dict) -> str:
    """The error of a run in which no actor can generate, or "" while at least one can.

    `dead`: actor roles whose process is gone; `stats`: {role: its stats, or None if it did not answer
    in time (counted as generating: slow is not stopped)} for the live ones."""
    if any(st is None or not _stopped_reason(st) for st in stats.values()):
        return ""
    why = [f"{r}: the process died" for r in sorted(dead)] + [f"{r}: {_stopped_reason(st)}" for r, st in sorted(stats.items())]
    return "no actor is generating (" + "; ".join(why) + ")"


def _stopped_reason(stats: dict) -> str:
    """Why an actor (by its stats) can no longer generate, or "" if it can."""
    if stats.get("engine_dead"):
        return "its vLLM engine died" + (f": {str(stats['error'])[:200]}" if stats.get("error") else "")
    return str(stats["error"])[:200] if stats.get("error") else ""


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


def _ignore_while_stopping(*_):
    print("[archer-async] already stopping every role; please wait", flush=True)


MAX_REPLACEMENTS_PER_STEP = 3
"""How many times one training step re-places every actor (none was left generating) before the run stops."""


class NoProgress(RoleError):
    """The run cannot make progress (e.g. no actor can generate): stopped with the cause."""


class WeightSyncFailed(RoleError):
    """A weight update failed twice: the actors keep the previous weights, the run stops."""


EXIT_USER_ERROR = 2
"""Exit code of a run stopped by bad input found after start-up began (as the CLI's UserError)."""


if __name__ == "__main__":
    from launch.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
