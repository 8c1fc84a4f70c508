"""`stillhouse data build|curate|corrections`, `label`, `teacher compare`, `train`, `eval`, `ablate`, `sweep`, `review`.

Each takes a run config (``--config run.yaml``; else the run's saved ``runs/<name>/config.json``;
else defaults from the task) and flags that override single fields of it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# flag -> (dotted config field, type, help)
_COMMON = {
    "--task": ("task", str, "task name (demo) or task YAML file"),
    "--base": ("base", str, "base model: tiny, gemma-3-270m, or a local HF directory"),
    "--runs-dir": ("runs_dir", str, "where run directories live (default ./runs)"),
}
_DATA = {
    "--source": ("data.source", str, "generator, a .jsonl/.csv file, a saved HF datasets directory, or request-log:PATH / request-log:postgresql://..."),
    "--train-size": ("data.train_size", int, "rows the task generator makes for training"),
    "--test-size": ("data.test_size", int, "held-out rows the task generator makes"),
    "--data-seed": ("data.seed", int, "seed of the generator and the split"),
}
_CURATION = {
    "--dedup-threshold": ("curation.dedup_threshold", float, "MinHash Jaccard threshold for near-duplicates"),
    "--max-label-ratio": ("curation.max_label_ratio", float, "cap each label at this multiple of the rarest"),
    "--max-per-label": ("curation.max_per_label", int, "cap on training rows per label"),
}
_TRAIN = {
    "--rank": ("lora.rank", int, "LoRA rank (servable: 8, 16, 32, 64)"),
    "--alpha": ("lora.alpha", float, "LoRA alpha"),
    "--dropout": ("lora.dropout", float, "LoRA dropout"),
    "--profile": ("lora.profile", str, "servability profile: strict, lorax, vllm"),
    "--lr": ("train.lr", float, "peak learning rate"),
    "--epochs": ("train.epochs", float, "epochs (ignored when --max-steps is set)"),
    "--max-steps": ("train.max_steps", int, "optimiser steps"),
    "--batch-size": ("train.batch_size", int, "rows per micro-batch"),
    "--grad-accum": ("train.grad_accum", int, "micro-batches per optimiser step"),
    "--seed": ("train.seed", int, "training seed"),
    "--save-every": ("train.save_every", int, "checkpoint every N steps"),
    "--log-every": ("train.log_every", int, "progress line every N steps"),
    "--max-length": ("train.max_length", int, "longest prompt + completion in tokens (longer rows are skipped)"),
    "--packing": ("train.packing", "switch", "on/off: pack each micro-batch into rows of up to --max-length tokens"),
    "--kd-ratio": ("train.kd_ratio", float, "logit distillation weight r: (1-r)*CE + r*KL on the teacher's top-k (0: text only)"),
    "--kd-top-k": ("train.kd_top_k", int, "teacher tokens per position for logit distillation (asked for while labelling)"),
    "--registry": ("registry", str, "adapter registry directory (default $STILLHOUSE_HOME/registry)"),
}
_TEACHER = {
    "--teacher-url": ("teacher.url", str, "teacher endpoint URL (LoRAX root, or OpenAI .../v1)"),
    "--teacher-protocol": ("teacher.protocol", str, "lorax or openai"),
    "--teacher-model": ("teacher.model", str, "teacher adapter id / model name (empty: the base)"),
    "--teacher-concurrency": ("teacher.concurrency", int, "requests in flight to the teacher"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="build and curate a run's dataset")
    data_commands = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    build = data_commands.add_parser("build", help="read the source (task generator, JSONL, CSV, HF datasets directory, request log) into the run")
    _add_flags(build, _COMMON, _DATA)
    build.set_defaults(handler=_build)
    curate = data_commands.add_parser(
        "curate", help="filter, dedup, split, check teacher self-consistency, rank and balance; write the dataset card"
    )
    _add_flags(curate, _COMMON, _DATA, _CURATION, _TEACHER)
    curate.set_defaults(handler=_curate)

    corrections = data_commands.add_parser("corrections", help="export rows worth a human's look; import their labels as gold overrides")
    corrections_commands = corrections.add_subparsers(dest="corrections_command", metavar="ACTION", required=True)
    export = corrections_commands.add_parser("export", help="write disagreements, low-confidence and split-vote rows to a CSV/JSONL to edit")
    _add_flags(export, _COMMON)
    export.add_argument("--out", type=Path, default=None, help="the file to write, .csv or .jsonl (default runs/<name>/corrections/review.csv)")
    export.add_argument("--low-fraction", type=float, default=0.1, help="share of labelled rows with the lowest teacher log-probability per token to include")
    export.add_argument("--limit", type=int, default=None, help="write at most N rows")
    export.set_defaults(handler=_corrections_export)
    imports = corrections_commands.add_parser("import", help="apply the labels of an edited export as gold overrides (recorded in the dataset card)")
    _add_flags(imports, _COMMON)
    imports.add_argument("file", type=Path, help="the edited .csv or .jsonl")
    imports.add_argument("--by", default=None, help="who made the corrections (default: the current user)")
    imports.set_defaults(handler=_corrections_import)

    teacher = subparsers.add_parser("teacher", help="compare teacher variants on gold rows and choose the one to label with")
    teacher_commands = teacher.add_subparsers(dest="teacher_command", metavar="ACTION", required=True)
    compare = teacher_commands.add_parser("compare", help="score teacher variants (each changes one thing) on gold rows; mark the best")
    _add_flags(compare, _COMMON, _DATA, _TEACHER)
    compare.add_argument("--variants", type=Path, default=None, help="YAML file: variants: [{name, base, <one change>}, ...]")
    compare.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE",
                         help="a variant changing one thing, repeatable: shots=6, selection=balanced, constrain=true, temperature=0.5, "
                              "votes=5, instruction='...', endpoint.model=NAME")
    compare.add_argument("--gold", default="run", help="gold rows: run (the run's test rows), generator, corrections, or a labelled .jsonl/.csv")
    compare.add_argument("--limit", type=int, default=None, help="score only the first N gold rows")
    compare.add_argument("--apply", nargs="?", const="best", default=None, metavar="VARIANT",
                         help="write the best variant (or the one named) into the run config `stillhouse label` uses")
    compare.set_defaults(handler=_teacher_compare)

    label = subparsers.add_parser("label", help="label the run's rows with a teacher endpoint (resumable)")
    _add_flags(label, _COMMON, _TEACHER)
    label.add_argument("--relabel", action="store_true", help="ask the teacher for rows that already have an output")
    label.set_defaults(handler=_label)

    train = subparsers.add_parser("train", help="train a servable LoRA adapter and register it")
    _add_flags(train, _COMMON, _DATA, _CURATION, _TRAIN, _TEACHER)
    train.set_defaults(handler=_train)

    evaluate = subparsers.add_parser("eval", help="score an endpoint+adapter on the run's test split (with 95%% CIs)")
    _add_flags(evaluate, _COMMON)
    evaluate.add_argument("--url", required=True, help="endpoint URL (LoRAX root, or OpenAI .../v1)")
    evaluate.add_argument("--protocol", choices=["lorax", "openai"], default="lorax")
    evaluate.add_argument("--adapter", default=None, help="adapter id to evaluate (default: the run's registered adapter)")
    evaluate.add_argument("--with-teacher", action="store_true", help="also score the teacher as it labels: the run's teacher endpoint (else the base of --url) and teacher variant")
    evaluate.add_argument("--limit", type=int, default=None, help="evaluate only the first N test rows")
    evaluate.add_argument("--concurrency", type=int, default=4)
    evaluate.add_argument("--judge-url", default=None, help="LLM judge endpoint for the task's judge criterion (LoRAX root, or OpenAI .../v1)")
    evaluate.add_argument("--judge-protocol", choices=["lorax", "openai"], default="lorax")
    evaluate.add_argument("--judge-model", default=None, help="judge adapter id / model name (empty: the base)")
    evaluate.set_defaults(handler=_eval)

    ablate = subparsers.add_parser("ablate", help="train on nested fractions of the data, fit a power law, extrapolate to 2x")
    _add_flags(ablate, _COMMON, _DATA, _CURATION, _TRAIN, _TEACHER)
    ablate.add_argument("--fractions", default="5,10,25,50,75,100", help="percentages of the training split (default 5,10,25,50,75,100)")
    ablate.add_argument("--eval-limit", type=int, default=None, help="score only the first N test rows")
    ablate.set_defaults(handler=_ablate)

    sweep = subparsers.add_parser("sweep", help="vary one parameter at a time from a base config; all servable, sorted table")
    _add_flags(sweep, _COMMON, _DATA, _CURATION, _TRAIN, _TEACHER)
    sweep.add_argument("--vary", action="append", default=[], required=True, metavar="NAME=V1,V2",
                       help="parameter and values, repeatable (rank, alpha, dropout, targets=q_proj+v_proj, lr, epochs, max_steps, ...)")
    sweep.add_argument("--eval-limit", type=int, default=None, help="score only the first N test rows")
    sweep.set_defaults(handler=_sweep)

    review = subparsers.add_parser("review", help="error review of a run's evaluation: confusion matrix, worst examples, curation trace")
    review.add_argument("--name", required=True, help="run name (runs/<name>/)")
    review.add_argument("--runs-dir", default="runs", help="where run directories live (default ./runs)")
    review.add_argument("--worst", type=int, default=20, help="wrong predictions to list")
    review.add_argument("--eval", type=Path, default=None, help="evaluation output to review (default runs/<name>/eval/student.json)")
    review.add_argument("--teacher-eval", type=Path, default=None, help="teacher's evaluation output (default runs/<name>/eval/teacher.json)")
    review.set_defaults(handler=_review)


def _add_flags(parser: argparse.ArgumentParser, *groups: dict) -> None:
    parser.add_argument("--config", type=Path, default=None, help="run config YAML (flags override it)")
    parser.add_argument("--name", default=None, help="run name (runs/<name>/, and the registered adapter's name)")
    for group in groups:
        for flag, (field, kind, text) in group.items():
            metavar = flag.lstrip("-").replace("-", "_").upper()
            if kind == "switch":
                parser.add_argument(flag, type=_switch, default=None, dest=field.replace(".", "__"), metavar="on|off", help=text)
            else:
                parser.add_argument(flag, type=kind, default=None, dest=field.replace(".", "__"), metavar=metavar, help=text)


def _switch(text: str) -> bool:
    """``on``/``off`` (also true/false, yes/no, 1/0) as a bool."""
    value = text.strip().lower()
    if value in ("on", "true", "yes", "1"):
        return True
    if value in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not on or off")


def _config(args: argparse.Namespace):
    """The run config: --config, else the run's saved config, else defaults; then flag overrides."""
    from training.config import load_config

    overrides = {key.replace("__", "."): value for key, value in vars(args).items() if "__" in key or key in ("task", "base", "runs_dir", "registry")}
    overrides = {key: value for key, value in overrides.items() if value is not None}
    if args.name:
        overrides["name"] = args.name
    path = args.config
    if path is None and args.name:
        saved = Path(overrides.get("runs_dir", "runs")) / args.name / "config.json"
        path = saved if saved.is_file() else None
    if path is None and "name" not in overrides:
        raise SystemExit("stillhouse: pass --name NAME (or --config FILE with a name)")
    return load_config(path, overrides)


