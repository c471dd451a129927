"""The decomposition job (Composer §3.1): image datasets → condition-feature shards, on Ray Data.

    plan units (driver) → read → decode → one actor stage per extractor → write parts
      → finalize each complete shard (driver): shards/<name>.parquet + its state, atomically
      → errors.parquet, manifest.json, preview.png

Resumability: a shard is done when its state file ``.recompose/state/<name>.json`` exists and
records the same input digest and extractor fingerprints as the current run. A rerun skips done
shards, recomputes shards whose state is missing (killed mid-run), and for shards whose
fingerprints differ recomputes only the changed conditions and merges them into the shard.
Because every file is written to a temporary name and renamed, and shard contents are sorted and
deterministic, an interrupted-then-resumed run ends with the same manifest as a clean one.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import files
from pipelines.conditions import EXTRACTED_NAMES, Extractor, get_extractor
from pipelines.config import ConfigError, config_hash, to_dict
from pipelines.data import shards as S
from pipelines.data.sources import Plan, WorkUnit, plan
from pipelines.decompose.config import DecomposeConfig

STATE_DIR = ".recompose"


def build_extractors(cfg: DecomposeConfig, has_gt: bool) -> tuple[dict[str, Extractor], dict[str, str]]:
    """The extractors this run uses, and the reasons of the ones it cannot run."""
    wanted = cfg.conditions or EXTRACTED_NAMES
    chosen: dict[str, Extractor] = {}
    unavailable: dict[str, str] = {}
    for name in EXTRACTED_NAMES:
        if name not in wanted:
            continue
        ext = get_extractor(name)(getattr(cfg, name), cfg.resolution, has_gt)
        reason = ext.unavailable_reason()
        if reason:
            if cfg.conditions:
                raise ConfigError(f"condition {name!r} was requested but is unavailable: {reason}")
            unavailable[name] = reason
        else:
            chosen[name] = ext
    if not chosen:
        raise ConfigError(
            "no condition can be extracted with this config: "
            + "; ".join(f"{k}: {v}" for k, v in unavailable.items())
        )
    return chosen, unavailable


def fit_to_cluster(
    stages: dict[str, dict[str, Any]], cluster: dict[str, float], log
) -> dict[str, dict[str, Any]]:
    """Scale the actors' CPU reservations down when they cannot all be placed at once.

    Every actor stage must be running for the stream to flow; on a laptop the configured
    reservations (1 CPU per actor) may exceed the machine, which would stall the job. Only the
    reservations shrink — what the job computes is unchanged. Missing GPUs are a clear error.
    """
    gpus = cluster.get("GPU", 0.0)
    for name, r in stages.items():
        if r["num_gpus"] and r["num_gpus"] * r["concurrency"] > gpus:
            raise ConfigError(
                f"{name} asks for {r['concurrency']} actor(s) x {r['num_gpus']} GPU but the Ray cluster has "
                f"{gpus:g} GPU(s); lower {name}.concurrency / {name}.num_gpus or add GPU nodes"
            )
    cpus = cluster.get("CPU", 1.0)
    need = sum(r["num_cpus"] * r["concurrency"] for r in stages.values())
    budget = cpus * 0.5  # the other half runs the read, decode and write tasks
    if need <= budget:
        return stages
    scale = budget / need
    print(
        f"[decompose] actors reserve {need:g} CPUs on a {cpus:g}-CPU cluster: scaling reservations by {scale:.2f}",
        file=log,
    )
    return {n: {**r, "num_cpus": r["num_cpus"] * scale} for n, r in stages.items()}


@dataclass
class _Pending:
    unit: WorkUnit
    todo: tuple[str, ...]  # conditions to compute
    fresh: bool  # no usable previous shard: compute everything


class _Job:
    def __init__(self, cfg: DecomposeConfig):
        if not cfg.input or not cfg.output:
            raise ConfigError("both input and output are required")
        self.cfg = cfg
        self.out = Path(cfg.output)
        self.state = self.out / STATE_DIR
        self.plan: Plan = plan(cfg.input, cfg.format, cfg.shard_size, cfg.captions, cfg.image_column)
        self.extractors, self.unavailable = build_extractors(cfg, self.plan.has_ground_truth)
        self.fingerprints = {n: e.fingerprint() for n, e in self.extractors.items()}
        self.specs = {n: e.columns() for n, e in self.extractors.items()}
        self.schema = S.shard_schema(cfg.resolution, self.specs, self.fingerprints)
        self.base = cfg.base_hash(self.plan.kind)
        self.computed: Counter[str] = Counter()
        self.log = sys.stderr if cfg.progress else io.StringIO()

    # -- state ---------------------------------------------------------------------------------
    def _check_output(self) -> None:
        """Refuse a directory that holds anything else; runs before anything is created in it."""
        job = self.state / "job.json"
        if job.is_file():
            prev = json.loads(job.read_text())
            if prev.get("base_hash") != self.base:
                raise ConfigError(
                    f"{self.out} holds a decomposition of another input or decode setting "
                    f"(base hash {prev.get('base_hash')} != {self.base}); choose a new --output "
                    "or remove the old one yourself"
                )
        elif self.out.exists() and any(p.name != STATE_DIR for p in self.out.iterdir()):
            raise ConfigError(
                f"{self.out} exists, is not empty and is not a recompose decomposition; choose a new --output"
            )

    def _unit_state(self, unit: WorkUnit) -> dict[str, Any] | None:
        p = self.state / "state" / f"{unit.shard}.json"
        if not p.is_file():
            return None
        st = json.loads(p.read_text())
        if st.get("unit") != unit.digest() or not (self.out / st["path"]).is_file():
            return None
        return st

    def pending(self) -> list[_Pending]:
        todo_all = tuple(self.extractors)
        out = []
        for unit in self.plan.units:
            st = self._unit_state(unit)
            if st is None:
                out.append(_Pending(unit, todo_all, True))
                continue
            old = st["fingerprints"]
            if old == self.fingerprints:
                continue
            todo = tuple(n for n in todo_all if old.get(n) != self.fingerprints[n])
            removed = set(old) - set(self.fingerprints)
            # A row that failed in a recomputed or removed extractor has no stored columns to
            # merge with, so such a shard is recomputed whole.
            fresh = bool(set(st["error_stages"]) & (set(todo) | removed))
            out.append(_Pending(unit, todo_all if fresh else todo, fresh))
        return out

    # -- run -----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self._check_output()
        self.state.mkdir(parents=True, exist_ok=True)
        lock = open(self.state / "lock", "w")  # noqa: SIM115 - held for the whole run
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another decomposition is writing to {self.out}") from None
        self._check_output()  # again, now that no other run can write job.json
        files.write_json(
            {"base_hash": self.base, "input": os.path.abspath(self.cfg.input)}, self.state / "job.json"
        )
        for name, why in self.unavailable.items():
            print(f"[decompose] skipping {name}: {why}", file=self.log)
        t0 = time.time()
        pend = self.pending()
        done_before = len(self.plan.units) - len(pend)
        print(
            f"[decompose] {self.plan.inputs} inputs in {len(self.plan.units)} shards ({self.plan.kind}); "
            f"{done_before} shards already done, {len(pend)} to compute; conditions: {', '.join(self.extractors)}",
            file=self.log,
        )
        updates = [p for p in pend if not p.fresh and not p.todo]
        for p in updates:  # only removed conditions: no compute, rewrite in place
            self._finalize(p, [])
        work = [p for p in pend if p.todo]
        if work:
            self._execute(work)
        summary = self._write_outputs(changed=bool(work or updates))
        summary.update(
            elapsed_s=round(time.time() - t0, 3),
            shards_computed=len(work),
            inputs_processed=sum(len(p.unit.members) for p in work),
            shards_reused=done_before,
            computed=dict(self.computed),
        )
        self._print_summary(summary)
        lock.close()
        return summary

    def _execute(self, work: list[_Pending]) -> None:
        import ray
        from tqdm import tqdm

        from pipelines.data.decode import decode_batch
        from pipelines.decompose.stages import ExtractorStage, read_rows, unfused, write_parts

        if not ray.is_initialized():
            ray.init(log_to_driver=False, configure_logging=False)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        staging = self.state / "staging"
        for p in work:
            shutil.rmtree(staging / p.unit.shard, ignore_errors=True)
        cfg = self.cfg
        items = [{"unit": p.unit.to_json(), "todo": ",".join(p.todo)} for p in work]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.flat_map(
            read_rows,
            fn_kwargs={
                "root": self.plan.root,
                "image_column": cfg.image_column,
                "caption_column": cfg.caption_column,
            },
            num_cpus=cfg.read_num_cpus,
        )
        ds = ds.map_batches(
            decode_batch,
            fn_kwargs={
                "resolution": cfg.resolution,
                "cfg": cfg.decode,
                "with_gt": self.plan.has_ground_truth,
            },
            batch_size=cfg.decode.batch_size,
            num_cpus=cfg.decode.num_cpus,
            batch_format="numpy",
            ray_remote_args_fn=unfused,
        )
        stages = {n: e.resources() for n, e in self.extractors.items() if any(n in p.todo for p in work)}
        for name, res in fit_to_cluster(stages, ray.cluster_resources(), self.log).items():
            ds = ds.map_batches(
                ExtractorStage,
                fn_constructor_kwargs={
                    "name": name,
                    "config": getattr(cfg, name),
                    "resolution": cfg.resolution,
                    "has_ground_truth": self.plan.has_ground_truth,
                },
                batch_size=res["batch_size"],
                compute=ray.data.ActorPoolStrategy(size=res["concurrency"]),
                num_cpus=res["num_cpus"],
                num_gpus=res["num_gpus"] or None,
                batch_format="numpy",
            )
        columns = [s.name for name in stages for s in self.specs[name]]
        ds = ds.map_batches(
            write_parts,
            fn_kwargs={"staging": str(staging), "columns": columns},
            batch_format="numpy",
            num_cpus=0.5,
        )

        expected = {p.unit.shard: len(p.unit.members) for p in work}
        by_name = {p.unit.shard: p for p in work}
        got: Counter[str] = Counter()
        total = sum(expected.values())
        bar = tqdm(
            total=total, unit="img", desc="decompose", file=self.log, mininterval=1.0, dynamic_ncols=True
        )
        finished = 0
        for row in ds.iter_rows():
            shard, n = row["shard"], int(row["rows"])
            got[shard] += n
            bar.update(n)
            if got[shard] == expected[shard]:
                self._finalize(by_name[shard], self._parts(staging / shard))
                finished += 1
                bar.set_postfix(shards=f"{finished}/{len(work)}")
                if os.environ.get("RECOMPOSE_TEST_KILL_AFTER_SHARDS") == str(finished):
                    os.kill(os.getpid(), 9)  # tests: a real SIGKILL between two shard commits
            elif got[shard] > expected[shard]:
                raise RuntimeError(f"shard {shard}: {got[shard]} rows for {expected[shard]} inputs")
        bar.close()
        if cfg.data_stats:
            print(ds.stats(), file=self.log)
        missing = [s for s in expected if got[s] != expected[s]]
        if missing:
            raise RuntimeError(f"shards {missing[:5]} did not receive all their rows; rerun to resume")

    @staticmethod
    def _parts(folder: Path) -> list[Path]:
        return sorted(folder.glob("part-*.parquet"))

    # -- finalize ------------------------------------------------------------------------------
    def _finalize(self, p: _Pending, parts: list[Path]) -> None:
        unit, n = p.unit, len(p.unit.members)
        rows: dict[str, Any] = {}
        if parts:
            t = pa.concat_tables([pq.read_table(f) for f in parts])
            t = t.take(pa.compute.sort_indices(t, [("index", "ascending")]))
            if t.column("index").to_pylist() != list(range(n)):
                raise RuntimeError(f"shard {unit.shard}: staged rows do not cover inputs 0..{n - 1}")
            rows = {c: t.column(c) for c in t.column_names}
        err_rows = self._errors_from(rows, unit) if rows else _empty_errors()
        if p.fresh:
            errors = err_rows
            bad = set(errors["index"])
            good = [i for i in range(n) if i not in bad]
            data = self._arrays(rows, good, p.todo)
            data.update({c: np.array(rows[c].to_pylist(), object)[good] for c in ("key", "source", "text")})
        else:
            old_state = self._unit_state(unit)
            old_err = pq.read_table(self.state / "errors" / f"{unit.shard}.parquet").to_pydict()
            # Re-read rows bring their read/decode errors again; keep the old ones only without parts.
            again = ("read", "decode") if parts else ()
            keep = [i for i, s in enumerate(old_err["stage"]) if s not in p.todo and s not in again]
            errors = {k: [old_err[k][i] for i in keep] + list(err_rows[k]) for k in err_rows}
            order = sorted(range(len(errors["index"])), key=lambda i: errors["index"][i])
            errors = {k: [v[i] for i in order] for k, v in errors.items()}
            bad = set(errors["index"])
            old_bad = set(old_err["index"])
            old_good = [i for i in range(n) if i not in old_bad]
            good = [i for i in range(n) if i not in bad]
            pos = {idx: j for j, idx in enumerate(old_good)}
            if not set(good) <= set(pos) or old_state is None:
                raise RuntimeError(
                    f"shard {unit.shard}: cannot merge an update; delete its state to recompute"
                )
            old = S.read_shard(self.out / old_state["path"])
            sel = [pos[i] for i in good]
            data = {k: v[sel] for k, v in old.items()}
            data.update(self._arrays(rows, good, p.todo))
        for name in p.todo:
            self.computed[name] += len(good)
        table = S.build_table(self.schema, data)
        path = self.out / "shards" / f"{unit.shard}.parquet"
        S.write_parquet(table, path)
        if self.cfg.write_webdataset:
            from pipelines.data.webdataset_out import write_tar

            write_tar(table, path.with_suffix(".tar"))
        S.write_parquet(S.errors_table(errors), self.state / "errors" / f"{unit.shard}.parquet")
        files.write_json(
            {
                "unit": unit.digest(),
                "path": f"shards/{unit.shard}.parquet",
                "inputs": n,
                "rows": len(good),
                "errors": len(errors["index"]),
                "error_stages": sorted(set(errors["stage"])),
                "sha256": files.sha256_file(path),
                "fingerprints": self.fingerprints,
            },
            self.state / "state" / f"{unit.shard}.json",
        )
        shutil.rmtree(self.state / "staging" / unit.shard, ignore_errors=True)

    def _arrays(self, rows: dict[str, Any], good: list[int], todo: tuple[str, ...]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if not rows:
            return out
        r = self.cfg.resolution
        out["image"] = S.from_binary(rows["image"], np.uint8, (r, r, 3))[good]
        for name in todo:
            for spec in self.specs[name]:
                out[spec.name] = S.from_binary(rows[spec.name], spec.dtype, spec.shape)[good]
        return out

    @staticmethod
    def _errors_from(rows: dict[str, Any], unit: WorkUnit) -> dict[str, list[Any]]:
        stage = rows["err_stage"].to_pylist()
        bad = [i for i, s in enumerate(stage) if s]
        pick = {c: rows[c].to_pylist() for c in ("key", "source", "err_type", "err_msg")}
        return {
            "key": [pick["key"][i] for i in bad],
            "source": [pick["source"][i] for i in bad],
            "stage": [stage[i] for i in bad],
            "error_type": [pick["err_type"][i] for i in bad],
            "message": [pick["err_msg"][i] for i in bad],
            "shard": [unit.shard] * len(bad),
            "index": bad,
        }

    # -- outputs -------------------------------------------------------------------------------
    def _write_outputs(self, changed: bool) -> dict[str, Any]:
        """errors.parquet, manifest.json, preview.png; ``changed``: this run rewrote some shard."""
        entries = []
        for unit in self.plan.units:
            st = self._unit_state(unit)
            if st is None or st["fingerprints"] != self.fingerprints:
                raise RuntimeError(f"shard {unit.shard} is not complete; rerun to resume")
            entries.append({k: st[k] for k in ("path", "inputs", "rows", "errors", "sha256")})
        totals = {
            "inputs": sum(e["inputs"] for e in entries),
            "rows": sum(e["rows"] for e in entries),
            "errors": sum(e["errors"] for e in entries),
            "skipped_upstream": self.plan.skipped,
        }
        assert totals["inputs"] == totals["rows"] + totals["errors"]
        manifest = {
            "format": S.MANIFEST_FORMAT,
            "shard_format": S.SHARD_FORMAT,
            "input_format": self.plan.kind,
            "resolution": self.cfg.resolution,
            "config_hash": config_hash(self.cfg),
            "base_hash": self.base,
            "extractors": {n: e.describe() for n, e in self.extractors.items()},
            # What inference needs to decompose a user's image as this job did (model_index.json
            # of a trained pipeline, pipelines/data/decomposer.py); output-affecting settings only.
            "settings": {
                n: to_dict(getattr(self.cfg, n), outputs_only=True) for n in ("decode", *self.extractors)
            },
            "unavailable": self.unavailable,
            "shards": entries,
            "totals": totals,
        }
        path = self.out / "manifest.json"
        preview = self.out / "preview.png" if totals["rows"] else None
        previous = json.loads(path.read_text()) if path.is_file() else None
        fresh = not changed and previous is not None and (self.out / "errors.parquet").is_file()
        fresh = fresh and (preview is None or preview.is_file())
        if fresh and {k: v for k, v in previous.items() if k != "errors_by_stage"} == json.loads(
            json.dumps(manifest)
        ):
            # A rerun of a finished job: the outputs on disk already say exactly this.
            manifest = previous
        else:
            tables = [pq.read_table(self.state / "errors" / f"{u.shard}.parquet") for u in self.plan.units]
            errors = pa.concat_tables(tables) if tables else S.errors_table(_empty_errors())
            S.write_parquet(errors, self.out / "errors.parquet")
            manifest["errors_by_stage"] = dict(sorted(Counter(errors.column("stage").to_pylist()).items()))
            files.write_json(manifest, path)
            if preview is not None:
                from pipelines.data.preview import write_preview

                first = next(e for e in entries if e["rows"])
                write_preview(self.out / first["path"], preview)
        return {
            "output": str(self.out),
            "manifest": str(path),
            "preview": str(preview) if preview else None,
            **totals,
            "errors_by_stage": manifest["errors_by_stage"],
        }

    def _print_summary(self, s: dict[str, Any]) -> None:
        rate = s["inputs_processed"] / s["elapsed_s"] if s["elapsed_s"] else 0.0
        lines = [
            f"[decompose] done in {s['elapsed_s']:.1f}s: {s['inputs']} inputs = {s['rows']} rows + {s['errors']} errors"
            + (
                f" ({rate:.1f} img/s)"
                if s["shards_computed"]
                else " (nothing to do: all shards were complete)"
            ),
            f"[decompose] shards computed {s['shards_computed']}, reused {s['shards_reused']}; "
            f"rows computed per condition: {s['computed'] or '{}'}",
        ]
        if s["errors_by_stage"]:
            lines.append(
                f"[decompose] errors by stage: {s['errors_by_stage']} (see {self.out / 'errors.parquet'})"
            )
        if s["skipped_upstream"]:
            lines.append(f"[decompose] skipped upstream (img2dataset status): {s['skipped_upstream']}")
        lines.append(
            f"[decompose] manifest: {s['manifest']}" + (f"  preview: {s['preview']}" if s["preview"] else "")
        )
        print("\n".join(lines), file=self.log)


def _empty_errors() -> dict[str, list[Any]]:
    return {f.name: [] for f in S.ERRORS_SCHEMA}


def run_decompose(cfg: DecomposeConfig) -> dict[str, Any]:
    """Run (or resume) the decomposition described by ``cfg``; returns the summary."""
    return _Job(cfg).run()


__all__ = ["build_extractors", "run_decompose"]
