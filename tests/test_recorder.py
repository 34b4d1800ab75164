"""The recorder under crashes and a full disk: files are whole or absent, a cut metrics line is dropped."""

import errno
import json
import os

import pytest

from rl.recorder import Recorder, Rollout


def rollout(step: int) -> Rollout:
    return Rollout(step=step, epoch=0.0, prompt_id="p0", sample_index=0, prompt="q", completion="42", answer="42",
                   reward=1.0, correct=True, format="natural_language", reason="correct", num_tokens=2, logprob=-1.0)


def full_disk_at(path):
    """Make the next write to `path` fail as on a full disk: the file is a link to /dev/full."""
    os.symlink("/dev/full", path)


def test_a_full_disk_leaves_no_rollout_file_and_names_the_file(tmp_path):
    recorder = Recorder(tmp_path)
    recorder.write_rollouts(0, [rollout(0)])
    final = tmp_path / "rollouts" / "step_000001.parquet"
    full_disk_at(final.with_name(final.name + ".tmp"))
    with pytest.raises(OSError) as raised:
        recorder.write_rollouts(1, [rollout(1)])
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(final)
    assert sorted(p.name for p in (tmp_path / "rollouts").iterdir()) == ["step_000000.parquet"]


def test_a_full_disk_keeps_the_old_config(tmp_path):
    recorder = Recorder(tmp_path)
    recorder.write_config({"seed": 0})
    full_disk_at(tmp_path / "config.json.tmp")
    with pytest.raises(OSError, match="No space left on device"):
        recorder.write_config({"seed": 1})
    assert json.loads((tmp_path / "config.json").read_text()) == {"seed": 0}


def test_a_cut_metrics_line_is_dropped_and_forgetting_keeps_earlier_steps(tmp_path):
    recorder = Recorder(tmp_path)
    for step in range(3):
        recorder.write_metrics(step, {"loss": float(step)})
    with (tmp_path / "metrics.jsonl").open("a") as handle:
        handle.write('{"loss": 3.0, "st')  # a kill in the middle of the write of step 3
    assert [line["step"] for line in recorder.metrics_lines()] == [0, 1, 2]
    recorder.forget_from(2)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"loss": 0.0, "step": 0}\n{"loss": 1.0, "step": 1}\n'


def test_forgetting_removes_later_steps_and_leftover_partial_files(tmp_path):
    recorder = Recorder(tmp_path)
    for step in range(3):
        recorder.write_rollouts(step, [rollout(step)])
    (tmp_path / "rollouts" / "step_000003.parquet.tmp").write_bytes(b"half")  # a kill mid-write
    recorder.forget_from(1)
    assert sorted(p.name for p in (tmp_path / "rollouts").iterdir()) == ["step_000000.parquet"]


def test_last_checkpoint_ignores_a_partial_one(tmp_path):
    recorder = Recorder(tmp_path)
    (tmp_path / "checkpoints" / "step_000002").mkdir()
    (tmp_path / "checkpoints" / "step_000004.tmp").mkdir()  # killed while saving
    assert recorder.last_checkpoint() == (2, tmp_path / "checkpoints" / "step_000002")
