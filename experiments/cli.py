"""The `echolab` command line.

Every command: `--help`, progress bars on long work, and for bad input a one-line error on stderr
with exit code 1, or 2 for bad arguments (no traceback). Heavy libraries are imported inside the
commands so that `--help` and input errors answer at once.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import warnings
from pathlib import Path

EXIT_USER_ERROR = 1


def _pretrain(args: argparse.Namespace) -> None:
    from experiments.config import load_experiment_config
    from specialists.errors import UserError

    config = load_experiment_config(args.config).specialists()  # validate before the slow imports
    if config.model.path:
        raise UserError(f"{args.config}: model.path names a base that is not pretrained here; "
                        "`echolab pretrain` needs a config without it")
    from specialists.evaluate import evaluate
    from specialists.pretrain import pretrain

    out = Path(args.out)
    model_dir = pretrain(config, out, progress=not args.quiet)
    print(f"checkpoint: {model_dir}")
    if not args.skip_eval:
        result = evaluate(model_dir, config, out / "evaluation.json", progress=not args.quiet)
        shown = ("accuracy", "format_share", "format_accuracy", "reasons", "specialist_alignment")
        print(json.dumps({k: result[k] for k in shown if k in result}, indent=2))
        print(f"evaluation: {out / 'evaluation.json'}")


def _evaluate(args: argparse.Namespace) -> None:
    from experiments.config import load_experiment_config
    from specialists.errors import UserError

    experiment = load_experiment_config(args.config)
    config = experiment.specialists()
    if config.model.path:
        raise UserError(f"{args.config}: model.path names a base that is not pretrained here; `echolab evaluate` "
                        "needs the config a built-in model was pretrained with")
    heldout = None
    if experiment.rl.prompts != "synthetic":  # a prompt file: its held-out split, never an RL prompt
        heldout = experiment.rl.prompt_split().heldout
        if not heldout:
            raise UserError(f"rl.prompts is a file ({experiment.rl.prompts}) without a held-out split: set "
                            "rl.heldout_prompts or rl.heldout_fraction")
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: no such model directory")
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir}: not a model checkpoint (no config.json)")
    out = Path(args.out) if args.out else model_dir.parent / "evaluation.json"
    if not out.parent.is_dir():  # found now, not after the sampling
        raise UserError(f"--out {out}: no such directory {out.parent}")
    mismatches = _model_mismatches(config.model, model_dir)
    if mismatches:
        raise UserError(f"{model_dir} was not built from {args.config}: {'; '.join(mismatches)}")
    from specialists.evaluate import evaluate

    result = evaluate(model_dir, config, out, progress=not args.quiet, heldout=heldout,
                      prompt_template=experiment.rl.prompt_template, chat_template=experiment.rl.chat_template)
    print(json.dumps({k: result[k] for k in ("accuracy", "format_share", "format_accuracy")}, indent=2))


# Our [model] keys behind each architecture entry of a checkpoint's config.json (specialists.model.model_config).
CHECKPOINT_KEYS = {"model_type": "kind", "hidden_size": "hidden_size", "num_hidden_layers": "num_layers",
                   "num_attention_heads": "num_heads", "num_key_value_heads": "num_kv_heads", "head_dim": "head_dim",
                   "num_experts": "num_experts", "num_experts_per_tok": "experts_per_token",
                   "moe_intermediate_size": "expert_size", "intermediate_size": "expert_size x experts_per_token",
                   "max_position_embeddings": "max_length"}


def _model_mismatches(settings, model_dir: Path) -> list[str]:
    """The architecture entries where `model_dir`'s config.json differs from the one the [model] settings build
    (a checkpoint evaluated with another config would be sampled with the wrong task or compared wrongly)."""
    from specialists.errors import UserError
    from specialists.model import model_config

    try:
        found = json.loads((model_dir / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{model_dir / 'config.json'}: not valid JSON ({error})") from None
    expected = model_config(settings, vocab_size=found.get("vocab_size", 1), eos_token_id=0, pad_token_id=0).to_dict()
    mismatches = []
    for key, ours in CHECKPOINT_KEYS.items():
        if key in expected and expected[key] != found.get(key):
            mismatches.append(f"model.{ours} gives {key} = {expected[key]!r}, the checkpoint has {found.get(key)!r}")
    return mismatches


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _run(args: argparse.Namespace) -> None:
    from experiments.config import load_experiment_config

    config = load_experiment_config(args.config)
    from experiments.console import StepLine, StepZeroCheck, final_lines
    from experiments.pipeline import run_experiment

    out = Path(args.out) if args.out else Path("runs") / config.name
    observers = [] if args.quiet else [StepZeroCheck(), StepLine(config.rl.steps)]
    report = run_experiment(config, out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
                            observers=observers, processes=args.processes)
    print(f"run directory: {out}")
    for line in final_lines(out):
        print(line)
    print(f"report: {report}")


def _read_options(args: argparse.Namespace):
    """--source, --columns and --correct-from as one record (checked before any work)."""
    from analysis.sources import ReadOptions, parse_columns

    columns = parse_columns(args.columns) if args.columns is not None else None
    return ReadOptions(source=args.source, columns=columns, correct_from=args.correct_from)


def _analyze(args: argparse.Namespace) -> None:
    from analysis.summary import analyze

    summary = analyze(args.input, formats=args.formats, out_dir=args.out, collapse_threshold=args.threshold,
                      progress=not args.quiet, reading=_read_options(args))
    print(json.dumps({key: summary[key] for key in ("formats", "dominant_format", "collapse_step")}))


def _report(args: argparse.Namespace) -> None:
    from analysis.report import write_report
    from analysis.sources import open_input

    reading = _read_options(args)
    inputs = [Path(d) for d in args.inputs]
    if args.out:
        out = Path(args.out)
    elif len(inputs) == 1:
        out = open_input(inputs[0], reading).default_out_dir() / "report.html"
    else:  # a comparison is a new file: never an input's own report, nor an earlier comparison
        out = next(path for number in itertools.count(1)
                   if not (path := Path("comparison.html" if number == 1 else f"comparison-{number}.html")).exists())
    report = write_report(inputs, out, formats=args.formats, reading=reading, baseline=args.baseline,
                          progress=not args.quiet)
    print(f"report: {report}")


def _add_input_options(command: argparse.ArgumentParser) -> None:
    """How `analyze` and `report` read their inputs and label formats."""
    command.add_argument("--formats",
                         help="format set: 'synthetic', 'echo-chamber' (the real datasets' shapes, and GSM8K's #### N), "
                              "or a TOML/YAML file of your own (default: the run's configured set, else synthetic)")
    command.add_argument("--source", choices=("echolab", "verl", "trl", "table"),
                         help="what the input is (default: detected): an echolab run directory or rollout file, a "
                              "verl rollout dump (trainer.rollout_data_dir), a TRL output or completions/ folder "
                              "(log_completions=True), or any table read through --columns")
    command.add_argument("--columns", metavar="MAP",
                         help="for a table: FIELD=COLUMN pairs naming its columns, e.g. "
                              "completion=response,prompt=query,step=global_step,answer=gold (implies --source table)")
    command.add_argument("--correct-from", metavar="COLUMN",
                         help="where a row has no gold answer: correct when this column's value is > 0 "
                              "(e.g. verl's score or acc, a TRL reward function's column)")


def _sweep(args: argparse.Namespace) -> None:
    from experiments.sweep import run_sweep

    out = Path(args.out) if args.out else Path("runs") / Path(args.sweep).stem
    report = run_sweep(args.sweep, out, backend=args.backend, resume=args.resume, progress=not args.quiet)
    print(f"runs: {out / 'sweep.json'}")
    print(f"report: {report}")


class OneLineErrorParser(argparse.ArgumentParser):
    """A bad argument is reported like any other bad input: one line (argparse prints the usage too), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="echolab",
        description="Measure what RL post-training does to the diversity of a multi-specialist model: "
                    "which output formats survive, which experts carry the work, and which mitigations help.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pretrain = commands.add_parser(
        "pretrain", help="train the tokenizer and the multi-specialist model from scratch, then evaluate it",
        description="Pretrain the model on the config's format mixture (rendered synthetic problems, or each "
                    "format's `data` corpus): jointly, or for [model] kind = \"btx\" as separate specialists merged "
                    "into one MoE (Branch-Train-MiX); write an HF checkpoint to OUT/model and the per-format share "
                    "and accuracy of sampled generations (and, for an MoE, where each format's tokens are routed) "
                    "to OUT/evaluation.json.")
    pretrain.add_argument("config", help="experiment TOML (see experiments/configs/); only its pretraining part is used")
    pretrain.add_argument("--out", required=True, help="output directory")
    pretrain.add_argument("--skip-eval", action="store_true", help="do not evaluate after pretraining")
    pretrain.add_argument("--quiet", action="store_true", help="no progress bars")
    pretrain.set_defaults(handler=_pretrain)

    evaluate = commands.add_parser(
        "evaluate", help="sample a checkpoint on held-out problems: format shares and per-format accuracy",
        description="Sample one completion per held-out problem (the config's [evaluation] settings; with a prompt "
                    "file as rl.prompts, its held-out split), prompted with rl.prompt_template, and report which formats "
                    "the model uses and how accurate each is.")
    evaluate.add_argument("config", help="TOML config the model was pretrained with")
    evaluate.add_argument("model", help="HF checkpoint directory")
    evaluate.add_argument("--out", help="JSON file to write (default: next to the checkpoint)")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")
    evaluate.set_defaults(handler=_evaluate)

    run = commands.add_parser(
        "run", help="the whole experiment: pretrain (cached) -> RL -> analysis -> report",
        description="Run one experiment config: pretrain the base model (cached by the hash of its config; a "
                    "config with [model] path takes that checkpoint instead), "
                    "post-train it with the configured RL algorithm, analyse every recorded rollout, and write "
                    "the run directory (config.json, rollouts/, metrics.jsonl, checkpoints/, "
                    "heldout/ with [rl.evaluation], summary.json, report.html).")
    run.add_argument("config", help="experiment TOML (see experiments/configs/)")
    run.add_argument("--out", help="run directory (default: runs/<config name>)")
    existing = run.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true",
                          help="continue a killed run from its last checkpoint (same config only)")
    existing.add_argument("--overwrite", action="store_true",
                          help="delete what the run directory holds and start afresh")
    run.add_argument("--quiet", action="store_true",
                     help="print only the final summary lines and errors (no progress bars, no per-step lines)")
    run.add_argument("--processes", type=_positive_int, default=1, metavar="N",
                     help="data-parallel RL in N processes started here (torch.distributed, gloo), each with its "
                          "own rollout engine, rl.prompts_per_step / N of each step's prompts and 1/N of the cores; "
                          "gradients are summed across them, process 0 records. Samples and metrics equal a "
                          "1-process run's (to float rounding). GRPO and PPO; settings that cannot be split are "
                          "refused (default 1; README: 'Several processes / the GPU route')")
    run.set_defaults(handler=_run)

    analyze = commands.add_parser(
        "analyze", help="format collapse, specialist dominance and pass@k from any RL run's rollouts",
        description="INPUT is an echolab run directory or rollout file (JSONL or Parquet; one row per completion with "
                    "at least step, prompt_id, completion), a verl rollout dump directory ({step}.jsonl files), a TRL "
                    "GRPOTrainer output directory or its completions/ folder (completions_NNNNN.parquet), or any "
                    "table with --columns. Reads it step by step; writes summary.json and metrics.parquet.")
    analyze.add_argument("input", help="run directory, rollout file, verl dump, TRL output or completions/ folder, "
                                       "or table")
    _add_input_options(analyze)
    analyze.add_argument("--out", help="output directory (default: the run directory itself, else <name>_analysis/ "
                                       "beside the input)")
    analyze.add_argument("--threshold", type=float, default=0.9, help="dominant share that counts as collapse (default 0.9)")
    analyze.add_argument("--quiet", action="store_true", help="no progress bars")
    analyze.set_defaults(handler=_analyze)

    report = commands.add_parser(
        "report", help="one self-contained HTML report for one or several runs",
        description="Render one HTML file (figures embedded, no network) for anything analyze reads, one input or "
                    "several side by side; echolab runs whose configs differ only in seed are pooled with 95% "
                    "confidence bands. Inputs without an up-to-date analysis are analysed first (into the run "
                    "directory, else <name>_analysis/ beside the input).")
    report.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="what analyze reads (a run directory, rollout file, verl dump, TRL output or table); "
                             "give several to compare them")
    _add_input_options(report)
    report.add_argument("--baseline", metavar="NAME",
                        help="the group (as labelled, e.g. 'baseline' or 'baseline (3 seeds)') or input the others are "
                             "compared with (default: the first given)")
    report.add_argument("--out", help="HTML file (default: for one input, report.html in its analysis directory: the "
                                      "run directory, else <name>_analysis/; for several, a new comparison.html, or "
                                      "comparison-2.html, ..., in the current directory)")
    report.add_argument("--quiet", action="store_true", help="no progress bars (runs without an up-to-date "
                                                             "summary.json are analysed first)")
    report.set_defaults(handler=_report)

    sweep = commands.add_parser(
        "sweep", help="a grid of runs (seeds, mixtures, algorithms, mitigations) locally or on Ray",
        description="Run every combination of a sweep file's grid over its base config, one `echolab run` process "
                    "per run, locally one after another or as Ray tasks (the file's [ray] section sets the cluster "
                    "address and each run's CPU/GPU request). A failed run is reported in OUT/sweep.json without "
                    "stopping the others; finished runs are compared in OUT/report.html.")
    sweep.add_argument("sweep", help="sweep TOML (see experiments/sweeps/)")
    sweep.add_argument("--backend", choices=("local", "ray"), default="local")
    sweep.add_argument("--out", help="sweep directory (default: runs/<sweep file stem>)")
    sweep.add_argument("--resume", action="store_true",
                       help="keep finished runs, resume killed ones, start those that had not begun")
    sweep.add_argument("--quiet", action="store_true", help="no progress bars")
    sweep.set_defaults(handler=_sweep)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from experiments.console import silence_libraries
    from specialists.errors import UserError

    silence_libraries()  # before any handler imports vLLM, torch or transformers
    default_show = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        """Warnings about the input (analysis.load.InputWarning: a skipped cut line) as one line like errors."""
        if category.__name__ == "InputWarning":
            print(f"echolab {args.command}: warning: {message}", file=sys.stderr)
        else:
            default_show(message, category, filename, lineno, file, line)

    warnings.showwarning = show

    try:
        args.handler(args)
    except UserError as error:
        print(f"echolab {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as error:  # a missing file, a full disk, an unwritable output: the system's words and the path
        where = f": {error.filename}" if error.filename else ""
        print(f"echolab {args.command}: error: {error.strerror or error}{where}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