def _run(function) -> int:
    """Run a stage; configuration and data errors print one message and exit 2."""
    from training.config import ConfigError
    from training.dataset import DatasetError
    from training.task import TaskError
    from training.corrections import CorrectionsError
    from training.lora import NotServableConfigError

    try:
        function()
    except (ConfigError, TaskError, DatasetError, NotServableConfigError, CorrectionsError) as error:
        print(f"stillhouse: {error}", file=sys.stderr)
        return 2
    return 0


def _build(args: argparse.Namespace) -> int:
    from training import recipe
    from training.task import load_task

    def run():
        config = _config(args)
        recipe.build(config, load_task(config.task), recipe.stderr)

    return _run(run)


def _curate(args: argparse.Namespace) -> int:
    from training import recipe
    from training.task import load_task

    def run():
        config = _config(args)
        task = load_task(config.task)
        recipe.prepare_curation(config, task, recipe.stderr)
        card = recipe.curate(config, task, recipe.stderr)
        print(f"{config.run_dir / 'data' / 'card.md'}: train {card['splits']['train']['rows']} rows, test {card['splits']['test']['rows']} rows")

    return _run(run)


def _label(args: argparse.Namespace) -> int:
    from training import recipe
    from training.config import ConfigError
    from training.task import load_task

    def run():
        config = _config(args)
        if config.teacher is None:
            raise ConfigError("no teacher: pass --teacher-url URL (or set teacher.url in the run config)")
        recipe.label_rows(config, load_task(config.task), config.teacher, recipe.stderr, relabel=args.relabel)

    return _run(run)


