"""The decomposition job end to end on a real local Ray: inputs, errors, formats, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import ConfigError, load_config
from pipelines.data.shards import read_shard, shard_metadata
from pipelines.decompose.config import DecomposeConfig
from pipelines.decompose.job import run_decompose
from pipelines.files import OutputInUse
from tests.helpers import images

FAST = "intensity,palette,sketch"


def cfg(inp, out, conditions=FAST, **kw) -> DecomposeConfig:
    values = {
        "input": str(inp),
        "output": str(out),
        "conditions": conditions,
        "resolution": 32,
        "progress": False,
    }
    values.update(kw)
    return load_config(DecomposeConfig, values=values)


def all_rows(out: Path) -> dict[str, dict]:
    rows = {}
    for p in sorted((out / "shards").glob("*.parquet")):
        d = read_shard(p)
        for i, k in enumerate(d["key"]):
            rows[k] = {c: v[i] for c, v in d.items()}
    return rows


def test_folder_with_corrupt_and_odd_inputs(tmp_path, ray_local):
    files = images.write_folder(tmp_path / "in")
    s = run_decompose(cfg(tmp_path / "in", tmp_path / "out", shard_size=5))
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    errors = pq.read_table(tmp_path / "out" / "errors.parquet").to_pydict()
    rows = all_rows(tmp_path / "out")

    assert man["totals"]["inputs"] == len(files) == s.inputs
    assert man["totals"]["inputs"] == man["totals"]["rows"] + man["totals"]["errors"]
    assert len(rows) == man["totals"]["rows"] and len(errors["key"]) == man["totals"]["errors"]
    assert sorted(errors["key"]) == sorted(Path(k).stem for k in images.BAD)
    assert set(errors["stage"]) == {"decode"}
    kinds = dict(zip(errors["key"], errors["error_type"], strict=True))
    assert kinds["bomb"] == "ImageTooLarge"
    # Pillow reads them, but only the allowed formats are ever decoded (EPS would run Ghostscript)
    for rel in images.OTHER_FORMATS:
        assert kinds[Path(rel).stem] == "UnsupportedImageFormat", rel
    assert all(errors["message"]) and all(errors["source"])
    for rel in images.ODD_BUT_GOOD:
        assert Path(rel).stem in rows, rel

    # Decoded correctly, not merely decoded.
    assert np.abs(rows["cmyk"]["image"].astype(int) - images.RED).max() < 25
    assert abs(int(rows["sixteen"]["image"][..., 0].mean()) - round(40000 / 65535 * 255)) <= 1
    rot = rows["rotated"]["image"]  # EXIF 6: the red left half is now on top
    assert rot[2, 2, 0] > 150 and rot[-3, 2, 2] > 150 and rot[-3, 2, 0] < 100
    assert (rows["tiny"]["image"] == (10, 200, 30)).all()
    alpha = rows["alpha"]["image"]
    assert (alpha[:, :10] == 255).all() and (alpha[:, -10:] == (255, 0, 0)).all()
    assert np.abs(rows["pal"]["image"].astype(int) - images.BLUE).max() < 10
    assert rows["sub/good01"]["text"] == "caption of good01"
    assert rows["good00"]["source"] == "good00.png"

    # Shard schema: conditions as fixed-size lists with shapes, fingerprints in the metadata.
    shard = tmp_path / "out" / man["shards"][0]["path"]
    schema = pq.read_schema(shard)
    assert schema.names == ["key", "source", "text", "image", "palette", "sketch", "intensity"]
    assert schema.field("palette").type == pa.list_(pa.float16(), 156)
    assert schema.field("sketch").type == pa.binary(32 * 32)
    assert schema.field("sketch").metadata == {b"shape": b"[32, 32]", b"dtype": b"uint8"}
    assert set(shard_metadata(shard)["conditions"]) == {"palette", "sketch", "intensity"}
    assert (tmp_path / "out" / "preview.png").stat().st_size > 0
    assert man["extractors"]["sketch"]["version"] and man["config_hash"]


def test_bad_config_is_a_clear_error(tmp_path):
    images.write_folder(tmp_path / "in", n_good=1, with_bad=False)
    with pytest.raises(ValueError, match="known conditions"):
        cfg(tmp_path / "in", tmp_path / "o", conditions="palette,colour")
    with pytest.raises(ValueError, match="generated at training"):
        cfg(tmp_path / "in", tmp_path / "o", conditions="mask")
    with pytest.raises(ConfigError, match="unavailable"):
        run_decompose(cfg(tmp_path / "in", tmp_path / "o", conditions="depth"))
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(DecomposeConfig, overrides=["sketch.treshold=3"])


def _img2dataset_webdataset(root: Path) -> None:
    """Two shards as img2dataset writes them: NNNNN.tar + NNNNN.parquet (+ _stats.json)."""
    root.mkdir(parents=True)
    for shard in range(2):
        meta = {"key": [], "status": [], "url": [], "caption": [], "error_message": []}
        with tarfile.open(root / f"{shard:05d}.tar", "w") as tf:
            for j in range(5):
                key = f"{shard:05d}{j:04d}"
                ok = j != 3
                meta["key"].append(key)
                meta["status"].append("success" if ok else "failed_to_download")
                meta["url"].append(f"http://example.invalid/{key}.jpg")
                meta["caption"].append(f"caption {key}")
                meta["error_message"].append(None if ok else "timeout")
                if not ok:
                    continue
                data = images.truncated_jpeg() if (shard, j) == (1, 4) else images.good_png(shard * 10 + j)
                for ext, blob in (("jpg", data), ("txt", f"caption {key}".encode()), ("json", b"{}")):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(blob)
                    tf.addfile(info, __import__("io").BytesIO(blob))
        pq.write_table(pa.table(meta), root / f"{shard:05d}.parquet")
        (root / f"{shard:05d}_stats.json").write_text("{}")


def test_img2dataset_webdataset_layout(tmp_path, ray_local):
    _img2dataset_webdataset(tmp_path / "wds")
    s = run_decompose(cfg(tmp_path / "wds", tmp_path / "out", conditions="intensity"))
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert man["input_format"] == "webdataset"
    assert man["totals"]["skipped_upstream"] == {"failed_to_download": 2}
    assert (s.inputs, s.rows, s.errors) == (8, 7, 1)
    rows = all_rows(tmp_path / "out")
    assert rows["000000000"]["text"] == "caption 000000000"
    assert rows["000000000"]["source"] == "00000.tar:000000000"
    err = pq.read_table(tmp_path / "out" / "errors.parquet").to_pydict()
    assert err["key"] == ["000010004"] and err["stage"] == ["decode"]


def test_img2dataset_parquet_and_laion_parquet(tmp_path, ray_local):
    d = tmp_path / "pq"
    d.mkdir()
    keys = [f"{i:09d}" for i in range(6)]
    jpg = [images.good_png(i) if i != 2 else None for i in range(6)]
    status = ["success" if i != 2 else "failed_to_download" for i in range(6)]
    pq.write_table(
        pa.table({"key": keys, "jpg": jpg, "txt": [f"t{i}" for i in range(6)], "status": status}),
        d / "00000.parquet",
    )
    s = run_decompose(cfg(d, tmp_path / "o1", conditions="intensity"))
    assert (s.inputs, s.rows, s.skipped_upstream) == (5, 5, {"failed_to_download": 1})
    assert all_rows(tmp_path / "o1")["000000004"]["text"] == "t4"

    laion = tmp_path / "laion.parquet"
    pq.write_table(
        pa.table(
            {"image": [images.good_png(i) for i in range(3)] + [b"not an image"], "caption": list("abcd")}
        ),
        laion,
    )
    s = run_decompose(cfg(laion, tmp_path / "o2", conditions="intensity"))
    assert (s.inputs, s.rows, s.errors) == (4, 3, 1)
    assert all_rows(tmp_path / "o2")["laion-00000001"]["text"] == "b"


REPO = Path(__file__).resolve().parents[2]
# `recompose decompose` with the job's after-commit seam set to SIGKILL the driver right after its
# third shard commit: a real kill between two commits.
KILL_AFTER_THREE_SHARDS = """
import os, signal, sys
from pipelines.decompose import execute
execute.after_commit = lambda n: n == 3 and os.kill(os.getpid(), signal.SIGKILL)
from jobs.decompose import main
sys.exit(main(sys.argv[1:]))
"""


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.slow
def test_kill_then_resume_matches_clean_run_and_rerun_does_nothing(tmp_path, ray_local):
    images.write_folder(tmp_path / "in", n_good=30)
    clean = tmp_path / "clean"
    run_decompose(cfg(tmp_path / "in", clean, shard_size=4))

    killed = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-c",
        KILL_AFTER_THREE_SHARDS,
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(killed),
        "--conditions",
        FAST,
        "--resolution",
        "32",
        "--set",
        "shard_size=4",
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        try:  # the killed driver's local Ray processes are in its session: end them too
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == -9, err[-2000:]  # really killed, mid-run
    assert not (killed / "manifest.json").exists()
    done = list((killed / ".recompose" / "state").glob("*.json"))
    assert len(done) == 3, done

    s = run_decompose(cfg(tmp_path / "in", killed, shard_size=4))
    assert s.shards_reused == 3 and s.shards_computed == len(_manifest(clean)["shards"]) - 3
    assert _manifest(killed) == _manifest(clean)
    assert (killed / "errors.parquet").read_bytes() == (clean / "errors.parquet").read_bytes()

    before = {p: p.stat().st_mtime_ns for p in (killed / "shards").glob("*.parquet")}
    again = run_decompose(cfg(tmp_path / "in", killed, shard_size=4))
    assert again.shards_computed == 0 and again.computed == {}
    assert {p: p.stat().st_mtime_ns for p in (killed / "shards").glob("*.parquet")} == before
    assert _manifest(killed) == _manifest(clean)


@pytest.mark.slow
def test_version_bump_recomputes_only_that_condition(tmp_path, ray_local, monkeypatch):
    images.write_folder(tmp_path / "in", n_good=10)
    out = tmp_path / "out"
    first = run_decompose(cfg(tmp_path / "in", out, shard_size=8))
    old = all_rows(out)
    old_fp = _manifest(out)["extractors"]

    from pipelines.conditions.palette import PaletteExtractor

    monkeypatch.setattr(PaletteExtractor, "version", PaletteExtractor.version + "-bumped")
    s = run_decompose(cfg(tmp_path / "in", out, shard_size=8))
    assert s.computed == {"palette": first.rows}
    man = _manifest(out)
    assert man["extractors"]["palette"]["fingerprint"] != old_fp["palette"]["fingerprint"]
    assert man["extractors"]["sketch"]["fingerprint"] == old_fp["sketch"]["fingerprint"]
    new = all_rows(out)
    assert new.keys() == old.keys()
    for k in new:
        for c in ("image", "sketch", "intensity", "palette"):
            np.testing.assert_array_equal(new[k][c], old[k][c])

    # A changed extractor setting is a new fingerprint too: only sketch is recomputed.
    thresholds = {"sketch.low_threshold": 10, "sketch.high_threshold": 20}
    s = run_decompose(cfg(tmp_path / "in", out, shard_size=8, **thresholds))
    assert s.computed == {"sketch": first.rows}
    assert any((all_rows(out)[k]["sketch"] != old[k]["sketch"]).any() for k in old)
    # A condition added later is computed alone and merged in.
    s = run_decompose(
        cfg(
            tmp_path / "in",
            out,
            conditions=FAST + ",instances",
            shard_size=8,
            **thresholds,
        )
    )
    assert s.computed == {"instances": first.rows}
    assert "instances" in read_shard(next((out / "shards").glob("*.parquet")))
    # Dropping it again rewrites the shards without the column and computes nothing.
    s = run_decompose(cfg(tmp_path / "in", out, shard_size=8, **thresholds))
    assert s.computed == {} and s.errors == first.errors
    assert "instances" not in read_shard(next((out / "shards").glob("*.parquet")))
    assert set(_manifest(out)["extractors"]) == {"palette", "sketch", "intensity"}


def test_refuses_foreign_output_and_other_input(tmp_path, ray_local):
    images.write_folder(tmp_path / "in", n_good=2, with_bad=False)
    images.write_folder(tmp_path / "in2", n_good=3, with_bad=False)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "precious.txt").write_text("keep me")
    with pytest.raises(OutputInUse, match="not empty and holds no decomposition"):
        run_decompose(cfg(tmp_path / "in", tmp_path / "foreign"))
    assert [p.name for p in (tmp_path / "foreign").iterdir()] == ["precious.txt"]
    run_decompose(cfg(tmp_path / "in", tmp_path / "out", conditions="intensity"))
    with pytest.raises(OutputInUse, match="holds a decomposition with another input"):
        run_decompose(cfg(tmp_path / "in2", tmp_path / "out", conditions="intensity"))


def test_folder_captions_from_a_csv_file(tmp_path, ray_local):
    images.write_folder(tmp_path / "in", n_good=3, with_bad=False)
    for t in (tmp_path / "in").rglob("*.txt"):
        t.unlink()
    (tmp_path / "caps.csv").write_text('key,caption\ngood00,"a red, square"\nsub/good01,second\n')
    s = run_decompose(
        cfg(tmp_path / "in", tmp_path / "out", conditions="intensity", captions=str(tmp_path / "caps.csv"))
    )
    rows = all_rows(tmp_path / "out")
    assert s.rows == 3
    assert (rows["good00"]["text"], rows["sub/good01"]["text"], rows["good02"]["text"]) == (
        "a red, square",
        "second",
        "",
    )


DATA = (
    Path(__file__).parents[1] / "data" / "img2dataset"
)  # made by the real img2dataset: see make_img2dataset.py


@pytest.mark.parametrize("layout", ["webdataset", "parquet"])
def test_real_img2dataset_output(tmp_path, ray_local, layout):
    s = run_decompose(cfg(DATA / layout, tmp_path / "out", conditions="intensity,palette"))
    man = _manifest(tmp_path / "out")
    assert man["input_format"] == layout
    # 8 urls: 6 downloaded, one 404 and one undecodable body, which img2dataset itself reports.
    assert man["totals"]["skipped_upstream"] == {"failed_to_download": 1, "failed_to_resize": 1}
    assert (s.inputs, s.rows, s.errors) == (6, 6, 0)
    rows = all_rows(tmp_path / "out")
    assert sorted(rows) == ["000000", "000001", "000002", "000003", "000004", "000010"]
    assert rows["000010"]["text"] == "picture number 5"
    assert rows["000000"]["image"].shape == (32, 32, 3)


class _Killed(Exception):
    """What the commit seam raises: the run stops there, as a kill would stop it."""


def _kill_at(what: str, nth: int):
    seen = []

    def hook(file: str, shard: str) -> None:
        if file == what:
            seen.append(shard)
            if len(seen) == nth:
                raise _Killed(f"killed after writing {what} of {shard or 'the run'}")

    return hook


@pytest.mark.slow
def test_a_kill_at_every_write_boundary_resumes_to_the_same_manifest(tmp_path, ray_local, monkeypatch):
    """Fresh runs and runs that add a condition, stopped after each file a commit (or the
    manifest step) writes; every rerun ends with the manifest of an uninterrupted run."""
    from pipelines.decompose import commit

    images.write_folder(tmp_path / "in", n_good=8)
    two, three = "intensity,palette", FAST  # the update adds sketch

    computed: list[dict] = []

    def run(out: Path, conditions: str) -> dict:
        # the driver writes every file, so the hook counts them all in one process (the tasks'
        # writes: test_stages.py, test_a_task_stopped_between_its_writes_…)
        s = run_decompose(
            cfg(tmp_path / "in", out, conditions, shard_size=4, write_webdataset=True, write_in_tasks=False)
        )
        computed.append(s.computed)
        return _manifest(out)

    fresh_ref = run(tmp_path / "fresh-ref", three)
    update_ref_dir = tmp_path / "update-ref"
    run(update_ref_dir, two)
    update_ref = run(update_ref_dir, three)
    # fresh runs: a kill before a shard's state leaves nothing that counts (no state), so the
    # boundaries that matter are after a state and in the final step
    cases = [("fresh", "state", 2)] + [("fresh", w, 1) for w in ("errors.parquet", "manifest")]
    cases += [("update", w, 2) for w in ("shard", "tar", "errors", "state")]
    for kind, what, nth in cases:
        out = tmp_path / f"{kind}-{what}"
        if kind == "update":
            run(out, two)
        monkeypatch.setattr(commit, "write_hook", _kill_at(what, nth))
        with pytest.raises(_Killed):
            run(out, three)
        monkeypatch.setattr(commit, "write_hook", None)
        assert run(out, three) == (fresh_ref if kind == "fresh" else update_ref), (kind, what)
        if kind == "update":
            # a shard whose files were written after its state is computed again whole, not
            # merged with files its state does not describe
            assert ("intensity" in computed[-1]) == (what != "state"), (what, computed[-1])
        rows = all_rows(out)
        assert all(r["sketch"] is not None for r in rows.values())


@pytest.mark.slow
def test_a_replaced_input_recomputes_its_shard_only(tmp_path, ray_local):
    images.write_folder(tmp_path / "in", n_good=10, with_bad=False)
    out = tmp_path / "out"
    first = run_decompose(cfg(tmp_path / "in", out, shard_size=4))
    before = all_rows(out)
    # the same name, other pixels (and another size and modification time)
    (tmp_path / "in" / "good00.png").write_bytes(images.good_png(99, size=40))
    s = run_decompose(cfg(tmp_path / "in", out, shard_size=4))
    assert s.shards_computed == 1 and s.shards_reused == first.shards_computed - 1
    after = all_rows(out)
    assert not np.array_equal(after["good00"]["image"], before["good00"]["image"])
    assert all(np.array_equal(after[k]["image"], before[k]["image"]) for k in before if k != "good00")
    # a replaced sidecar caption too
    caption = next(p for p in (tmp_path / "in").rglob("*.txt"))
    caption.write_text("a new caption")
    s = run_decompose(cfg(tmp_path / "in", out, shard_size=4))
    assert s.shards_computed == 1
    assert "a new caption" in {r["text"] for r in all_rows(out).values()}
