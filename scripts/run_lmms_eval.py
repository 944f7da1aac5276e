"""Run lmms-eval on a checkpoint: registers our model (benchmarks/lmms_model.py) and hands the rest to lmms-eval's own CLI.

    python scripts/run_lmms_eval.py --weight sft_video_128 --tasks tiny_synthetic \\
        --include_path benchmarks/tasks --output_path out/lmms_eval

Our flags pick the checkpoint (--weight / --lora, --out_dir, --tokenizer, --clip_pretrained); every
other flag is lmms-eval's (--tasks, --include_path, --limit, --output_path, --log_samples,
--gen_kwargs, --force_simple, ...). --model defaults to tiny_video_llm, --batch_size to eval.py's 32.
Exit status: 0 when lmms-eval reported results, 1 when it did not (or the input was bad), 2 when
lmms-eval is not installed.
"""
import _repo  # noqa: F401  (puts the repository root on sys.path)
import argparse
import importlib.util
import sys

from model.engine import INPUT_ERRORS

MISSING = "scripts/run_lmms_eval.py needs lmms-eval (pip install lmms-eval)"


def parse_args(argv=None):
    """(our flags, lmms-eval's argv)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    p.add_argument("--weight", default=None, help="checkpoint path, or a name in --out_dir (e.g. sft_video_128)")
    p.add_argument("--lora", default=None, help="LoRA adapter folder, merged onto its base")
    p.add_argument("--out_dir", default="out")
    p.add_argument("--tokenizer", default=None, help="default: the one named in the checkpoint")
    p.add_argument("--clip_pretrained", default=None, help="override the checkpoint's vision weights (tag or file)")
    ours, rest = p.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        p.print_help()
        print("\nlmms-eval's own flags follow (python -m lmms_eval --help).")
        sys.exit(0)
    return ours, rest


def model_args(ours) -> str:
    """Our flags as lmms-eval's --model_args (key=value pairs, comma-separated)."""
    pairs = {k: getattr(ours, k) for k in ("weight", "lora", "out_dir", "tokenizer", "clip_pretrained")}
    for key, value in pairs.items():
        if value is not None and ("," in str(value) or "=" in str(value)):
            raise SystemExit(f"error: --{key} {value!r}: lmms-eval's model_args cannot carry ',' or '='")
    return ",".join(f"{k}={v}" for k, v in pairs.items() if v is not None)


def flag_at(argv, *names):
    """(index, value) of the last `--name value` or `--name=value` in argv, or None."""
    found = None
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                found = (i, argv[i + 1])
            elif arg.startswith(name + "="):
                found = (i, arg[len(name) + 1:])
    return found


def lmms_eval_argv(ours, rest) -> list:
    """lmms-eval's argv: ours as --model_args (before any the user gave), and our defaults where unset."""
    model = flag_at(rest, "--model")
    if not ours.weight and not ours.lora and model is None:
        raise SystemExit("error: give --weight (a checkpoint) or --lora (an adapter folder)")
    argv = list(rest)
    if model is None:
        argv += ["--model", "tiny_video_llm"]
    given = flag_at(argv, "--model_args")
    if given:
        i, value = given
        argv[i:i + (1 if argv[i].startswith("--model_args=") else 2)] = []
        argv += ["--model_args", ",".join(a for a in (model_args(ours), value) if a)]
    else:
        argv += ["--model_args", model_args(ours)]
    if flag_at(argv, "--batch_size", "-b") is None:
        argv += ["--batch_size", "32"]
    return argv


def run(argv) -> int:
    """lmms-eval's CLI on argv; 0 when it produced results. (Its CLI prints a failed task's traceback and
    carries on; whether results came back is what tells a caller the run worked.)"""
    import lmms_eval.__main__ as cli
    from benchmarks.lmms_model import register
    register()
    produced = []
    evaluate_one = cli.cli_evaluate_single

    def evaluate_and_record(args):
        try:
            results, samples = evaluate_one(args)
        except INPUT_ERRORS as e:   # a bad checkpoint, media file or option: one line
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        produced.append(results is not None)
        return results, samples

    cli.cli_evaluate_single = evaluate_and_record
    sys.argv = ["lmms-eval", *argv]
    cli.cli_evaluate()
    return 0 if produced and all(produced) else 1


def main(argv=None):
    ours, rest = parse_args(argv)
    if importlib.util.find_spec("lmms_eval") is None:
        print(MISSING, file=sys.stderr)
        sys.exit(2)
    sys.exit(run(lmms_eval_argv(ours, rest)))


if __name__ == "__main__":
    main()
