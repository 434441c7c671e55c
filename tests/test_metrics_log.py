"""metrics.jsonl as a kill or a power loss leaves it: every whole row is read back, nothing else, and a continued
run keeps the rows up to its checkpoint."""

from __future__ import annotations

from pathlib import Path

from vegan_scale import metrics_log

ROWS = [{"step": 1, "train/loss": 0.5}, {"step": 2, "train/loss": 0.25}, {"step": 3, "eval/recon": 7.0}]
DAMAGE = [
    b"\x00" * 40,  # a block the file system allocated but never wrote (power loss)
    bytes(range(128, 256)),  # garbage that is not UTF-8
    b"[" * 100_000,  # nesting deeper than Python's parser follows
    b'"step"',  # JSON, but not a row
    b'{"train/loss": 1.0}',  # a mapping without its step
]


def test_whole_rows_are_read_and_damage_is_left_out(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    log = metrics_log.MetricsLog(path)
    for row in ROWS[:2]:
        log.append(row["step"], {k: v for k, v in row.items() if k != "step"})
    log.close()
    with path.open("ab") as f:
        f.write(b"\n".join(DAMAGE) + b"\n" + b'{"step": 3, "eval/recon": 7.0}\n' + b'{"step": 4, "train/lo')
    assert metrics_log.read(path) == ROWS  # the torn last line (a kill mid-write) is left out too
    metrics_log.truncate(path, 2)  # a run continued from step 2's checkpoint
    assert metrics_log.read(path) == ROWS[:2]
    assert path.read_text() == '{"step": 1, "train/loss": 0.5}\n{"step": 2, "train/loss": 0.25}\n'
