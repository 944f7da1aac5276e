"""Experiment trackers (wandb, swanlab): opened when asked for, left out with a note when they cannot start."""
import importlib
import sys


def open_trackers(args, run_name: str) -> list:
    """The trackers asked for; one that is not installed or cannot start says so in one line and is left out."""
    trackers = []
    for flag, package in (("wandb", "wandb"), ("swanlab", "swanlab")):
        if not getattr(args, flag):
            continue
        try:
            module = importlib.import_module(package)
        except ImportError:
            print(f"note: --{flag}: the {package} package is not installed (pip install {package}); "
                  f"logging to out/logs only", file=sys.stderr)
            continue
        try:
            module.init(project=args.tracker_project, **{"name" if flag == "wandb" else "experiment_name": run_name},
                        config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})
        except Exception as e:   # no network, no login, a refused key: the run goes on without it
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            print(f"note: --{flag}: could not start ({type(e).__name__}: {first_line}); logging to out/logs only",
                  file=sys.stderr)
            continue
        trackers.append(module)
    return trackers
