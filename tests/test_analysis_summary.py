"""`analyze` end to end: a recorder-style run directory and the same rows as external JSONL give the same
summary.json; defaults for formats and output folders; bad input gives one-line UserErrors.

`synthetic_rollouts` and `write_run_dir` also build the report tests' runs (tests/test_report.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis.sources import read_rollouts
from analysis.summary import analyze
from specialists.run_directory import METRICS_TABLE_FILE, SUMMARY_FILE
from specialists.errors import UserError
from specialists.formats import FORMAT_SETS
from specialists.tasks import generate_problems

SPEC_KEYS = {"formats", "format_share", "dominant_format", "collapse_step", "format_entropy", "accuracy",
             "format_accuracy", "collapse_epoch", "expert_share", "expert_entropy", "dominant_expert"}


def synthetic_rollouts(seed: int = 0, steps: int = 5, prompts: int = 6, samples: int = 4,
                       winner: str = "python_function", pull: float = 1.0, layers: int = 2,
                       experts: int = 4) -> pd.DataFrame:
    """Rollouts in SPEC.md's record: the synthetic formats, drifting from an even mix at step 0 towards
    `winner` (share 1/3 + pull * 2/3 at the last step; up to 10% `other` early on), 70% of samples right;
    each format routes 85% of its tokens to its own expert, so expert load follows the format mix."""
    formats = FORMAT_SETS["synthetic"]
    names = [fmt.name for fmt in formats]
    problems = generate_problems(prompts, seed=seed, split="train")
    rng = np.random.default_rng(seed)
    rows = []
    for step in range(steps):
        progress = pull * step / max(steps - 1, 1)
        mix = np.array([(1 - progress) / 3 + (progress if name == winner else 0.0) for name in names])
        for problem in problems:
            for sample in range(samples):
                choice = int(rng.choice(len(names), p=mix))
                if rng.random() < 0.1 * (1 - progress):
                    text, choice = "I do not know.", len(names)
                else:
                    shown = problem if rng.random() < 0.7 else problems[(problems.index(problem) + 1) % len(problems)]
                    text = formats[choice].render(shown, "easy" if rng.random() < 0.5 else "hard")
                tokens = len(text.split())
                routing = np.full(experts, 0.15 / (experts - 1))
                routing[choice % experts] = 0.85
                rows.append({"step": step, "epoch": step / 4, "prompt_id": problem.id, "sample_index": sample,
                             "completion": text, "answer": problem.answer, "num_tokens": tokens,
                             "logprob": -0.8 * tokens * (1 - 0.5 * progress),
                             "expert_load": [rng.multinomial(tokens, routing).tolist() for _ in range(layers)]})
    return pd.DataFrame(rows)


def write_run_dir(table: pd.DataFrame, path: Path, config: dict) -> Path:
    """A run directory as the RL recorder writes it: config.json, rollouts/step_NNNNNN.parquet, metrics.jsonl."""
    (path / "rollouts").mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    lines = []
    for step, part in table.groupby("step"):
        pq.write_table(pa.Table.from_pandas(part, preserve_index=False), path / "rollouts" / f"step_{step:06d}.parquet")
        lines.append(json.dumps({"step": int(step), "reward": float(len(part))}))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return path


def write_jsonl(table: pd.DataFrame, path: Path) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in table.to_dict(orient="records")))
    return path


@pytest.fixture(scope="module")
def rollouts() -> pd.DataFrame:
    return synthetic_rollouts()


def test_run_directory_and_jsonl_give_identical_summaries(rollouts, tmp_path):
    run = write_run_dir(rollouts, tmp_path / "run", {"formats": "synthetic", "seed": 0})
    jsonl = write_jsonl(rollouts, tmp_path / "external.jsonl")
    from_run = analyze(run, formats=None, progress=False)
    from_file = analyze(jsonl, formats="synthetic", progress=False)
    assert from_run == from_file
    assert (run / SUMMARY_FILE).read_bytes() == (tmp_path / "external_analysis" / SUMMARY_FILE).read_bytes()
    metrics_run = pd.read_parquet(run / METRICS_TABLE_FILE)
    pd.testing.assert_frame_equal(metrics_run, pd.read_parquet(tmp_path / "external_analysis" / METRICS_TABLE_FILE))
    assert set(from_run) >= SPEC_KEYS
    assert set(metrics_run["metric"]) >= {"format_share", "pass_at_k", "expert_share", "format_expert_mi"}


def test_summary_content_is_consistent(rollouts, tmp_path):
    summary = analyze(write_jsonl(rollouts, tmp_path / "r.jsonl"), progress=False)
    assert summary["formats"] == ["python_function", "llm_code", "natural_language", "other"]
    assert summary["steps"] == [0, 1, 2, 3, 4]
    assert summary["dominant_format"] == "python_function"
    collapse = summary["collapse_step"]
    assert collapse is not None and summary["format_share"][str(collapse)]["python_function"] >= 0.9
    assert summary["collapse_epoch"] == collapse / 4
    for step, shares in summary["format_share"].items():
        assert sum(shares.values()) == pytest.approx(1.0)
        assert 0.0 <= summary["format_entropy"][step] <= 1.0
    assert summary["pass_at_k"]["0"]["1"] == pytest.approx(summary["accuracy"]["0"])
    assert set(summary["expert_share"]) == {"0", "1"}
    assert summary["dominant_expert"]["0"] == 0  # python_function's expert
    shift = summary["routing_shift"]["0"]
    assert np.allclose(np.add(shift["format_mix"], shift["routing"]), shift["total"])
    assert shift["format_mix_tv"] > shift["routing_tv"]  # the experts follow the formats here


def test_analysis_is_deterministic(rollouts, tmp_path):
    path = write_jsonl(rollouts, tmp_path / "r.jsonl")
    analyze(path, out_dir=tmp_path / "a", progress=False)
    analyze(path, out_dir=tmp_path / "b", progress=False)
    for name in (SUMMARY_FILE, METRICS_TABLE_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_given_correct_and_format_columns_are_used(tmp_path):
    table = pd.DataFrame({"step": [0, 0, 1, 1], "prompt_id": [1, 1, 1, 1],
                          "completion": ["The answer is 3.", "The answer is 4.", "x", "y"],
                          "format": [None, None, "my_format", "my_format"], "correct": [False, None, True, None],
                          "answer": [3, 3, 3, 3]})
    summary = analyze(write_jsonl(table, tmp_path / "r.jsonl"), progress=False)
    assert summary["formats"] == ["python_function", "llm_code", "natural_language", "my_format", "other"]
    assert summary["accuracy"] == {"0": 0.0, "1": 0.5}  # given False beats the grader; unknown "y" graded wrong
    assert summary["format_share"]["1"]["my_format"] == 1.0


def test_run_config_names_the_formats(tmp_path):
    table = pd.DataFrame({"step": [0, 0], "prompt_id": ["a", "a"], "completion": ["#### 5", "The answer is 5."],
                          "answer": [5, 5]})
    run = write_run_dir(table.assign(expert_load=[[[1, 0]], [[0, 1]]]), tmp_path / "run", {"formats": "echo-chamber"})
    summary = analyze(run, formats=None, progress=False)
    assert summary["formats"] == ["python_function", "llm_code", "gsm8k", "natural_language", "other"]
    assert summary["format_share"]["0"]["gsm8k"] == 0.5
    assert summary["accuracy"]["0"] == 1.0
    assert "gsm8k" not in analyze(run, formats="synthetic", progress=False)["formats"]  # --formats wins
    (run / "config.json").write_text(json.dumps({"analysis": {"formats": "echo-chamber"}}))  # the pipeline's layout
    assert "gsm8k" in analyze(run, formats=None, progress=False)["formats"]


def test_user_format_file(tmp_path):
    formats = tmp_path / "formats.toml"
    formats.write_text('[[format]]\nname = "boxed"\ndetect = \'(?s).*\\\\boxed\\{.+\\}\'\n'
                       'answer = \'\\\\boxed\\{(?P<answer>[^}]+)\\}\'\n')
    table = pd.DataFrame({"step": [0, 0], "prompt_id": [1, 1], "completion": ["so \\boxed{7}", "seven"], "answer": [7, 7]})
    summary = analyze(write_jsonl(table, tmp_path / "r.jsonl"), formats=str(formats), progress=False)
    assert summary["format_share"]["0"] == {"boxed": 0.5, "other": 0.5}
    assert summary["format_accuracy"]["0"] == {"boxed": 1.0, "other": 0.0}


@pytest.mark.parametrize(("content", "message"), [
    ("", "no rollout rows"),
    ('{"step": 0, "prompt_id": 1, "completion": "x"}\n{"step": 0, "prompt_id": 1,\n', r"r\.jsonl line 2: not valid JSON"),
    ('{"step": 0, "prompt_id": 1}\n', "missing required column 'completion'"),
    ('[1, 2]\n', r"r\.jsonl line 1: expected a JSON object"),
    ('{"step": "first", "prompt_id": 1, "completion": "x"}\n', "column 'step' must hold integers"),
    ('{"step": 0, "prompt_id": 1, "completion": 5}\n', "column 'completion' must hold strings"),
    ('{"step": 0, "prompt_id": 1, "completion": "x", "correct": "yes"}\n', "column 'correct' must hold true/false"),
    ('{"step": 0, "prompt_id": 1, "completion": "x", "expert_load": [[1, 2], [3]]}\n', "same number of layers and experts"),
])
def test_bad_input_is_a_one_line_user_error(tmp_path, content, message):
    path = tmp_path / "r.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=message) as error:
        analyze(path, progress=False)
    assert "\n" not in str(error.value)


def test_bad_paths_and_format_sets(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_rollouts(tmp_path / "missing.jsonl")
    (tmp_path / "r.csv").write_text("step,prompt_id,completion\n")
    with pytest.raises(UserError, match="must end in .jsonl or .parquet"):
        read_rollouts(tmp_path / "r.csv")
    with pytest.raises(UserError, match="not a run directory"):
        analyze(tmp_path, progress=False)
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="not a readable Parquet file"):
        read_rollouts(tmp_path / "broken.parquet")
    path = write_jsonl(pd.DataFrame({"step": [0], "prompt_id": [1], "completion": ["x"]}), tmp_path / "r.jsonl")
    with pytest.raises(UserError, match="unknown format set 'nonsense'"):
        analyze(path, formats="nonsense", progress=False)


def test_a_btx_run_config_adds_specialist_dominance(tmp_path):
    """A BTX run: expert i is format i's specialist (3 formats, 3 experts; the map named in the config) and each
    format routes 85% of its tokens there (`synthetic_rollouts`), while python_function takes over the completions."""
    config = {"model": {"kind": "btx", "num_experts": 3},
              "expert_specialists": ["python_function", "llm_code", "natural_language"]}
    run = write_run_dir(synthetic_rollouts(experts=3), tmp_path / "run", config)
    dominance = analyze(run, formats=None, progress=False)["specialist_dominance"]
    assert dominance["expert_specialists"] == ["python_function", "llm_code", "natural_language"]
    share = dominance["specialist_share"]["0"]
    assert set(share) == {"0", "4"}  # the headline keeps the first and last step; every step is in metrics.parquet
    assert share["4"]["python_function"] > share["0"]["python_function"] + 0.3  # the winner's specialist takes over
    for layer in ("0", "1"):
        assert dominance["dominant_expert_is_winner_specialist"][layer]["4"] is True
        assert all(0.7 < value < 1.0 for value in dominance["specialist_alignment"][layer]["0"].values())
    metrics = pd.read_parquet(run / METRICS_TABLE_FILE)
    assert {"specialist_share", "specialist_alignment", "dominant_expert_is_winner_specialist"} <= set(metrics["metric"])
    rows = metrics[(metrics["metric"] == "specialist_share") & (metrics["step"] == 4) & (metrics["layer"] == 0)]
    assert rows.set_index("format")["value"].to_dict() == pytest.approx(share["4"])
    (run / "config.json").write_text(json.dumps({"model": {"kind": "moe", "num_experts": 3}}))
    assert "specialist_dominance" not in analyze(run, formats=None, progress=False)  # a joint MoE has no specialists


def test_the_expert_specialist_map_from_a_run_config():
    from analysis.load import read_expert_specialists

    btx = {"model": {"kind": "btx", "num_experts": 6}, "mixture": {"formats": {"b": {}, "a": {}, "c": {}}}}
    assert read_expert_specialists(btx) == ["a", "a", "b", "b", "c", "c"]  # alphabetical, 2 experts each
    assert read_expert_specialists({"expert_specialists": ["x", "y"]}) == ["x", "y"]  # e.g. a BTX checkpoint's config
    assert read_expert_specialists({"model": {"kind": "moe"}}) is None and read_expert_specialists({}) is None
    with pytest.raises(UserError, match="non-empty list of format names"):
        read_expert_specialists({"expert_specialists": "python_function"})
