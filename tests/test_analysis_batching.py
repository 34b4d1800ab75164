"""The analysis' fast paths give exactly what the plain ones give, on completions in the real datasets' shapes:
grading a batch (each (format, answer, gold) judged once) against grading one completion at a time; pipelined
batches (the sandbox running one batch while the next is read) against one batch; JSONL read in blocks by Arrow
against line by line; the natural-language answer searched on the last line against the whole text."""

from __future__ import annotations

import dataclasses
import json
import random

import pandas as pd
import pytest

import analysis.load
import analysis.summary
from analysis.sources import read_rollouts
from analysis.summary import analyze
from specialists.errors import UserError
from specialists.formats import NATURAL_LANGUAGE, load_formats
from specialists.grading import grade_completions
from specialists.run_directory import METRICS_TABLE_FILE
from specialists.sandbox import Sandbox
from tests.real_runs import planned_rows, write_verl_dump

ECHO = "echo-chamber"


def test_grading_a_batch_matches_grading_one_at_a_time():
    rows = planned_rows(first_step=1)  # 128 completions: every real shape, right and wrong, and garbage
    texts = [row["completion"] for row in rows]
    golds = [str(int(row["problem"].answer)) for row in rows]
    # repeats with other golds (the same answer judged against several), no gold, and a LaTeX gold
    texts += texts[:40] + texts[40:50]
    golds += [str(int(gold) + 1) for gold in golds[:40]] + [None] * 5 + ["\\frac{2}{1}"] * 5
    formats = load_formats(ECHO)
    with Sandbox(workers=2) as sandbox:
        together = grade_completions(texts, golds, formats, sandbox)
        alone = [grade_completions([text], [gold], formats, sandbox)[0] for text, gold in zip(texts, golds, strict=True)]
    assert together == alone
    assert {grade.reason for grade in together} == {"correct", "wrong", "no_answer"}
    assert {grade.format for grade in together} == {"python_function", "llm_code", "gsm8k", "natural_language", "other"}


def test_pipelined_batches_give_the_metrics_of_one_batch(tmp_path, monkeypatch):
    dump = write_verl_dump(tmp_path / "dump")
    whole = analyze(dump, formats=ECHO, out_dir=tmp_path / "whole", progress=False)  # 128 rows: one batch
    monkeypatch.setattr(analysis.summary, "BATCH_ROWS", 1)  # every step a batch of its own: four, pipelined
    stepwise = analyze(dump, formats=ECHO, out_dir=tmp_path / "stepwise", progress=False)
    assert stepwise == whole
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "stepwise" / METRICS_TABLE_FILE),
                                  pd.read_parquet(tmp_path / "whole" / METRICS_TABLE_FILE))
    assert whole["format_counts"]["1"] == {"python_function": 8, "llm_code": 8, "gsm8k": 2, "natural_language": 6,
                                           "other": 8}


def _read_line_by_line(monkeypatch, path) -> pd.DataFrame:
    with monkeypatch.context() as patched:
        patched.setattr(analysis.load, "_arrow_records", lambda *args, **kwargs: None)
        return read_rollouts(path)


def test_jsonl_blocks_read_by_arrow_match_reading_line_by_line(tmp_path, monkeypatch):
    by_arrow = []  # per block read: whether Arrow read it
    arrow_records = analysis.load._arrow_records

    def counted(*args, **kwargs):
        records = arrow_records(*args, **kwargs)
        by_arrow.append(records is not None)
        return records

    monkeypatch.setattr(analysis.load, "_arrow_records", counted)
    dump = write_verl_dump(tmp_path / "dump")
    pd.testing.assert_frame_equal(read_rollouts(dump), _read_line_by_line(monkeypatch, dump))
    assert by_arrow == [True] * 4  # one block per step file
    records = [
        {"step": 0, "prompt_id": "p1", "completion": "def f():", "answer": "5", "correct": True, "reward": 1},
        {"step": 0, "prompt_id": "p1", "completion": "The answer is 6.", "answer": "6", "correct": None, "reward": 0.5},
        {"step": 1, "prompt_id": "p2", "completion": "x", "answer": None, "correct": False},
        {"step": 1, "prompt_id": "p2", "completion": "é \\boxed{1}", "answer": "\\frac{1}{2}", "format": "other"},
    ]
    lines = [json.dumps(record) for record in records]
    cases = {  # file -> (text, read by Arrow)
        "flat.jsonl": ("".join(line + "\n" for line in lines), True),
        "no_last_newline.jsonl": ("\n".join(lines), True),
        "blank_lines.jsonl": ("\n".join(lines) + "\n\n  \n", False),  # Arrow skips blank lines
        "nested.jsonl": ("".join(json.dumps({**record, "expert_load": [[1, 2], [3, 4]]}) + "\n" for record in records),
                         False),
        "dates.jsonl": ("".join(json.dumps({**record, "completion": f"2024-05-0{index + 1} 10:00"}) + "\n"
                                for index, record in enumerate(records)), False),  # Arrow reads timestamps
    }
    for name, (text, arrow) in cases.items():
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        by_arrow.clear()
        fast = read_rollouts(path)
        assert by_arrow[-1] == arrow, name
        assert len(fast) == len(records)
        pd.testing.assert_frame_equal(fast, _read_line_by_line(monkeypatch, path), obj=name)


def test_a_verl_record_without_a_key_is_refused_by_both_readers(tmp_path, monkeypatch):
    dump = write_verl_dump(tmp_path / "dump")
    lines = (dump / "2.jsonl").read_text(encoding="utf-8").splitlines()
    record = json.loads(lines[5])
    del record["acc"]  # Arrow would read the block with a null there
    lines[5] = json.dumps(record)
    (dump / "2.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for read in (read_rollouts, lambda path: _read_line_by_line(monkeypatch, path)):
        with pytest.raises(UserError, match=r"2\.jsonl line 6: mixed schemas: .*1\.jsonl line 1's \(missing acc\)"):
            read(dump)


@pytest.mark.parametrize("seed", range(3))
def test_the_natural_language_answer_is_found_on_the_last_line_as_in_the_whole_text(seed):
    whole_text = dataclasses.replace(NATURAL_LANGUAGE, answer_on_last_line=False)
    rng = random.Random(seed)
    pieces = ["The answer is ", "the final answer is: ", "\\boxed{", "}", "\n", "$", "18", "-3.5", " ", "x", "\\(",
              "\\)", ".", "\\frac{1}{2}"]
    texts = [row["completion"] for row in planned_rows(first_step=1)]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 14))) for _ in range(5000)]
    found = [NATURAL_LANGUAGE.written_answer(text) for text in texts]
    assert found == [whole_text.written_answer(text) for text in texts]
    assert sum(answer is not None for answer in found) > 500
