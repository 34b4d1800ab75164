"""The `echolab` command line.

Every command: `--help`, progress bars on long work, and for bad input a one-line error on stderr
with exit code 1 (no traceback). Heavy libraries are imported inside the commands so that `--help`
and input errors answer at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_USER_ERROR = 1


def _pretrain(args: argparse.Namespace) -> None:
    from experiments.config import load_specialists_config

    config = load_specialists_config(args.config)  # validate before the slow imports
    from specialists.evaluate import evaluate
    from specialists.pretrain import pretrain

    out = Path(args.out)
    model_dir = pretrain(config, out, progress=not args.quiet)
    print(f"checkpoint: {model_dir}")
    if not args.skip_eval:
        result = evaluate(model_dir, config, out / "evaluation.json", progress=not args.quiet)
        print(json.dumps({k: result[k] for k in ("accuracy", "format_share", "format_accuracy", "reasons")}, indent=2))
        print(f"evaluation: {out / 'evaluation.json'}")


def _evaluate(args: argparse.Namespace) -> None:
    from experiments.config import load_specialists_config

    config = load_specialists_config(args.config)
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"not a model checkpoint (no config.json): {model_dir}")
    from specialists.evaluate import evaluate

    out = Path(args.out) if args.out else model_dir.parent / "evaluation.json"
    result = evaluate(model_dir, config, out, progress=not args.quiet)
    print(json.dumps({k: result[k] for k in ("accuracy", "format_share", "format_accuracy")}, indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="echolab",
        description="Measure what RL post-training does to the diversity of a multi-specialist model: "
                    "which output formats survive, which experts carry the work, and which mitigations help.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pretrain = commands.add_parser(
        "pretrain", help="train the tokenizer and the multi-specialist model from scratch, then evaluate it",
        description="Jointly pretrain the model on the config's format mixture; write an HF checkpoint to "
                    "OUT/model and the per-format share and accuracy of sampled generations to OUT/evaluation.json.")
    pretrain.add_argument("config", help="TOML config (see experiments/configs/)")
    pretrain.add_argument("--out", required=True, help="output directory")
    pretrain.add_argument("--skip-eval", action="store_true", help="do not evaluate after pretraining")
    pretrain.add_argument("--quiet", action="store_true", help="no progress bars")
    pretrain.set_defaults(handler=_pretrain)

    evaluate = commands.add_parser(
        "evaluate", help="sample a checkpoint on held-out problems: format shares and per-format accuracy",
        description="Sample one completion per held-out problem (the config's [evaluation] settings) and report "
                    "which formats the model uses and how accurate each is.")
    evaluate.add_argument("config", help="TOML config the model was pretrained with")
    evaluate.add_argument("model", help="HF checkpoint directory")
    evaluate.add_argument("--out", help="JSON file to write (default: next to the checkpoint)")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")
    evaluate.set_defaults(handler=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from specialists.errors import UserError

    try:
        args.handler(args)
    except (UserError, FileNotFoundError) as error:
        print(f"echolab {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