def _corrections_export(args: argparse.Namespace) -> int:
    from training import corrections, recipe
    from training.task import load_task

    def run():
        config = _config(args)
        out = args.out or config.run_dir / "corrections" / "review.csv"
        records = corrections.export(config.run_dir, load_task(config.task), out, args.low_fraction, args.limit)
        reasons = ", ".join(f"{reason} {sum(reason in r['reasons'].split(';') for r in records)}" for reason in corrections.REASONS)
        recipe.stderr(f"{len(records)} rows worth a look ({reasons}); fill the label column and run "
                      f"`stillhouse data corrections import {out} --name {config.name}`")
        print(out)

    return _run(run)


def _corrections_import(args: argparse.Namespace) -> int:
    from training import corrections, recipe
    from training.task import load_task

    def run():
        config = _config(args)
        record = corrections.import_file(config, load_task(config.task), args.file, recipe.stderr, by=args.by)
        print(f"{record['applied']} corrections applied ({record['changed_gold']} changed gold)")

    return _run(run)


def _teacher_compare(args: argparse.Namespace) -> int:
    from training import recipe
    from training import teacher_compare as comparing
    from training.config import ConfigError
    from training.task import load_task

    def run():
        config = _config(args)
        task = load_task(config.task)
        if config.teacher is None:
            raise ConfigError("no teacher: pass --teacher-url URL (or set teacher.url in the run config)")
        specs = comparing.load_variants(args.variants) if args.variants else []
        specs += [comparing.parse_flag(text) for text in args.variant]
        candidates = comparing.resolve(specs, config.teacher_variant, config.teacher, task)
        gold, pool = comparing.gold_rows(config, task, args.gold, args.limit)
        report = comparing.compare(config, task, candidates, gold, pool, args.gold, recipe.stderr)
        paths = comparing.write_report(report, config.run_dir / "teacher")
        print(comparing.report_markdown(report), end="")
        print("\n".join(str(path) for path in paths))
        if args.apply is not None:
            name = report["best"] if args.apply == "best" else args.apply
            chosen = next((candidate for candidate in candidates if candidate.name == name), None)
            if chosen is None:
                raise ConfigError(f"--apply {name!r}: no such variant; use one of {', '.join(c.name for c in candidates)}")
            comparing.apply(config, chosen)
            recipe.stderr(f"teacher variant {name} written to {config.run_dir / 'config.json'}; `stillhouse label --name {config.name} --relabel` labels with it")

    try:
        return _run(run)
    except comparing.VariantError as error:
        print(f"stillhouse: {error}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    from training import recipe

    def run():
        _, entry = recipe.train(_config(args), recipe.stderr)
        if entry is not None:  # None on the non-main ranks of a data-parallel run
            print(entry.id)

    return _run(run)


def _eval(args: argparse.Namespace) -> int:
    import json

    from training import recipe
    from training.config import EndpointConfig
    from training.task import load_task

    def run():
        config = _config(args)
        adapter = args.adapter
        if adapter is None and (config.run_dir / "run.json").is_file():
            adapter = json.loads((config.run_dir / "run.json").read_text())["adapter_id"]
        student = EndpointConfig(url=args.url, protocol=args.protocol, model=adapter, concurrency=args.concurrency)
        teacher = config.teacher
        if args.with_teacher and teacher is None:
            teacher = EndpointConfig(url=args.url, protocol=args.protocol, model=None, concurrency=args.concurrency)
        judge = None
        if args.judge_url:
            judge = EndpointConfig(url=args.judge_url, protocol=args.judge_protocol, model=args.judge_model, concurrency=args.concurrency)
        recipe.evaluate_run(config, load_task(config.task), student, teacher if args.with_teacher else None, recipe.stderr, args.limit, judge)

    return _run(run)


def _ablate(args: argparse.Namespace) -> int:
    from training import ablation, recipe

    def run():
        try:
            fractions = ablation.parse_fractions(args.fractions)
        except ValueError as error:
            from training.config import ConfigError

            raise ConfigError(str(error)) from None
        config = _config(args)
        report = ablation.ablate(config, fractions, recipe.stderr, eval_limit=args.eval_limit)
        print(ablation.ablation_markdown(report), end="")

    return _run(run)


def _sweep(args: argparse.Namespace) -> int:
    from training import recipe
    from training import sweep as sweeping

    def run():
        vary = sweeping.parse_vary(args.vary)
        report = sweeping.sweep(_config(args), vary, recipe.stderr, eval_limit=args.eval_limit)
        print(sweeping.sweep_markdown(report), end="")

    try:
        return _run(run)
    except sweeping.SweepRefusedError as error:
        print(f"stillhouse: {error}", file=sys.stderr)
        return 2


def _review(args: argparse.Namespace) -> int:
    from training import recipe, review

    def run():
        paths = review.review(Path(args.runs_dir) / args.name, recipe.stderr, worst=args.worst, eval_path=args.eval, teacher_path=args.teacher_eval)
        print("\n".join(str(path) for path in paths))

    try:
        return _run(run)
    except review.ReviewError as error:
        print(f"stillhouse: {error}", file=sys.stderr)
        return 2
