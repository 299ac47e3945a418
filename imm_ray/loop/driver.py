"""The round driver: generate -> verify -> SFT -> [merge sweep ->] merge -> evaluate, resumable stage by stage.

Every stage writes its outputs atomically into the round folder and is then marked done in
``state.json``. A stage that started but was not marked done is cleared (with the temporary
siblings a killed writer left) and redone on resume; a finished stage is never redone.

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
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Iterator

from transformers import AutoTokenizer

from imm_ray.analysis.cli import analyze_run
from imm_ray.config import ConfigError, ImmConfig, config_from_run_yaml, config_to_yaml, resume_differences
from imm_ray.data import DatasetSpec, Problem, load_problems
from imm_ray.data.prompts import default_stop_strings, encode_prompt, render_prompt
from imm_ray.evaluate import (
    diversity_metrics,
    evaluate_completions,
    group_by_question,
    mean_pass_at_k,
    pick_verifier,
    sample_rows,
)
from imm_ray.evaluate.probe import ProbeSplit, probe_split
from imm_ray.generate.actors import ActorPlacement, GenerationStats, GeneratorPool, PoolSpec
from imm_ray.generate.engine import SamplingSpec
from imm_ray.loop.arms import arms_at_once
from imm_ray.loop.remote import merge_remote, publish_model_remote
from imm_ray.loop.summary import format_table, metrics_rows
from imm_ray.loop.verifier_pool import VerifierPool
from imm_ray.merge.sweep import SELECT_RULES, ProbeScore, choose_candidate, sweep_candidates
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
from imm_ray.run.records import SampleRow
from imm_ray.serve.cli import serve_command
from imm_ray.serve.deploy import start_serving
from imm_ray.storage import (
    Location,
    checkpoint_checksum,
    clear_output,
    is_published,
    materialize,
    publish_dir,
    read_json,
    read_jsonl,
    set_default_options,
    write_json,
    write_jsonl,
)
from imm_ray.storage.fs import download_file, upload_file
from imm_ray.train import run_sft
from imm_ray.verify import label_precision, needs_gold, select_accepted

logger = logging.getLogger(__name__)

# What each round's eval.json keeps per data set (evaluate_completions computes more).
_EVAL_KEYS = ("accuracy", "accuracy_ci95", "n", "correct", "unparseable", "timeouts")
_SAMPLED_KEYS = ("k", "pass@1", "pass@k", "maj@k", "diversity")  # with evaluate.samples > 1


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
        self._student_prompts: dict[str, list[dict[str, Any]]] = {}  # rendered once per run
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

    def prompts(self, problems: list[Problem], tokenizer: Any = None) -> list[dict[str, Any]]:
        """Render and tokenise the prompt of each problem (with the student's tokenizer by default)."""
        d = self.cfg.data
        tokenizer = tokenizer or self.tokenizer
        kwargs: dict[str, Any] = {"system_prompt": d.system_prompt}
        if d.instruction_suffix is not None:
            kwargs["instruction_suffix"] = d.instruction_suffix
        out = []
        for p in problems:
            text = render_prompt(p.question, d.prompt_template, tokenizer, **kwargs)
            out.append({"text": text, "ids": encode_prompt(tokenizer, text)})
        return out

    def student_prompts(self, key: str, problems: list[Problem]) -> list[dict[str, Any]]:
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
        self.rd.check_is_run()
        if self.force_unlock:
            broken = self.rd.force_unlock()
            if broken:
                logger.warning("--force-unlock: broke the lease of %s; if that driver still runs, it stops at its "
                               "next stage boundary", broken)
            else:
                logger.warning("--force-unlock: no lease was held (a local run directory's lock ends with its driver)")
        self.rd.lock()
        log_file, log_handler = self._open_log()
        finished = False
        try:
            self._save_config()
            logger.info("run directory %s\nresolved config:\n%s", self.rd.root, config_to_yaml(self.cfg))
            done = self.rd.done_keys()
            if done:
                logger.info("resuming: %d stages already done and kept (last: %s)", len(done), done[-1])
            self.original = self._publish_model(self.cfg.model.ref, layout.ORIGINAL)
            self.tokenizer = AutoTokenizer.from_pretrained(materialize(self.original, weights=False))
            if self.cfg.model.teacher:
                self.teacher = self._publish_model(self.cfg.model.teacher, layout.TEACHER)
            if self.cfg.merge.anchor != "original":
                self.anchor = self._publish_model(self.cfg.merge.anchor, layout.ANCHOR)
            self._pin_inputs()
            self._record_probe_split()
            self.node_types = declared_node_types(self.cfg.ray.node_types, self.cfg.ray.cluster_yaml)
            init_ray(self.cfg)
            self.ahead = AutoscalerRequests(enabled=bool(self.node_types.types))
            view = cluster_view(self.node_types)
            logger.info("cluster: %d alive node(s); node types: %s", len(view.nodes), describe(view))
            self._nodes.changes()
            for request in self._requests().values():  # a request the cluster can never hold fails now
                check_on_cluster(request, self.node_types)
            if self.cfg.serve.enabled:
                # The app follows state.json: every finished round becomes servable by itself.
                start_serving(self.cfg.serve.run_dir or str(self.rd.root), self.cfg.serve)
            if self.cfg.evaluate.baseline:
                self._baseline()
            self._run_arms()
            rows = self._write_metrics()
            self._finish_outputs()
            finished = True
            logger.info("IMM run finished: %s\n%s\nserve its rounds over HTTP (OpenAI-compatible):\n  %s",
                        self.rd.root, format_table(rows), serve_command(str(self.rd.root)))
            return rows
        finally:
            for pool in [*self._pools.values(), *([self._verifiers] if self._verifiers else [])]:
                pool.shutdown(graceful=finished)
            self.ahead.release()
            logging.getLogger().removeHandler(log_handler)
            log_handler.close()
            if log_file is not None:  # object storage: the log is kept locally and uploaded
                try:
                    upload_file(log_file, self.rd.log_path)
                    shutil.rmtree(log_file.parent, ignore_errors=True)
                except OSError as exc:
                    logger.warning("could not upload the driver log to %s (%s); it stays in %s",
                                   self.rd.log_path, exc, log_file)
            self.rd.unlock()

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

    def _finish_outputs(self) -> None:
        """Layer analysis (when asked for) and the report with its plots."""
        run = self.cfg.run
        if run.analyze:
            logger.info("layer analysis: %s", analyze_run(self.rd.root, "--probe-size", str(run.analyze_probe_size)))
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
        key = layout.stage_key(layout.BASELINE_ARM, layout.BASELINE_ROUND, "evaluate")
        if self.rd.is_done(key):
            logger.info("[%s] already done, skipping", key)
            return
        self._evaluate(key, self.original, self.rd.baseline_dir, owner=None)

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
            if stage.name == "evaluate":
                self._evaluate(key, plan.model, rdir, owner)
                continue
            with self.stage(key, [rdir / name for name in stage.outputs]) as info:
                info.update(self._run_stage(stage.name, t, plan, rdir, current, owner))

    def _run_stage(self, name: str, t: int, plan: RoundPlan, rdir: Location, current: str,
                   owner: str | None) -> dict[str, Any]:
        """The work of one round stage (evaluate excepted) on ``owner``'s generator pools; returns
        the info recorded in ``state.json``."""
        samples, accepted = rdir / layout.SAMPLES, rdir / layout.ACCEPTED
        if name == "generate":
            if self.teacher is not None:
                return self._generate(self.teacher, samples, t, owner, role="teacher")
            return self._generate(current, samples, t, owner)
        if name == "verify":
            return self._verify(samples, accepted, rdir / layout.VERDICTS, owner)
        if name == "sft":
            return self._sft(plan.sft_init, accepted, rdir / layout.SFT, owner)
        if name == "sweep":
            return self._sweep(current, (rdir / layout.SFT).uri, rdir / layout.SWEEP, owner)
        if name == "merge":
            return self._merge((rdir / layout.SFT).uri, rdir / layout.MERGED, owner,
                               plan.merge_params or dict(self.cfg.merge.params))
        raise ValueError(f"no work is defined for round stage {name!r}")

    # --- stages -----------------------------------------------------------------------------
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

    def _generate(self, model: str, out: Location, t: int, owner: str | None = None,
                  role: str = "student") -> dict[str, Any]:
        g = self.cfg.generate
        problems = self.problems(self.cfg.data.train)
        prompts = self.student_prompts("train", problems)  # the student's prompts: what SFT trains on
        gen_prompts = (prompts if role == "student"
                       else self.prompts(problems, AutoTokenizer.from_pretrained(materialize(model, weights=False))))
        sampling = SamplingSpec(
            n=g.samples_per_question, temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_tokens,
            stop=self.stop_strings(), seed=g.seed + t, entropy_top_k=g.entropy_top_k,
            entropy_stride=g.entropy_stride,
        )
        pool = self._load(role, model, owner)
        outs = pool.generate([p["ids"] for p in gen_prompts], sampling, desc=f"generate round {t}")
        rows = [
            SampleRow(
                problem_id=prob.id, dataset=prob.dataset, question=prob.question, gold=prob.answer,
                prompt=prompt["text"], sample=j, completion=c.text, finish_reason=c.finish_reason,
                num_tokens=c.num_tokens,
                token_entropies=None if c.token_entropies is None else [round(e, 4) for e in c.token_entropies],
            ).to_json()
            for prob, prompt, comps in zip(problems, prompts, outs)
            for j, c in enumerate(comps)
        ]
        write_jsonl(out, rows)
        return {
            "generated": len(rows), "questions": len(problems), "model": str(model), "generator": role,
            "sampling": {"n": g.samples_per_question, "temperature": g.temperature, "top_p": g.top_p,
                         "max_tokens": g.max_tokens, "greedy": sampling.greedy},
            "truncated": sum(r["finish_reason"] == "length" for r in rows),
            "tokens": sum(r["num_tokens"] for r in rows),
            "tokens_per_s": round(pool.last_stats.tokens_per_s, 1),
            "actor_retries": pool.last_stats.retries,  # generator actors replaced mid-round
        }

    def _verify(self, samples: Location, out: Location, verdicts_out: Location, owner: str | None) -> dict[str, Any]:
        v = self.cfg.verify
        rows = read_jsonl(samples)
        pool = self.verifier_pool()
        if not pool.actors:  # a judge on a GPU may need the room the generator pool holds
            self._make_room(self._requests()["verify"], owner)
        verdicts = pool.verify(rows, v.batch_size)
        kept = select_accepted(rows, verdicts, dedup=v.dedup)
        write_jsonl(out, kept)
        write_jsonl(verdicts_out, [
            {"problem_id": r["problem_id"], "sample": r["sample"], "extracted": vd.extracted, "correct": vd.correct,
             **({"timed_out": True} if vd.timed_out else {}), **({"note": vd.note} if vd.note is not None else {})}
            for r, vd in zip(rows, verdicts)])
        verified = [{**r, "extracted": vd.extracted, "correct": vd.correct} for r, vd in zip(rows, verdicts)]
        k = self.cfg.generate.samples_per_question
        return {
            "verifier": v.verifier,
            "generated": len(rows),
            "correct": sum(vd.correct for vd in verdicts),
            "unparseable": sum(vd.extracted is None for vd in verdicts),
            "timeouts": sum(vd.timed_out for vd in verdicts),
            "accepted": len(kept),
            "questions_solved": len({r["problem_id"] for r in kept}),
            "actor_retries": pool.last_retries,  # verifier actors replaced mid-stage
            # Without gold in the loop: how often the accepted answers were right, where gold exists.
            **({} if needs_gold(v.verifier) else {"gold_check": label_precision(rows, verdicts)}),
            f"train_pass@{k}": mean_pass_at_k(list(group_by_question(verified, field="correct").values()), k),
            # Collapse metrics on the k samples per training question.
            "diversity": diversity_metrics(
                group_by_question(verified), group_by_question(verified, field="extracted"),
                # entropy is measured on a sample of the questions (generate's entropy stride)
                group_by_question([r for r in verified if "token_entropies" in r], field="token_entropies")
                if any("token_entropies" in r for r in verified) else None),
        }

    def _sft(self, model: str, accepted: Location, out: Location, owner: str | None) -> dict[str, Any]:
        n = len(read_jsonl(accepted))
        if n == 0:
            logger.warning("no sample was accepted this round: SFT skipped, the model stays %s", model)
            return {"skipped": True, "reason": "no accepted samples", "examples": 0}
        # The SFT workers (on any node) materialize the model and publish `out` themselves.
        request = self._requests()["sft"]
        self._make_room(request, owner, release_pools_for_sft(self.cfg.generate.release_during_sft,
                                                              autoscales=bool(self.node_types.types)))
        with self._reserved(request):
            pass  # room for the workers found (a bounded, logged wait); Ray Train places them there now
        res = run_sft(model, accepted, out, self.cfg.train, start_timeout_s=self.cfg.ray.placement_timeout_s)
        return {
            "skipped": False, "init_model": model, "examples": res.examples, "dropped": res.dropped,
            "steps": res.steps, "final_loss": res.final_loss, "checkpoint": out.uri,
            "tokens": res.tokens, "tokens_per_s": round(res.tokens_per_second, 1), "restarts": res.restarts,
            "timings": {k: round(v, 2) for k, v in res.timings.items()},
        }

    def _merge(self, sft: str, out: Location, owner: str | None, params: dict[str, Any]) -> dict[str, Any]:
        m = self.cfg.merge
        anchor = self.anchor or self.original
        request = self._requests()["merge"]
        self._make_room(request, owner)
        r = m.resources
        resources = {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus, "resources": dict(r.resources)}
        with self._reserved(request) as group:  # the task runs in it: its wait for a node is bounded and logged
            merged = merge_remote(m.method, anchor, [sft], out.uri, params, m.seed, self.options, resources,
                                  placement_group=group)
        return {"method": m.method, "params": params, "seed": m.seed, "anchor": anchor, "checkpoint": merged}

    def _sweep(self, start: str, sft: str, folder: Location, owner: str | None) -> dict[str, Any]:
        """Score the round's start model and each merge.sweep candidate on the probe split (each candidate
        merged into ``folder/NN``, swapped into the running generator pool, scored, then deleted) and pick
        the round's merge by merge.select. Each score is recorded as it is made (``folder/NN.json``): a
        resumed sweep keeps the records made with the same inputs and redoes only the rest."""
        m = self.cfg.merge
        candidates = sweep_candidates(m.params, m.sweep, keep=m.select == "fixed")
        inputs = {"sft": sft, "anchor": self.anchor or self.original, "seed": m.seed, "method": m.method,
                  "probe_fraction": m.probe_fraction, "probe_seed": m.probe_seed,
                  "max_tokens": self.cfg.evaluate.max_tokens}
        start_inputs = {**inputs, "model": start}
        start_rec = (self._kept_record(folder / "start.json", start_inputs)
                     or self._probe_record(folder / "start.json", start_inputs, start, owner))
        records = []
        for i, params in enumerate(candidates):
            record, checkpoint = folder / f"{i:02d}.json", folder / f"{i:02d}"
            cand_inputs = {**inputs, "params": params}
            rec = self._kept_record(record, cand_inputs)
            if rec is None:
                clear_output(checkpoint)
                rec = self._probe_record(record, cand_inputs, self._merge(sft, checkpoint, owner, params)["checkpoint"],
                                         owner)
            clear_output(checkpoint)  # scored: only its record is kept
            records.append(rec)
        chosen = choose_candidate(m.select, m.params, candidates, ProbeScore(start_rec["id"], start_rec["ood"]),
                                  [ProbeScore(r["id"], r["ood"]) for r in records])
        logger.info("merge sweep: candidate %d of %d chosen (%s): %s", chosen + 1, len(candidates), m.select,
                    candidates[chosen])
        scores = ("id", "ood", "accuracy")
        return {"select": m.select, "rule": SELECT_RULES[m.select],
                "probe_n": {name: len(probs) for name, probs in self.eval_sets("probe")},
                "start": {"model": start, **{k: start_rec[k] for k in scores}},
                "candidates": [{"params": p, **{k: r[k] for k in scores}} for p, r in zip(candidates, records)],
                "chosen": {"index": chosen, "params": candidates[chosen]}}

    @staticmethod
    def _kept_record(record: Location, inputs: dict[str, Any]) -> dict[str, Any] | None:
        """The probe scores in ``record`` if they were made from the same ``inputs``, else None."""
        try:
            kept = read_json(record)
        except FileNotFoundError:
            return None
        if kept.get("inputs") != json.loads(json.dumps(inputs)):
            return None
        logger.info("merge sweep: kept the probe scores of %s", record)
        return kept

    def _probe_record(self, record: Location, inputs: dict[str, Any], model: str, owner: str | None) -> dict[str, Any]:
        """Score ``model`` greedily on the probe split and record it in ``record`` with its ``inputs``:
        accuracy per set, on the in-domain set (``id``) and the mean over the others (``ood``)."""
        clear_output(record)
        results, _, _ = self._score(model, "probe", owner, f"probe {record.name}")
        accuracy = {name: r["accuracy"] for name, r in results.items()}
        id_set, *ood_sets = list(accuracy)
        out = {"inputs": inputs, "accuracy": accuracy, "n": {name: r["n"] for name, r in results.items()},
               "id": accuracy[id_set], "ood": sum(accuracy[s] for s in ood_sets) / len(ood_sets)}
        write_json(record, out)
        return out

    def _evaluate(self, key: str, model: str, folder: Location, owner: str | None) -> None:
        """Greedy accuracy on every eval set (with a merge sweep: on its held-back part only) and, with
        evaluate.samples k > 1, k samples per question (pass@k); eval_samples.jsonl keeps every
        completion with its verdict (the per-question ledger)."""
        eval_json, eval_samples = folder / layout.EVAL, folder / layout.EVAL_SAMPLES
        with self.stage(key, [eval_json, eval_samples]) as info:
            results, rows, stats = self._score(model, "held_back", owner, f"evaluate {key.split('/evaluate')[0]}",
                                               samples=self.cfg.evaluate.samples)
            questions = "held_back" if self.cfg.merge.sweep else "all"  # held_back: the probe questions left out
            write_jsonl(eval_samples, rows)
            write_json(eval_json, {"model": model, "questions": questions, "datasets": results})
            tokens, seconds = sum(st.tokens for st in stats), sum(st.seconds for st in stats)
            info.update({"model": model, "questions": questions, "datasets": results, "tokens": tokens,
                         "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else 0.0,
                         "actor_retries": sum(st.retries for st in stats)})

    def _score(self, model: str, part: str, owner: str | None, desc: str, samples: int = 1
               ) -> tuple[dict[str, Any], list[dict[str, Any]], list[GenerationStats]]:
        """``model``'s greedy answers (and with ``samples`` > 1 that many at evaluate.temperature) to the
        ``part`` of the eval sets (:meth:`eval_sets`), scored: the metrics per set, the ledger rows and
        the generation stats. The pool swaps the model's weights in place when it serves another."""
        e = self.cfg.evaluate
        sets = self.eval_sets(part)
        prompts = [p["ids"] for p in self.student_prompts(f"eval:{part}", [p for _, probs in sets for p in probs])]
        greedy = SamplingSpec(n=1, temperature=0.0, max_tokens=e.max_tokens, stop=self.stop_strings(), seed=None)
        pool = self._load("student", model, owner)
        outs = [o[0] for o in pool.generate(prompts, greedy, desc=desc)]
        stats = [pool.last_stats]
        sampled = None
        if samples > 1:
            spec = SamplingSpec(n=samples, temperature=e.temperature, max_tokens=e.max_tokens,
                                stop=self.stop_strings(), seed=self.cfg.generate.seed)
            sampled = pool.generate(prompts, spec, desc=f"{desc} k={samples}")
            stats.append(pool.last_stats)
        keys = _EVAL_KEYS + (_SAMPLED_KEYS if sampled is not None else ())
        results, start, rows = {}, 0, []
        for name, probs in sets:
            span = slice(start, start + len(probs))
            start += len(probs)
            chunk = sampled[span] if sampled is not None else None
            ev = evaluate_completions(name, probs, [c.text for c in outs[span]],
                                      [[c.text for c in cs] for cs in chunk] if chunk is not None else None,
                                      verifier=pick_verifier(probs, e.verifier))
            results[name] = {k: ev.metrics[k] for k in keys if k in ev.metrics}
            rows += sample_rows(name, probs, ev, outs[span], chunk)
        return results, rows, stats


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
