"""Planning a folder from one walk: the same units as statting every image and its sidecar."""

from pathlib import Path

from pipelines.data import sources
from tests.helpers.images import write_folder


def test_one_walk_plans_as_statting_every_file(tmp_path):
    write_folder(tmp_path)
    (tmp_path / "no-caption.png").write_bytes((tmp_path / "good00.png").read_bytes())
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "skipped.png").write_bytes(b"x")
    (tmp_path / "odd.txt").mkdir()  # a folder where a sidecar would be: stat it, as before
    (tmp_path / "odd.png").write_bytes(b"y")

    plan = sources.plan(str(tmp_path), shard_size=4)

    members = [m for u in plan.units for m in u.members]
    assert members == sorted(members) and ".hidden/skipped.png" not in members
    assert {"no-caption.png", "odd.png", "sub/good01.png"} <= set(members)
    for unit in plan.units:
        expected = [
            s
            for m in unit.members
            for s in (sources._stat(tmp_path / m), sources._stat((tmp_path / m).with_suffix(".txt")))
        ]
        assert list(unit.stats) == expected
    by_member = dict(
        zip(
            members,
            [s for u in plan.units for s in zip(u.stats[::2], u.stats[1::2], strict=True)],
            strict=True,
        )
    )
    assert by_member["no-caption.png"][1] == (-1, -1)
    assert by_member["sub/good01.png"][1][0] == len("caption of good01\n")
    assert by_member["odd.png"][1] != (-1, -1)
    assert sources.WorkUnit.from_json(plan.units[0].to_json()) == plan.units[0]


def test_format_detection_shares_the_walk(tmp_path):
    write_folder(tmp_path, with_bad=False)
    listing = sources._Listing.of(tmp_path)
    assert sources.detect_format(str(tmp_path), listing) == "folder"
    (tmp_path / "sub" / "a.tar").write_bytes(b"")
    assert sources.detect_format(str(tmp_path)) == "webdataset"
    assert sources._Listing.of(Path(tmp_path)).matching((".tar",)) == ["sub/a.tar"]
