"""Joint pretraining on users' corpora (`[mixture.formats.NAME] data = "FILE.jsonl"`) and the BTX config: bad files
and bad combinations are refused when the config is loaded, with one line naming the file and line; the corpus
follows the mixture; the cache key follows the files' content; and a base pretrained on corpora in the real
datasets' shapes (tests/corpora.py) samples each format in proportion.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from corpora import write_corpora
from experiments.config import load_experiment_config
from processes import echolab_command, pinned_environment
from specialists.errors import UserError
from specialists.tasks import TaskSettings

HEADER = '[mixture]\nformat_set = "echo-chamber"\n\n[pretrain]\nnum_examples = 30\n'


def corpus_config(tmp_path, files: dict[str, str], extra: str = "") -> str:
    """A config whose mixture is `files` ({format: path}), 30 examples."""
    body = "".join(f'[mixture.formats.{name}]\nweight = 1.0\ndata = "{path}"\n' for name, path in files.items())
    path = tmp_path / "config.toml"
    path.write_text(HEADER + body + extra)
    return str(path)


@pytest.fixture
def corpora(tmp_path):
    return {name: str(path) for name, path in write_corpora(tmp_path, texts_per_format=20).items()}


@pytest.mark.parametrize("content, where", [
    (None, "corpus file not found"),
    ('{"text": "a"}\nnot json\n', "line 2: not valid JSON"),
    ('{"text": "a"}\n\n{"words": "b"}\n', 'line 3: no "text" string'),
    ('["text", "a"]\n', 'line 1: expected an object like {"text": "..."}, got list'),
    ('{"text": 5}\n', 'line 1: no "text" string'),
    ('{"text": "  "}\n', 'line 1: the "text" is empty'),
    ("", "no texts (the file is empty)"),
    (b'{"text": "\xff"}\n', "line 1: not UTF-8 text"),
])
def test_a_bad_corpus_file_is_refused_when_the_config_loads(tmp_path, corpora, content, where):
    bad = tmp_path / "bad.jsonl"
    if isinstance(content, bytes):
        bad.write_bytes(content)
    elif content is not None:
        bad.write_text(content)
    config = corpus_config(tmp_path, {**corpora, "gsm8k": str(bad)})
    with pytest.raises(UserError) as error:
        load_experiment_config(config)
    message = str(error.value)
    assert "\n" not in message and "mixture.formats.gsm8k.data" in message and f"{bad}" in message and where in message


def test_the_cli_refuses_a_bad_corpus_in_one_line_before_any_work(tmp_path, corpora):
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"txt": "b"}\n')
    config = corpus_config(tmp_path, {**corpora, "gsm8k": str(tmp_path / "bad.jsonl")})
    result = subprocess.run(echolab_command("pretrain", config, "--out", str(tmp_path / "out")),
                            capture_output=True, text=True, env=pinned_environment())
    assert result.returncode == 1 and not (tmp_path / "out").exists()
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("echolab pretrain: error: ")
    assert "bad.jsonl line 2" in result.stderr


@pytest.mark.parametrize("formats, extra, message", [
    ({"python_function": "data", "gsm8k": None}, "", "formats ['gsm8k'] need a `data` file"),
    ({"python_function": "data", "boxed": None}, "", "unknown format 'boxed'; format set 'echo-chamber' has"),
    ({"python_function": "data"}, "", "has 20 texts, the mixture needs 30 distinct ones"),  # 30 examples, 1 format
    ({"python_function": "data", "llm_code": "data", "gsm8k": "data"}, '\n[btx]\nmix_train = "all"\n',
     'the [btx] section needs model.kind = "btx"'),
    ({"python_function": "data", "llm_code": "data", "gsm8k": "data"}, '\n[model]\nkind = "btx"\nnum_experts = 4\n',
     "num_experts = 4 must be a multiple of the mixture's 3 formats"),
])
def test_bad_combinations_are_refused_when_the_config_loads(tmp_path, corpora, formats, extra, message):
    body = "".join(f'[mixture.formats.{name}]\nweight = 1.0\n' + (f'data = "{corpora[name]}"\n' if data else "")
                   for name, data in formats.items())
    path = tmp_path / "config.toml"
    path.write_text(HEADER + body + extra)
    with pytest.raises(UserError) as error:
        load_experiment_config(path)
    assert message in str(error.value) and str(error.value).startswith(f"{path} line ")


def test_difficulty_is_refused_with_a_data_file(tmp_path, corpora):
    text = open(corpus_config(tmp_path, corpora)).read()
    (tmp_path / "config.toml").write_text(text.replace(f'data = "{corpora["llm_code"]}"',
                                                       f'data = "{corpora["llm_code"]}"\ndifficulty = "hard"'))
    with pytest.raises(UserError, match="mixture.formats.llm_code: difficulty applies to rendered synthetic problems"):
        load_experiment_config(tmp_path / "config.toml")


def test_the_corpus_follows_the_mixture_with_texts_from_the_files(tmp_path, corpora):
    from specialists.pretrain import build_corpus

    config = corpus_config(tmp_path, {"python_function": corpora["python_function"], "gsm8k": corpora["gsm8k"]},
                           '\n[mixture.formats.natural_language]\nweight = 2.0\n')
    text = open(config).read().replace(f'data = "{corpora["gsm8k"]}"', f'data = "{corpora["gsm8k"]}"\nrepeat = 3')
    (tmp_path / "config.toml").write_text(text)
    specialists = load_experiment_config(tmp_path / "config.toml").specialists()
    examples = build_corpus(specialists)
    by_format = {name: [e for e in examples if e.format == name] for name in ("python_function", "gsm8k", "natural_language")}
    # 30 examples at weights 1 : 1 : 2 -> 8, 8, 15 (rounded); gsm8k with repeat 3: ceil(8 / 3) = 3 distinct texts
    assert [len(part) for part in by_format.values()] == [8, 8, 15]
    files = {name: [json.loads(line)["text"] for line in open(corpora[name])] for name in ("python_function", "gsm8k")}
    assert all(e.prompt == "" and e.text.removesuffix("<|endoftext|>") in files[e.format]
               for e in by_format["python_function"] + by_format["gsm8k"])
    assert len({e.text for e in by_format["python_function"]}) == 8 and len({e.text for e in by_format["gsm8k"]}) == 3
    assert all(e.prompt.startswith("Question:") for e in by_format["natural_language"])  # rendered, as before
    assert build_corpus(specialists) == examples  # seeded


def test_the_cache_key_follows_the_corpus_content_and_the_btx_settings(tmp_path, corpora):
    config = load_experiment_config(corpus_config(tmp_path, corpora)).specialists()
    identity = config.base_identity()
    assert "btx" not in identity and set(identity["corpus_sha256"]) == set(corpora)
    with open(corpora["gsm8k"], "a") as handle:  # an edited corpus is another base
        handle.write(json.dumps({"text": "Question: one more?\nAnswer:\n#### 1"}) + "\n")
    assert type(config).model_validate(config.model_dump()).base_identity() != identity
    btx = load_experiment_config(corpus_config(tmp_path, corpora, '\n[model]\nkind = "btx"\nnum_experts = 6\n')).specialists()
    router_only = btx.base_identity()
    assert router_only["btx"] == {"seed_fraction": 0.1, "mix_fraction": 0.1, "mix_train": "router"}
    assert btx.model_copy(update={"btx": btx.btx.model_copy(update={"mix_train": "all"})}).base_identity() != router_only


@pytest.mark.integration
def test_a_base_pretrained_on_corpora_samples_formats_as_the_mixture(tmp_path):
    """Done when (issue 11): an even mixture of three corpora in the real datasets' shapes (TinyGSM functions,
    OpenMathInstruct-1 code blocks, GSM8K prose; one-operation problems) pretrains the tiny joint MoE, whose
    held-out samples (temperature 1) use each format at least 10% of the time.

    The slowest test here: the model must learn three templates end to end (150 steps of 32 texts; about 25 min
    on the shared, heavily loaded 2-core machine, 6.5 min of CPU time). In a trial at this size the shares were
    0.28 / 0.19 / 0.38 on 32 problems (other 0.16); half the steps left half the samples malformed."""
    from specialists.evaluate import evaluate
    from specialists.pretrain import pretrain

    paths = write_corpora(tmp_path, texts_per_format=1600, task=TaskSettings(min_operations=1, max_operations=1))
    body = "".join(f'[mixture.formats.{name}]\nweight = 1.0\ndata = "{path}"\n' for name, path in paths.items())
    (tmp_path / "config.toml").write_text(
        '[task]\nmax_operations = 1\n\n[mixture]\nformat_set = "echo-chamber"\n\n' + body +
        '[model]\nhidden_size = 64\nnum_layers = 2\nnum_heads = 2\nnum_kv_heads = 1\nexpert_size = 128\n'
        '[pretrain]\nnum_examples = 4800\nbatch_size = 32\nlearning_rate = 1e-2\n'
        '[evaluation]\nnum_problems = 64\nmax_new_tokens = 128\n')
    config = load_experiment_config(tmp_path / "config.toml").specialists()
    result = evaluate(pretrain(config, tmp_path / "base", progress=False), config, progress=False)
    shares = result["format_share"]
    assert all(shares[name] >= 0.1 for name in ("python_function", "llm_code", "gsm8k")), shares
    assert set(result["format_expert_affinity"]["0"]) <= set(shares)
