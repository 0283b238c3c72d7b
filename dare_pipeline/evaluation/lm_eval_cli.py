"""lm-eval's own command line with the `dare` model registered and the dare_* tasks findable.

lm-eval 0.4.13 looks models up in a registry that is filled by imports only (no entry points), so
`lm_eval --model dare` needs this package imported first. This wrapper does that, adds
`--include_path <packaged tasks dir>` when no --include_path is given, sets the HF offline
variables, and then hands the arguments to lm-eval's CLI unchanged:

    python -m dare_pipeline.evaluation.lm_eval_cli --model dare \\
        --model_args recipe=recipes/baseline.yaml,gen_length=64 --tasks dare_suite --limit 5 --device cpu
    dare-lm-eval ...   (the same, installed as a script)
"""

from __future__ import annotations

import sys

from .run import set_offline

_TAKES_INCLUDE_PATH = ("run", "ls", "validate")


def with_include_path(argv: list[str], tasks_dir: str) -> list[str]:
    """argv plus `--include_path tasks_dir`, unless an --include_path is already given (lm-eval
    0.4.13 takes a single directory there)."""
    argv = list(argv)
    if any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        return argv
    if not argv or argv[0] in ("-h", "--help"):
        return argv
    command = argv[0] if not argv[0].startswith("-") else "run"
    if command not in _TAKES_INCLUDE_PATH:
        return argv
    return argv + ["--include_path", tasks_dir]


def name_results_after_the_recipe() -> None:
    """lm-eval names a run after the model_args' `pretrained=` / `model=` value, else after a random
    id; a `dare` run is named after its recipe (e.g. results under OUTPUT/baseline/)."""
    from lm_eval.loggers.evaluation_tracker import GeneralConfigTracker
    from lm_eval.utils import sanitize_model_name

    from .lm_eval_model import DareLM

    if getattr(GeneralConfigTracker.log_experiment_args, "_dare", False):
        return
    original = GeneralConfigTracker.log_experiment_args

    def log_experiment_args(self, model_source, *args, **kwargs):
        original(self, model_source, *args, **kwargs)
        if model_source == "dare" and DareLM.last_recipe_name:
            self.model_name = DareLM.last_recipe_name
            self.model_name_sanitized = sanitize_model_name(self.model_name)

    log_experiment_args._dare = True
    GeneralConfigTracker.log_experiment_args = log_experiment_args


def main(argv: list[str] | None = None) -> None:
    set_offline()
    from lm_eval.__main__ import cli_evaluate

    from dare_pipeline import evaluation  # registers the "dare" model

    from .run import quiet_lm_eval_git

    quiet_lm_eval_git()  # no "fatal: not a git repository" outside a checkout
    name_results_after_the_recipe()

    argv = sys.argv[1:] if argv is None else list(argv)
    sys.argv = ["lm-eval", *with_include_path(argv, str(evaluation.TASKS_DIR))]
    cli_evaluate()


if __name__ == "__main__":
    main()
