"""The round driver: generate -> verify -> SFT -> [merge sweep ->] merge -> evaluate, resumable stage by stage.

The stages' bodies live in :mod:`imm_ray.stages`; the driver holds the round loop, the Ray pools
and tasks they run on, the resources they ask for and the logging, and dispatches each stage by
name (``_STAGE_WORK``). Every stage writes its outputs atomically into the round folder and is
then marked done in ``state.json``. A stage that started but was not marked done is cleared (with
the temporary siblings a killed writer left) and redone on resume; a finished stage is never redone.

The run directory is a local path or an object-storage URI (:mod:`imm_ray.storage`). Stages hand
each other locations, never bare local paths: a task on another node materializes a checkpoint
into its node cache and publishes what it made; only the driver deletes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from imm_ray.analysis.cli import analyze_run
from imm_ray.config import ConfigError, ImmConfig, config_from_run_yaml, config_to_yaml, resume_differences
from imm_ray.data import DatasetSpec, Problem, load_problems
from imm_ray.data.prompts import default_stop_strings, encode_prompt, render_prompt
from imm_ray.evaluate.probe import ProbeSplit, probe_split
from imm_ray.generate.actors import ActorPlacement, GeneratorPool, PoolSpec
from imm_ray.generate.engine import SamplingSpec
from imm_ray.loop.arms import arms_at_once
from imm_ray.loop.remote import merge_remote, publish_model_remote
from imm_ray.loop.summary import format_table, metrics_rows
from imm_ray.loop.verifier_pool import VerifierPool
from imm_ray.models import resolve_model
from imm_ray.placement import (
    AutoscalerRequests,
    NodeTypes,
    NodeWatch,
    ResourceRequest,
    check_on_cluster,
    cluster_view,
    declared_node_types,
    describe,
    fits_now,
    release_pools_for_sft,
    reserved,
)
from imm_ray.ray_env import connect_ray
from imm_ray.report import write_report
from imm_ray.run import RunDir, layout
from imm_ray.run.arms import RoundPlan, get_arm, plan_round
from imm_ray.run.infos import EvaluateInfo, GenerateInfo, MergeInfo, SFTInfo, StageInfo, SweepInfo, VerifyInfo
from imm_ray.serve.deploy import start_serving
from imm_ray.stages.evaluate import EvalSpec, evaluate, score
from imm_ray.stages.generate import Prompt, generate
from imm_ray.stages.merge import merge
from imm_ray.stages.ports import Merge, SFTOutcome
from imm_ray.stages.sft import sft
from imm_ray.stages.sweep import SweepSpec, sweep
from imm_ray.stages.verify import verify
from imm_ray.storage import (
    Location,
    checkpoint_checksum,
    clear_output,
    is_published,
    materialize,
    publish_dir,
    set_default_options,
    write_json,
)
from imm_ray.storage.fs import download_file, upload_file
from imm_ray.train import run_sft
from imm_ray.verify import needs_gold

logger = logging.getLogger(__name__)


def init_ray(cfg: ImmConfig) -> None:
    """Connect to the configured cluster, the one a Ray job runs in, or start a local head on loopback."""
    connect_ray(cfg.ray.address, num_cpus=cfg.ray.num_cpus, include_dashboard=cfg.ray.include_dashboard)


class RoundDriver:
    """Runs the configured arms for the configured number of rounds in one run directory."""

    def __init__(self, cfg: ImmConfig, run_dir: str | Path, force_unlock: bool = False) -> None:
        self.cfg = cfg
        self.options = cfg.storage
        set_default_options(self.options)
        self.rd = RunDir(run_dir, self.options, lease_ttl_s=cfg.storage.lease_ttl_s)
        self.force_unlock = force_unlock
        self._problems: dict[str, list[Problem]] = {}
        self._student_prompts: dict[str, list[Prompt]] = {}  # rendered once per run
        # Generator pools by (role, owner): the owner is the arm when arms run concurrently (each
        # with pools of its own), None for the pools shared by arms that run one after another.
        self._pools: dict[tuple[str, str | None], GeneratorPool] = {}
        self._verifiers: VerifierPool | None = None  # one per run, shared by every round and arm
        self._lock = threading.RLock()  # state.json and metrics.jsonl, shared by concurrent arms
        self.original: str | None = None  # model locations: a local path or a URI
        self.teacher: str | None = None
        self.anchor: str | None = None  # the merge's anchor (None: the original)
        self.tokenizer = None
        self.node_types = NodeTypes()  # what an autoscaler may add (ray.node_types / ray.cluster_yaml)
        self.ahead = AutoscalerRequests(enabled=False)  # the next stages' resources, asked for ahead
        self._nodes = NodeWatch()

    # --- set-up -----------------------------------------------------------------------------
    def _save_config(self) -> None:
        """Save run.yaml; refuse changed keys that a finished stage used (naming that stage)."""
        text = config_to_yaml(self.cfg)
        old_text = self.rd.read_config_text()
        if old_text is not None:
            diffs = resume_differences(config_from_run_yaml(old_text, str(self.rd.config_path)), self.cfg)
            done = self.rd.done_keys()
            pinned = [(d, stage) for d in diffs if (stage := layout.pinning_stage(d, done))]
            if pinned:
                raise ConfigError(
                    f"{self.rd.root} was started with a different config: "
                    + "; ".join(f"{key} differs and finished stage {stage} used it" for key, stage in pinned)
                    + ". Resume with the same config and overrides, or use a new --run-dir.")
            if diffs:
                logger.info("config changed before any stage that uses it finished: %s", ", ".join(diffs))
        self.rd.write_config(text)

    def _pin_inputs(self) -> None:
        """Record the original model's and the data sets' checksums; a resume must see the same ones."""
        inputs = {"model": checkpoint_checksum(self.original)}  # from the manifest: nothing downloaded
        if self.teacher is not None:
            inputs["teacher"] = checkpoint_checksum(self.teacher)
        for spec in [self.cfg.data.train, *self.cfg.data.eval]:
            rows = [[p.id, p.question, p.answer] for p in self.problems(spec)]
            inputs[f"data:{spec.name}"] = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
        self.rd.pin_inputs(inputs)

    def _publish_model(self, ref: str, name: str) -> str:
        """A model's location for every stage: its local folder for a local run directory, else a copy
        published once as ``RUN/name``. A folder on this node is uploaded from here; anything else
        (hub id, embedded model, URI) is copied by a Ray task, so the driver's node never downloads
        the weights."""
        if self.rd.root.is_local:
            return str(resolve_model(ref, self.cfg.model.cache_dir))
        dest = self.rd.root / name
        if is_published(dest):
            return dest.uri
        clear_output(dest)
        folder = Path(ref).expanduser()
        if "://" not in ref and folder.is_dir():
            logger.info("publishing %s to %s so that every node can load it", folder, dest)
            publish_dir(resolve_model(ref, self.cfg.model.cache_dir), dest)
            return dest.uri
        logger.info("copying %s to %s in a Ray task so that every node can load it", ref, dest)
        init_ray(self.cfg)
        return publish_model_remote(ref, dest.uri, self.cfg.model.cache_dir, self.options)

    def problems(self, spec: DatasetSpec) -> list[Problem]:
        """Load (once) the problems of a data set."""
        if spec.name not in self._problems:
            # A training set needs no answers for a verifier without gold (they only measure its labels).
            gold = spec != self.cfg.data.train or needs_gold(self.cfg.verify.verifier)
            res = load_problems(spec, data_dir=self.cfg.data.dir, require_answer=gold)
            if res.malformed:
                logger.warning("%s: skipped %d malformed rows of %s", spec.name, res.malformed, res.source)
            if not res.problems:
                raise ConfigError(f"data set {spec.name!r} ({res.source}) has no usable problems")
            logger.info("%s: %d problems from %s", spec.name, len(res.problems), res.source)
            self._problems[spec.name] = res.problems
        return self._problems[spec.name]

    def eval_sets(self, part: str = "held_back") -> list[tuple[str, list[Problem]]]:
        """The eval sets by name: whole without a merge sweep; with one, each set's ``probe`` part or
        its ``held_back`` rest (:func:`imm_ray.evaluate.probe.probe_split`)."""
        if not self.cfg.merge.sweep:
            return [(spec.name, self.problems(spec)) for spec in self.cfg.data.eval]
        return [(s.dataset, s.probe if part == "probe" else s.held_back) for s in self._probe_splits()]

    def _probe_splits(self) -> list[ProbeSplit]:
        """Each eval set cut into its probe part and its held-back rest (merge.probe_fraction, probe_seed)."""
        m = self.cfg.merge
        try:
            return [probe_split(spec.name, self.problems(spec), m.probe_fraction, m.probe_seed)
                    for spec in self.cfg.data.eval]
        except ValueError as exc:
            raise ConfigError(f"merge.sweep: {exc}") from None

    def _record_probe_split(self) -> None:
        """With a merge sweep: write each eval set's probe questions to RUN/probe_split.json."""
        m = self.cfg.merge
        if m.sweep:
            write_json(self.rd.root / layout.PROBE_SPLIT,
                       {"probe_fraction": m.probe_fraction, "probe_seed": m.probe_seed,
                        "sets": {s.dataset: s.record() for s in self._probe_splits()}})

    def pool(self, role: str = "student", owner: str | None = None) -> GeneratorPool:
        """The generator pool of ``role`` (``student`` or ``teacher``) of ``owner`` (an arm with pools
        of its own, or None: the shared pools), created on first use."""
        key = (role, owner)
        with self._lock:  # concurrent arms add their pools beside each other
            if key not in self._pools:
                self._pools[key] = self._new_pool()
        return self._pools[key]

    def _new_pool(self) -> GeneratorPool:
        """A generator pool from the config (its actors start on the first ``load``)."""
        g = self.cfg.generate
        options = g.engine.model_copy(update={"seed": g.seed})  # the engine settings, seeded per run
        spec = PoolSpec(
            engine=g.engine.name, options=options, num_actors=g.num_actors, num_cpus=g.resources.num_cpus,
            num_gpus=g.resources.num_gpus, resources=dict(g.resources.resources),
            placement_log_s=self.cfg.ray.placement_log_s, placement_timeout_s=self.cfg.ray.placement_timeout_s,
            node_types=self.node_types,
        )
        return GeneratorPool(spec, progress=self.cfg.run.progress)

    def verifier_pool(self) -> VerifierPool:
        """The run's verifier pool, created on first use (its actors start on its first call)."""
        v, r = self.cfg.verify, self.cfg.verify.resources
        with self._lock:
            if self._verifiers is None:
                options: dict[str, Any] = {}
                if v.verifier == "majority":
                    options["min_agreement"] = v.min_agreement
                elif v.verifier == "judge":
                    j = v.judge
                    model = self._publish_model(j.model, layout.JUDGE) if j.model else self.original
                    engine = j.engine or self.cfg.generate.engine.model_copy(update={"seed": self.cfg.generate.seed})
                    options = {"model_path": model, "engine": engine, "prompt": j.prompt,
                               "max_tokens": j.max_tokens, "samples": j.samples, "temperature": j.temperature,
                               "threshold": j.threshold}
                placement = ActorPlacement(
                    num_actors=v.num_actors, num_cpus=r.num_cpus, num_gpus=r.num_gpus, resources=dict(r.resources),
                    placement_log_s=self.cfg.ray.placement_log_s, placement_timeout_s=self.cfg.ray.placement_timeout_s,
                    node_types=self.node_types, config_key="verify.resources")
                self._verifiers = VerifierPool(placement, v.verifier, options, progress=self.cfg.run.progress)
        return self._verifiers

    def prompts(self, problems: list[Problem], tokenizer: Any = None) -> list[Prompt]:
        """Render and tokenise the prompt of each problem (with the student's tokenizer by default)."""
        d = self.cfg.data
        tokenizer = tokenizer or self.tokenizer
        kwargs: dict[str, Any] = {"system_prompt": d.system_prompt}
        if d.instruction_suffix is not None:
            kwargs["instruction_suffix"] = d.instruction_suffix
        out = []
        for p in problems:
            text = render_prompt(p.question, d.prompt_template, tokenizer, **kwargs)
            out.append(Prompt(text, encode_prompt(tokenizer, text)))
        return out

    def student_prompts(self, key: str, problems: list[Problem]) -> list[Prompt]:
        """The student's prompts for the train pool or the eval sets, rendered once per run."""
        if key not in self._student_prompts:
            self._student_prompts[key] = self.prompts(problems)
        return self._student_prompts[key]

    def stop_strings(self) -> tuple[str, ...]:
        stop = self.cfg.generate.stop
        return tuple(stop if stop is not None else default_stop_strings(self.cfg.data.prompt_template))

    # --- stage bookkeeping ------------------------------------------------------------------
    @contextmanager
    def stage(self, key: str, outputs: list[Location]) -> Iterator[dict[str, Any]]:
        """Run a stage: clear half-written outputs (and temp siblings), time it, mark it done with its info."""
        for loc in outputs:
            clear_output(loc)
        with self._lock:
            self.rd.mark_started(key)
            nodes = self._nodes.changes()
        logger.info("[%s] started%s", key, f" (cluster nodes since the last stage: {nodes})" if nodes else "")
        info: dict[str, Any] = {}
        t0 = time.perf_counter()
        yield info
        seconds = time.perf_counter() - t0
        with self._lock:
            self.rd.mark_done(key, seconds, info)
        logger.info("[%s] done in %.1f s: %s", key, seconds, _brief(info))

    # --- the loop ---------------------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        """Run (or resume) every arm and round; return the metrics rows."""
        self._take_lock()
        log_file, log_handler = self._open_log()
        finished = False
        try:
            self._save_config()
            logger.info("run directory %s\nresolved config:\n%s", self.rd.root, config_to_yaml(self.cfg))
            done = self.rd.done_keys()
            if done:
                logger.info("resuming: %d stages already done and kept (last: %s)", len(done), done[-1])
            self._publish_inputs()
            self._connect()
            if self.cfg.serve.enabled:
                # The app follows state.json: every finished round becomes servable by itself.
                start_serving(self.cfg.serve.run_dir or str(self.rd.root), self.cfg.serve)
            if self.cfg.evaluate.baseline:
                self._baseline()
            self._run_arms()
            rows = self._write_metrics()
            self._finish_outputs()
            finished = True
            logger.info("IMM run finished: %s\n%s\nserve its rounds over HTTP (OpenAI-compatible):\n"
                        "  imm serve --run-dir %s", self.rd.root, format_table(rows), self.rd.root)
            return rows
        finally:
            for pool in [*self._pools.values(), *([self._verifiers] if self._verifiers else [])]:
                pool.shutdown(graceful=finished)
            self.ahead.release()
            self._close_log(log_file, log_handler)
            self.rd.unlock()

    def _take_lock(self) -> None:
        """Hold the run directory (breaking a stale lease first with --force-unlock)."""
        self.rd.check_is_run()
        if self.force_unlock:
            broken = self.rd.force_unlock()
            if broken:
                logger.warning("--force-unlock: broke the lease of %s; if that driver still runs, it stops at its "
                               "next stage boundary", broken)
            else:
                logger.warning("--force-unlock: no lease was held (a local run directory's lock ends with its driver)")
        self.rd.lock()

    def _publish_inputs(self) -> None:
        """The models every stage loads (published where every node reaches them), the pinned input
        checksums and the probe split."""
        self.original = self._publish_model(self.cfg.model.ref, layout.ORIGINAL)
        self.tokenizer = AutoTokenizer.from_pretrained(materialize(self.original, weights=False))
        if self.cfg.model.teacher:
            self.teacher = self._publish_model(self.cfg.model.teacher, layout.TEACHER)
        if self.cfg.merge.anchor != "original":
            self.anchor = self._publish_model(self.cfg.merge.anchor, layout.ANCHOR)
        self._pin_inputs()
        self._record_probe_split()

    def _connect(self) -> None:
        """Connect to Ray and check that the cluster can ever hold each stage's resources."""
        self.node_types = declared_node_types(self.cfg.ray.node_types, self.cfg.ray.cluster_yaml)
        init_ray(self.cfg)
        self.ahead = AutoscalerRequests(enabled=bool(self.node_types.types))
        view = cluster_view(self.node_types)
        logger.info("cluster: %d alive node(s); node types: %s", len(view.nodes), describe(view))
        self._nodes.changes()
        for request in self._requests().values():  # a request the cluster can never hold fails now
            check_on_cluster(request, self.node_types)

    def _open_log(self) -> tuple[Path | None, logging.Handler]:
        """The driver's log handler: RUN/driver.log, or a local copy uploaded there at the end."""
        if self.rd.root.is_local:
            return None, _file_log_handler(self.rd.log_path.local_path())
        local = Path(tempfile.mkdtemp(prefix="imm-driver-log-")) / layout.DRIVER_LOG
        try:
            download_file(self.rd.log_path, local)  # append across resumes
        except FileNotFoundError:
            pass
        return local, _file_log_handler(local)

    def _close_log(self, log_file: Path | None, handler: logging.Handler) -> None:
        """Detach the driver's log handler; with object storage, upload the local copy to RUN/driver.log."""
        logging.getLogger().removeHandler(handler)
        handler.close()
        if log_file is None:
            return
        try:
            upload_file(log_file, self.rd.log_path)
            shutil.rmtree(log_file.parent, ignore_errors=True)
        except OSError as exc:
            logger.warning("could not upload the driver log to %s (%s); it stays in %s",
                           self.rd.log_path, exc, log_file)

    def _finish_outputs(self) -> None:
        """Layer analysis (when asked for) and the report with its plots."""
        run = self.cfg.run
        if run.analyze:
            logger.info("layer analysis: %s", analyze_run(self.rd.root, probe_size=run.analyze_probe_size))
        if run.report:
            logger.info("report: %s", write_report(self.rd.root, sinks=tuple(run.metric_sinks)))

    def _write_metrics(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = metrics_rows(self.rd.view(), self.cfg.run.arms, self.cfg.run.rounds)
            self.rd.write_metrics(rows)
        return rows

    def _run_arms(self) -> None:
        """Every round of every arm: one arm after another, or several at once when the cluster
        holds them (``run.concurrent_arms``), each with its own generator pool."""
        arms = self.cfg.run.arms
        req = self._requests()
        stages = {"generator pool": req["generate"].bundles(), "SFT": req["sft"].bundles()}
        if any(get_arm(arm).merges for arm in arms):
            stages["merge"] = req["merge"].bundles()
        width, why = arms_at_once(len(arms), self.cfg.run.concurrent_arms, stages, cluster_view(self.node_types))
        logger.info("arms %s: %s", ", ".join(arms), why)
        if width == 1:
            for arm in arms:
                self._run_arm(arm, owner=None)
            return
        for key in [k for k in self._pools if k[1] is None]:  # the baseline's pool: arms bring their own
            self._pools.pop(key).shutdown()
        with ThreadPoolExecutor(width, thread_name_prefix="arm") as workers:
            for done in [workers.submit(self._run_arm, arm, owner=arm) for arm in arms]:
                done.result()  # the first failure, once every arm has stopped (the others run to their end)

    def _run_arm(self, arm: str, owner: str | None) -> None:
        """The rounds of one arm, on the generator pools of ``owner`` (the arm itself when arms run
        concurrently, None for the shared pools); an arm's own pools shut down when it ends."""
        try:
            current = self.original
            for t in range(1, self.cfg.run.rounds + 1):
                current = self._round(arm, t, current, owner)
                logger.info("after %s round %d:\n%s", arm, t, format_table(self._write_metrics()))
        finally:
            self.ahead.want(arm, [])
            if owner is not None:
                with self._lock:
                    own = [self._pools.pop(k) for k in list(self._pools) if k[1] == owner]
                for pool in own:
                    pool.shutdown()

    def _baseline(self) -> None:
        """The original model's evaluation, once per run (RUN/baseline)."""
        key = layout.stage_key(layout.BASELINE_ARM, layout.BASELINE_ROUND, "evaluate")
        if self.rd.is_done(key):
            logger.info("[%s] already done, skipping", key)
            return
        folder = self.rd.baseline_dir
        with self.stage(key, [folder / layout.EVAL, folder / layout.EVAL_SAMPLES]) as info:
            info.update(self._evaluate_model(self.original, folder, None, key).to_json())

    def _round(self, arm_name: str, t: int, current: str, owner: str | None) -> str:
        """Run the unfinished stages of round ``t`` of an arm (its plan: :func:`plan_round`); return its model."""
        arm = get_arm(arm_name)
        rdir = self.rd.round_dir(arm.name, t)
        while True:
            with self._lock:
                done = {k: (self.rd.stage(k) or {}).get("info", {}) for k in self.rd.done_keys()}
            plan = plan_round(arm, t, done, current=current, original=self.original,
                              round_output=lambda name: (rdir / name).uri, sweep=bool(self.cfg.merge.sweep))
            stage = plan.next
            if stage is None:
                return plan.model
            self._want_ahead(arm.name, plan, owner)
            key = layout.stage_key(arm.name, t, stage.name)
            work = _STAGE_WORK.get(stage.name)
            if work is None:
                raise ValueError(f"no work is defined for round stage {stage.name!r}")
            with self.stage(key, [rdir / name for name in stage.outputs]) as info:
                info.update(work(self, RoundStep(key, t, plan, rdir, current, owner)).to_json())

    # --- resources --------------------------------------------------------------------------
    def _requests(self) -> dict[str, ResourceRequest]:
        """What the generator and verifier pools, the SFT workers and the merge task ask of Ray, from the config."""
        g, t, m, v = self.cfg.generate, self.cfg.train, self.cfg.merge.resources, self.cfg.verify
        return {
            "verify": ResourceRequest("verifier actor", "verify.resources", {
                "CPU": v.resources.num_cpus, "GPU": v.resources.num_gpus, **v.resources.resources}, v.num_actors),
            "generate": ResourceRequest("generator actor", "generate.resources", {
                "CPU": g.resources.num_cpus, "GPU": g.resources.num_gpus, **g.resources.resources}, g.num_actors),
            "sft": ResourceRequest("SFT worker", "train", t.worker_resources(), t.num_workers,
                                   key_fields={"CPU": "cpus_per_worker", "GPU": "use_gpu"}),
            "merge": ResourceRequest("merge task", "merge.resources",
                                     {"CPU": m.num_cpus, "GPU": m.num_gpus, **m.resources}),
        }

    def _want_ahead(self, arm: str, plan: RoundPlan, owner: str | None) -> None:
        """Ask the autoscaler for room for this stage, the next one (verification aside: it is short) and
        the arm's live generator pool, so that the next stage's nodes boot while this one runs (only when
        node types are declared). The pool counts once: generation and evaluation share it."""
        if not self.ahead.enabled:
            return
        req = self._requests()
        names = [s.name for s in plan.remaining if s.name != "verify"][:2]
        with self._lock:
            live = any(p.actors for (_, o), p in self._pools.items() if o == owner)
        bundles = req["generate"].bundles() if live or {"generate", "evaluate"} & set(names) else []
        for name in ("sft", "merge"):
            bundles += req[name].bundles() if name in names else []
        self.ahead.want(arm, bundles)

    def _make_room(self, request: ResourceRequest, owner: str | None, release: bool | None = None) -> None:
        """Fail at once if ``request`` can never be placed; release the generator pools (then the verifier
        actors) if they block it, or by ``release`` when given (True: always, False: never).

        A single-GPU node cannot hold the generator pool and the SFT worker at once: the pools shut
        down here and start again on their next generation or evaluation; they stay when the request
        fits beside them, now or on a node the autoscaler may still add. Only ``owner``'s pools are
        released (a concurrent arm leaves the other arms' pools alone).
        """
        check_on_cluster(request, self.node_types)
        with self._lock:
            busy = [key for key, pool in self._pools.items() if pool.actors and key[1] == owner]
        if busy and (release if release is not None else not fits_now(request, self.node_types)):
            why = "generate.release_during_sft" if release else "it cannot be placed beside them"
            logger.info("the %s (%s, %s): releasing the pool of %s generators before the stage (%s); it starts "
                        "again for the next generation or evaluation",
                        request.what, ", ".join(f"{k}: {v:g}" for k, v in request.needs().items()),
                        request.config_key, " and ".join(role for role, _ in busy), why)
            for key in busy:
                self._pools[key].shutdown()
        verifiers = self._verifiers
        if verifiers is not None and verifiers.actors and not fits_now(request, self.node_types):
            logger.info("the %s cannot be placed beside the verifier actors: releasing them; they start again "
                        "for the next verification", request.what)
            verifiers.shutdown()

    def _reserved(self, request: ResourceRequest) -> AbstractContextManager[Any]:
        """A placement group for ``request``, waited for within ray.placement_timeout_s (logged)."""
        ray_cfg = self.cfg.ray
        return reserved(request, ray_cfg.placement_log_s, ray_cfg.placement_timeout_s, self.node_types)

    def _load(self, role: str, model: str, owner: str | None) -> GeneratorPool:
        """``owner``'s pool of ``role`` serving ``model`` (each actor materializes it on its own node)."""
        pool = self.pool(role, owner)
        pool.load(model)
        return pool

    # --- the stages: their bodies (imm_ray.stages) wired to the Ray pools and tasks ------------
    def _generate(self, step: RoundStep) -> GenerateInfo:
        """The student (or the teacher, when configured) completes every training question k times."""
        g = self.cfg.generate
        role, model = ("teacher", self.teacher) if self.teacher is not None else ("student", step.current)
        problems = self.problems(self.cfg.data.train)
        prompts = self.student_prompts("train", problems)  # the student's prompts: what SFT trains on
        gen_ids = None if role == "student" else [
            p.ids for p in self.prompts(problems, AutoTokenizer.from_pretrained(materialize(model, weights=False)))]
        sampling = SamplingSpec(
            n=g.samples_per_question, temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_tokens,
            stop=self.stop_strings(), seed=g.seed + step.t, entropy_top_k=g.entropy_top_k,
            entropy_stride=g.entropy_stride,
        )
        return generate(self._load(role, model, step.owner), problems, prompts, sampling, step.rdir / layout.SAMPLES,
                        model, role, gen_ids, desc=f"generate round {step.t}")

    def _verify(self, step: RoundStep) -> VerifyInfo:
        v, rdir = self.cfg.verify, step.rdir
        pool = self.verifier_pool()
        if not pool.actors:  # a judge on a GPU may need the room the generator pool holds
            self._make_room(self._requests()["verify"], step.owner)
        return verify(pool, rdir / layout.SAMPLES, rdir / layout.ACCEPTED, rdir / layout.VERDICTS, v.verifier,
                      self.cfg.generate.samples_per_question, v.batch_size, dedup=v.dedup)

    def _sft(self, step: RoundStep) -> SFTInfo:
        def make_room() -> None:
            request = self._requests()["sft"]
            self._make_room(request, step.owner, release_pools_for_sft(self.cfg.generate.release_during_sft,
                                                                       autoscales=bool(self.node_types.types)))
            with self._reserved(request):
                pass  # room for the workers found (a bounded, logged wait); Ray Train places them there now

        def train(model: str, accepted: Location, out: Location) -> SFTOutcome:
            return run_sft(model, accepted, out, self.cfg.train, start_timeout_s=self.cfg.ray.placement_timeout_s)

        return sft(train, step.plan.sft_init, step.rdir / layout.ACCEPTED, step.rdir / layout.SFT, make_room)

    def _merge(self, step: RoundStep) -> MergeInfo:
        m = self.cfg.merge
        return merge(self._merge_task(step.owner), m.method, self.anchor or self.original,
                     (step.rdir / layout.SFT).uri, step.rdir / layout.MERGED, step.plan.merge_params or dict(m.params),
                     m.seed)

    def _merge_task(self, owner: str | None) -> Merge:
        """A merge as a Ray task in a placement group of merge.resources (room made on ``owner``'s side)."""
        m = self.cfg.merge
        r = m.resources
        resources = {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus, "resources": dict(r.resources)}

        def run(anchor: str, sft: str, out: Location, params: Mapping[str, Any]) -> str:
            request = self._requests()["merge"]
            self._make_room(request, owner)
            with self._reserved(request) as group:  # the task runs in it: its wait for a node is bounded and logged
                return merge_remote(m.method, anchor, [sft], out.uri, dict(params), m.seed, self.options, resources,
                                    placement_group=group)

        return run

    def _sweep(self, step: RoundStep) -> SweepInfo:
        m = self.cfg.merge
        spec = SweepSpec(method=m.method, params=m.params, grid=m.sweep, select=m.select, seed=m.seed,
                         probe_fraction=m.probe_fraction, probe_seed=m.probe_seed,
                         max_tokens=self.cfg.evaluate.max_tokens)

        def probe(model: str, desc: str) -> dict[str, dict[str, Any]]:
            sets, prompts = self._eval_inputs("probe")
            return score(self._load("student", model, step.owner), sets, prompts, self._eval_spec(1), desc).results

        probe_n = {name: len(probs) for name, probs in self.eval_sets("probe")}
        return sweep(spec, step.current, (step.rdir / layout.SFT).uri, self.anchor or self.original,
                     step.rdir / layout.SWEEP, self._merge_task(step.owner), probe, probe_n)

    def _evaluate(self, step: RoundStep) -> EvaluateInfo:
        return self._evaluate_model(step.plan.model, step.rdir, step.owner, step.key)

    def _evaluate_model(self, model: str, folder: Location, owner: str | None, key: str) -> EvaluateInfo:
        """Greedy accuracy on every eval set (with a merge sweep: on its held-back part only) and, with
        evaluate.samples k > 1, k samples per question (pass@k); eval_samples.jsonl keeps every
        completion with its verdict (the per-question ledger)."""
        sets, prompts = self._eval_inputs("held_back")
        questions = "held_back" if self.cfg.merge.sweep else "all"  # held_back: the probe questions left out
        return evaluate(self._load("student", model, owner), sets, prompts, self._eval_spec(self.cfg.evaluate.samples),
                        model, folder, questions, desc=f"evaluate {key.split('/evaluate')[0]}")

    def _eval_inputs(self, part: str) -> tuple[list[tuple[str, list[Problem]]], list[list[int]]]:
        """The ``part`` of the eval sets (:meth:`eval_sets`) and the student's prompt ids for them."""
        sets = self.eval_sets(part)
        prompts = self.student_prompts(f"eval:{part}", [p for _, probs in sets for p in probs])
        return sets, [p.ids for p in prompts]

    def _eval_spec(self, samples: int) -> EvalSpec:
        """How a model is scored: greedily, and with ``samples`` > 1 that many at evaluate.temperature."""
        e = self.cfg.evaluate
        return EvalSpec(max_tokens=e.max_tokens, stop=self.stop_strings(), verifier=e.verifier, samples=samples,
                        temperature=e.temperature, seed=self.cfg.generate.seed)


@dataclass(frozen=True)
class RoundStep:
    """What a round stage works on: its key, round, plan and folder, the round's start model and the
    owner of the generator pools it uses."""

    key: str
    t: int
    plan: RoundPlan
    rdir: Location
    current: str
    owner: str | None


# The work of each round stage, by name: each returns the info recorded in state.json.
_STAGE_WORK: dict[str, Callable[[RoundDriver, RoundStep], StageInfo]] = {
    "generate": RoundDriver._generate,
    "verify": RoundDriver._verify,
    "sft": RoundDriver._sft,
    "sweep": RoundDriver._sweep,
    "merge": RoundDriver._merge,
    "evaluate": RoundDriver._evaluate,
}


def _brief(info: dict[str, Any]) -> str:
    keys = ("generated", "correct", "accepted", "questions_solved", "steps", "final_loss", "skipped")
    parts = [f"{k}={info[k]}" for k in keys if k in info]
    if "datasets" in info:
        parts += [f"{n}={100 * d['accuracy']:.1f}%" for n, d in info["datasets"].items()]
    return ", ".join(parts)


def _file_log_handler(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler
