"""Every rule that combines settings is checked when the config is loaded: `echolab run` refuses a bad config in
one line, naming the file, the line and the settings, with exit code 1, before anything is written or trained.

The commands run in-process (`experiments.cli.main`, as the `echolab` script calls it), so each case takes
milliseconds; tests/test_cli_errors.py runs the same errors through real subprocesses.
"""

import json
import tomllib
from pathlib import Path

import pytest

from experiments.cli import main
from experiments.config import TomlFile, load_experiment_config
from rl.config import MITIGATION_SWITCHES, MitigationSettings, Switch, Tunes, mitigation_roles
from specialists.errors import UserError


def run_refuses(tmp_path, capsys, toml: str, *fragments: str) -> str:
    """`echolab run` on `toml`: exit 1, one line on stderr holding every fragment, no run directory."""
    config = tmp_path / "config.toml"
    config.write_text(toml)
    out = tmp_path / "run"
    code = main(["run", str(config), "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and captured.out == "", captured
    assert lines[0].startswith(f"echolab run: error: {config} line "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out.exists()  # refused before any work
    return lines[0]


# ---------------------------------------------------------------- each rule, one bad combination

UNSUPPORTED = [(algorithm, switch, value) for switch, value in [
    ("entropy_coef", 0.01), ("clip_cov", "true"), ("kl_cov", "true"), ("unlikeliness_beta", 0.25), ("pass_at_k", 2),
    ("pretrain_replay_coef", 0.5), ("format_diversity_coef", 0.5), ("freeze_router", "true"),
    ("prefix_kl_coef", 0.1), ("sequence_kl_coef", 0.1), ("format_kl_coef", 0.1), ("outcome_exploration_coef", 0.5)]
    for algorithm in ("grpo", "ppo", "ei") if algorithm not in MITIGATION_SWITCHES[switch].algorithms]


@pytest.mark.parametrize("algorithm, switch, value", UNSUPPORTED)
def test_a_mitigation_the_algorithm_does_not_implement(tmp_path, capsys, algorithm, switch, value):
    toml = f'[rl]\nalgorithm = "{algorithm}"\nsteps = 2\n[rl.mitigations]\n{switch} = {value}\n'
    run_refuses(tmp_path, capsys, toml, f"line 5: rl: algorithm '{algorithm}' does not implement mitigations.{switch}")


def test_the_unsupported_cases_cover_ppo_and_ei():  # the table above is built from MITIGATION_SWITCHES
    assert {(a, s) for a, s, _ in UNSUPPORTED} >= {("ei", "entropy_coef"), ("ei", "kl_cov"), ("ppo", "pass_at_k"),
                                                   ("ppo", "unlikeliness_beta"), ("ei", "pretrain_replay_coef")}


def test_the_unsupported_cases_try_every_switch():
    assert {switch for _, switch, _ in UNSUPPORTED} == {name for name, switch in MITIGATION_SWITCHES.items()
                                                         if set(switch.algorithms) != {"grpo", "ppo", "ei"}}


def test_a_mitigation_field_must_say_where_it_applies():
    """A field added to MitigationSettings without a Switch (its algorithms, whether it splits across processes) or
    Tunes (its switches) is refused when rl.config is imported: nothing would refuse it for the wrong algorithm."""
    from typing import Annotated

    from specialists.config import Strict

    class Forgotten(Strict):
        entropy_coef: Annotated[float, Switch(("grpo", "ppo"), data_parallel=True)] = 0.0
        new_coef: float = 0.0

    with pytest.raises(TypeError, match="Forgotten.new_coef: annotate it with a Switch"):
        mitigation_roles(Forgotten)

    class Orphan(Strict):
        entropy_coef: Annotated[float, Switch(("grpo", "ppo"), data_parallel=True)] = 0.0
        entropy_floor: Annotated[float, Tunes("entropy_coef", "entropy_cap")] = 0.0

    with pytest.raises(TypeError, match="Orphan.entropy_floor tunes entropy_cap, which is no switch"):
        mitigation_roles(Orphan)
    assert set(mitigation_roles(MitigationSettings)[0]) | set(mitigation_roles(MitigationSettings)[1]) == \
        set(MitigationSettings.model_fields)


RULES = [  # (what, TOML, fragments of the one line); the line named is the setting to change first
    ("dynamic sampling is GRPO's", '[rl]\nalgorithm = "ppo"\n[rl.grpo]\ndynamic_sampling = true\n',
     ["line 4: rl: algorithm 'ppo' does not implement grpo.dynamic_sampling (only grpo does)"]),
    ("format KL vs dynamic sampling", '[rl.grpo]\ndynamic_sampling = true\n[rl.mitigations]\nformat_kl_coef = 0.1\n',
     ["line 4: rl: mitigations.format_kl_coef measures the base model's format shares on step 0's batch"]),
    ("EI has no KL", '[rl]\nalgorithm = "ei"\nbeta = 0.1\n',
     ["line 3: rl: Expert Iteration has no KL term: set beta = 0"]),
    ("EI has no clip", '[rl]\nalgorithm = "ei"\nepsilon_high = 0.28\n',
     ["line 3: rl: Expert Iteration has no clipped ratio"]),
    ("EI has no TIS", '[rl]\nalgorithm = "ei"\ntis_cap = 2.0\n',
     ["line 3: rl: Expert Iteration has no policy-gradient loss to reweight: tis_cap does nothing"]),
    ("pass@k has no baseline", '[rl.grpo]\nbaseline = "leave_one_out"\n[rl.mitigations]\npass_at_k = 2\n',
     ["line 2: rl: mitigations.pass_at_k's advantages are computed in closed form; grpo.baseline does not apply"]),
    ("pass@k is not scaled", '[rl.mitigations]\npass_at_k = 2\n[rl.grpo]\nscale_rewards = "none"\n',
     ["line 4: rl: mitigations.pass_at_k's advantages are computed in closed form; grpo.scale_rewards does not"]),
    ("k1 is PPO's", '[rl]\nbeta = 0.1\nkl_estimator = "k1"\n',
     ["line 3: rl: kl_estimator 'k1' (KL in the reward) is PPO's"]),
    ("GRPO needs groups", '[rl.sampling]\nsamples_per_prompt = 1\n',
     ["line 2: rl: GRPO needs sampling.samples_per_prompt >= 2"]),
    ("GRPO needs sampling", '[rl.sampling]\ntemperature = 0.0\n',
     ["line 2: rl: GRPO needs sampled rollouts: sampling.temperature must be > 0"]),
    ("PPO minibatches", '[rl]\nalgorithm = "ppo"\nprompts_per_step = 2\n[rl.sampling]\nsamples_per_prompt = 2\n'
     '[rl.ppo]\nminibatches = 5\n', ["line 7: rl: ppo.minibatches (5) must be <= the completions of a step", "(4)"]),
    ("pass@k within the group", '[rl.sampling]\nsamples_per_prompt = 4\n[rl.mitigations]\npass_at_k = 8\n',
     ["line 4: rl: mitigations.pass_at_k (8) must be <= sampling.samples_per_prompt (4)"]),
    ("pass@k vs unlikeliness", '[rl.mitigations]\nunlikeliness_beta = 0.25\npass_at_k = 4\n',
     ["line 3: rl: mitigations.pass_at_k replaces the advantages", "mitigations.unlikeliness_beta"]),
    ("pass@k vs sequence KL", '[rl.mitigations]\npass_at_k = 4\nsequence_kl_coef = 0.1\n',
     ["line 2: rl: mitigations.pass_at_k replaces the advantages", "mitigations.sequence_kl_coef"]),
    ("pass@k vs format KL", '[rl.mitigations]\npass_at_k = 4\nformat_kl_coef = 0.1\n',
     ["line 2: rl: mitigations.pass_at_k replaces the advantages", "mitigations.format_kl_coef"]),
    ("pass@k vs outcome exploration", '[rl.mitigations]\npass_at_k = 4\noutcome_exploration_coef = 0.5\n',
     ["line 2: rl: mitigations.pass_at_k replaces the advantages", "mitigations.outcome_exploration_coef"]),
    ("pass@k vs format diversity", '[rl.mitigations]\npass_at_k = 4\nformat_diversity_coef = 0.5\n',
     ["line 2: rl: mitigations.pass_at_k replaces the advantages", "mitigations.format_diversity_coef"]),
    ("Clip-Cov or KL-Cov", '[rl.grpo]\nnum_iterations = 2\n[rl.mitigations]\nclip_cov = true\nkl_cov = true\n',
     ["line 5: rl: mitigations.clip_cov and mitigations.kl_cov are alternatives"]),
    ("KL-Cov needs GRPO passes", '[rl.mitigations]\nkl_cov = true\n',
     ["line 2: rl: mitigations.kl_cov needs grpo.num_iterations > 1"]),
    ("KL-Cov needs PPO passes", '[rl]\nalgorithm = "ppo"\n[rl.ppo]\nepochs = 1\nminibatches = 1\n'
     '[rl.mitigations]\nkl_cov = true\n', ["line 7: rl: mitigations.kl_cov needs ppo.epochs x ppo.minibatches > 1"]),
    ("clip-higher needs GRPO passes", 'rl.epsilon_high = 0.28\n',
     ["line 1: rl: epsilon_high needs grpo.num_iterations > 1"]),
    ("clip-higher needs PPO passes", '[rl]\nalgorithm = "ppo"\nepsilon_high = 0.28\n[rl.ppo]\nepochs = 1\n'
     'minibatches = 1\n', ["line 3: rl: epsilon_high needs ppo.epochs x ppo.minibatches > 1"]),
    ("prompt file exists", '[rl]\nprompts = "no/such/gsm8k.jsonl"\n',
     ["line 2: rl.prompts: file not found: no/such/gsm8k.jsonl"]),
    ("analysis formats resolve", '[analysis]\nformats = "no-such-formats.toml"\n',
     ["line 2: analysis.formats: unknown format set 'no-such-formats.toml'"]),
    ("RL prompts from the task", '[task]\nmax_operations = 1\nmax_value = 3\noperations = ["add"]\n'
     '[pretrain]\nnum_examples = 100\n[evaluation]\nnum_problems = 10\n[rl]\nnum_prompts = 500\n',
     # 64 names and items x 3 starts x 3 operands = 576 problems, about 80% = 460 of them train problems
     ["line 10: rl.num_prompts needs 500 distinct train problems, but the task has only about 460"]),
    ("pretraining problems from the task", '[task]\nmax_operations = 1\nmax_value = 3\noperations = ["add"]\n',
     ["line 1: pretrain.num_examples needs 24000 distinct train problems, but the task has only about 460"]),
    ("evaluation problems from the task", '[task]\nmax_operations = 1\nmax_value = 3\noperations = ["add"]\n'
     '[pretrain]\nnum_examples = 100\n[evaluation]\nnum_problems = 200\n',
     ["line 8: evaluation.num_problems needs 200 distinct eval problems, but the task has only about 115"]),
    ("task order", '[task]\nmin_operations = 3\nmax_operations = 2\n',
     ["line 2: task: min_operations must be <= max_operations"]),
    ("frozen router needs a router", '[model]\nkind = "dense"\n[rl.mitigations]\nfreeze_router = true\n',
     ["line 4: rl.mitigations.freeze_router needs a model with a router"]),
    ("router loss needs a router", '[model]\nkind = "dense"\n[rl]\nrouter_aux_loss_coef = 0.1\n',
     ["line 4: rl.router_aux_loss_coef needs a model with a router"]),
    ("bfloat16 rollouts are vLLM's", '[rl.engine]\nkind = "hf"\ndtype = "bfloat16"\n',
     ["line 3: rl.engine: dtype bfloat16 needs kind 'vllm'"]),
    ("engine dtype values", '[rl.engine]\ndtype = "bfloat61"\n',
     ["line 2: rl.engine.dtype: Input should be 'float32' or 'bfloat16' (got 'bfloat61'; did you mean 'bfloat16'?)"]),
    ("prompt template fields", '[rl]\nprompt_template = "Q: {question} = {answer}"\n',
     ["line 2: rl.prompt_template: unknown fields ['answer']"]),
    ("prompt template question", '[rl]\nsteps = 2\nprompt_template = "Solve it."\n',
     ["line 3: rl.prompt_template: it must contain {question}"]),
    ("chat template needs a base", '[rl]\nsteps = 2\nchat_template = true\n',
     ["line 3: rl.chat_template needs a model.path base with a chat template"]),
    ("a base is not pretrained", '[model]\npath = "base"\n[pretrain]\nbatch_size = 48\n',
     ["line 4: model.path brings its own base, so these pretraining settings do not apply: pretrain.batch_size"]),
    ("a base has no corpus to replay", '[model]\npath = "base"\n[rl.mitigations]\npretrain_replay_coef = 0.5\n',
     ["line 4: rl.mitigations.pretrain_replay_coef replays the pretraining corpus"]),
    ("a base must be a checkpoint", 'seed = 1\n[model]\npath = "no/such/base"\n',
     ["line 3: model.path: no/such/base is no Hugging Face checkpoint (no config.json)"]),
    ("held-out pass@k needs sampling", '[rl.evaluation]\nevery = 2\nsamples_per_problem = 4\ntemperature = 0.0\n',
     ["line 3: rl: evaluation.samples_per_problem (4) needs evaluation.temperature > 0"]),
    ("held-out problems from the task", '[task]\nmax_operations = 1\nmax_value = 3\noperations = ["add"]\n'
     '[pretrain]\nnum_examples = 100\n[evaluation]\nnum_problems = 10\n[rl.evaluation]\nevery = 1\nnum_problems = 200\n',
     ["line 11: rl.evaluation.num_problems needs 200 distinct eval problems, but the task has only about 115"]),
    ("held-out problems from the file", f'[rl]\nprompts = "{Path("specialists/data/gsm8k_excerpt.jsonl").resolve()}"\n'
     'heldout_fraction = 0.1\n[rl.evaluation]\nevery = 1\nnum_problems = 100\n',
     ["line 6: rl: evaluation.num_problems (100) needs that many held-out problems, but the prompt file's held-out "
      "split has"]),
]


@pytest.mark.parametrize("toml, fragments", [rule[1:] for rule in RULES], ids=[rule[0] for rule in RULES])
def test_each_rule_is_refused_when_the_config_is_loaded(tmp_path, capsys, toml, fragments):
    run_refuses(tmp_path, capsys, toml, *fragments)


def test_a_bad_prompt_file_is_named_with_its_line(tmp_path, capsys):
    prompts = tmp_path / "gsm8k.jsonl"
    prompts.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n{oops\n")
    run_refuses(tmp_path, capsys, f'seed = 0\n[rl]\nprompts = "{prompts}"\n',
                f"line 3: rl: prompts: {prompts} line 2: not valid JSON")


def test_the_settings_at_fault_are_named_where_the_file_sets_them(tmp_path, capsys):
    # the rule's first key (rl.beta) is at its default here, so the line of the other one (the algorithm) is named
    run_refuses(tmp_path, capsys, '[rl]\nsteps = 2\nalgorithm = "ppo"\n[rl.mitigations]\n# a comment\n\n'
                                  'pass_at_k = 2\n', "line 7: rl: algorithm 'ppo' does not implement")
    run_refuses(tmp_path, capsys, '[rl]\nalgorithm = "ppo"\nsteps = 2\n[rl.mitigations]\nunlikeliness_beta = 0.1\n',
                "line 5: rl: algorithm 'ppo' does not implement mitigations.unlikeliness_beta")


GOOD = [  # combinations the rules must let through
    '[rl]\nalgorithm = "ppo"\nbeta = 0.1\nkl_estimator = "k1"\n',
    '[rl]\nalgorithm = "ppo"\nepsilon_high = 0.28\n[rl.mitigations]\nkl_cov = true\n',  # 2 epochs x 2 minibatches
    '[rl.grpo]\nnum_iterations = 2\n[rl]\nepsilon_high = 0.28\n[rl.mitigations]\nkl_cov = true\n',
    '[rl]\nalgorithm = "ei"\n[rl.mitigations]\nfreeze_router = true\nformat_diversity_coef = 0.5\n',
    '[rl]\nalgorithm = "ei"\n[rl.sampling]\ntemperature = 0.0\nsamples_per_prompt = 1\n',
    '[rl.mitigations]\npass_at_k = 8\nclip_cov = true\nentropy_coef = 0.01\n',
    f'[rl]\nprompts = "{Path("specialists/data/gsm8k_excerpt.jsonl").resolve()}"\n[analysis]\nformats = "echo-chamber"\n',
    '[model]\nkind = "dense"\n',
    '[rl.evaluation]\nevery = 1\nsamples_per_problem = 1\ntemperature = 0.0\n',  # greedy pass@1
    '[rl.evaluation]\nevery = 0\nsamples_per_problem = 4\ntemperature = 0.0\n',  # off: nothing to refuse
]


@pytest.mark.parametrize("toml", GOOD)
def test_valid_combinations_load(tmp_path, toml):
    config = tmp_path / "config.toml"
    config.write_text(toml)
    load_experiment_config(config)


@pytest.mark.parametrize("path", sorted(Path("experiments/configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    load_experiment_config(path)


# ---------------------------------------------------------------- where a key is written

TOML = '''# a comment
name = "x"   # trailing comment
rl.steps = 3
"quoted.key" = 1

[model]
kind = "moe"
sizes = [
  1,
  "two",
]
text = """
steps = 9
"""

[rl.sampling]

temperature = 0.5
[mixture.formats.llm_code]
weight = { value = 1 }
[rl.grpo]
loss_type = "dapo"
'''


@pytest.mark.parametrize("key, line", [
    (("name",), 2),
    (("rl",), 3),  # first created by a dotted key
    (("rl", "steps"), 3),
    (("quoted.key",), 4),
    (("model",), 6),
    (("model", "sizes"), 8),  # a multi-line array: the line of its key
    (("model", "text"), 12),  # a multi-line string: its key, not the look-alike inside
    (("rl", "sampling"), 16),
    (("rl", "sampling", "temperature"), 18),
    (("mixture",), 19),  # created by a header of a sub-table
    (("mixture", "formats", "llm_code", "weight"), 20),
    (("mixture", "formats", "llm_code", "weight", "value"), 20),  # inside an inline table
    (("rl", "grpo", "loss_type"), 22),  # in a later sub-table of the dotted key's table
    (("rl", "epsilon"), None),
    (("nothing",), None),
])
def test_toml_file_finds_the_line_of_a_key(key, line):
    file = TomlFile(Path("c.toml"), TOML, tomllib.loads(TOML))
    assert file.line_of(key) == line
    assert file.where([("nothing",), key]) == (f"c.toml line {line}" if line else "c.toml")


def test_load_experiment_config_raises_one_user_error(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[rl]\nalgorithm = "ei"\nbeta = 0.5\n')
    with pytest.raises(UserError) as error:
        load_experiment_config(config)
    assert str(error.value) == f"{config} line 3: rl: Expert Iteration has no KL term: set beta = 0"


# ---------------------------------------------------------------- the README's config tables are complete

def config_sections(model, path=()):
    """(section path, its keys) for every table of an experiment config; `mixture.formats.NAME` for the formats."""
    import typing

    from pydantic import BaseModel

    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from config_sections(annotation, path + (name,))
        elif typing.get_origin(annotation) is dict and issubclass(typing.get_args(annotation)[1], BaseModel):
            yield from config_sections(typing.get_args(annotation)[1], path + (name, "NAME"))
        else:
            keys.append(name)
    yield path, keys


def test_the_readme_config_tables_name_every_section_and_key():
    from experiments.config import ExperimentConfig

    readme = Path("README.md").read_text()
    table_lines = "\n".join(line for line in readme.splitlines() if line.startswith("|"))
    for path, keys in config_sections(ExperimentConfig):
        if path and keys:  # (`mixture` holds only `mixture.formats.NAME`)
            assert f"`[{'.'.join(path)}]`" in readme, path
        for key in keys:
            assert f"`{key}`" in table_lines, (path, key)
