"""The start of every bundle command: the command line and every value checked before any work.

Each config's ``initialize`` (run by MONAI's ``ConfigWorkflow`` before its ``run`` id, also in the Model Zoo's
``ConfigWorkflow -> initialize -> check_properties -> run`` pattern) calls :func:`start`, which

* refuses a stage the config does not have (``run trainning``), listing the stages it has;
* refuses a command-line id that no config file of the command declares (``--patch_sizee 128``), naming the
  closest known id (MONAI would silently add it as a new id);
* reads the yes/no ids as booleans (a command line passes ``--progress false`` as the string ``"false"``) and
  checks every id of :data:`scripts.config_checks.RULES` the config holds, with the relations between them.

MONAI gives a config expression no handle on the parser evaluating it; :func:`current_parser` finds it on the call
stack (an expression is always evaluated inside ``ConfigParser.get_parsed_content``). This keeps the checks in one
Python table keyed by id instead of lists of ids in the YAML files. ``tests/test_config_layer.py`` pins it to the
MONAI version of requirements.txt.
"""

from __future__ import annotations

import ast
import difflib
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from monai.bundle import ConfigParser

from scripts.errors import BundleInputError, is_bundle_main

#: run ids a config of this bundle may have (the stages), in pipeline order
STAGES = ("prepare", "pretrain", "extract", "cluster", "training", "evaluate", "inference", "export", "run")
#: arguments of ``monai.bundle run`` itself (everything else on its command line is a config override)
RUN_ARGUMENTS = {"run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file"}
#: where the stages that are not in configs/train.yaml live
STAGE_CONFIGS = {"evaluate": "\"['configs/train.yaml','configs/evaluate.yaml']\"", "inference": "configs/inference.yaml",
                 "export": "configs/deploy.yaml"}
#: ids a command line may hold beyond the configs' own: ``--debug`` (tracebacks, :mod:`scripts.errors`)
EXTRA_IDS = {"debug"}
_TOP_LEVEL_ID = re.compile(r"^([A-Za-z_][\w]*)(?:#[\w#]*)?\s*:", re.MULTILINE)


def current_parser() -> ConfigParser:
    """The :class:`~monai.bundle.ConfigParser` evaluating the calling config expression."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, ConfigParser):
            return owner
        frame = frame.f_back
    raise RuntimeError("current_parser() must be called from a bundle config expression")


def command_line(argv: Sequence[str] | None = None) -> dict | None:
    """``{"run_id", "config_files", "ids"}`` of a ``python -m monai.bundle run ...`` command line (None for any
    other program: tests, Python callers). ``ids`` are the overridden ids' top-level names."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] != "run" or not is_bundle_main(argv[0]):
        return None
    run_id, files, ids = None, [], []
    i = 2
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            key, _, value = arg[2:].partition("=")
            if not _ and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            key = key.replace("-", "_") if key.replace("-", "_") in RUN_ARGUMENTS else key
            if key == "config_file":
                files = _as_list(value)
            elif key == "run_id":
                run_id = value
            elif key not in RUN_ARGUMENTS:
                ids.append(key.split("#")[0].split("::")[0])
        elif run_id is None:
            run_id = arg
        i += 1
    return {"run_id": run_id or "run", "config_files": files, "ids": ids}


def _as_list(value: str) -> list[str]:
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return [value]
    return [str(v) for v in parsed] if isinstance(parsed, (list, tuple)) else [str(parsed)]


def declared_ids(config_files: Iterable[str | Path]) -> set[str]:
    """Top-level ids the YAML/JSON files declare (a text scan: the files are parsed once, by MONAI)."""
    out: set[str] = set()
    for f in config_files:
        text = Path(f).read_text(encoding="utf-8")
        if str(f).endswith(".json"):
            import json

            out |= {k.split("#")[0] for k in json.loads(text)}
        else:
            out |= set(_TOP_LEVEL_ID.findall(text))
    return out


def check_command_line(parser: ConfigParser, cli: Mapping[str, Any] | None, also_known: Iterable[str] = ()) -> None:
    """Refuse an unknown stage and ids no config file declares (one line each, naming the closest match)."""
    if cli is None:
        return
    files = [f for f in cli["config_files"] if Path(f).is_file()]
    name = ", ".join(str(Path(f).name) for f in files) or "the config"
    run_id = cli["run_id"]
    if run_id not in parser:
        stages = [s for s in STAGES if s in parser]
        elsewhere = STAGE_CONFIGS.get(run_id)
        fix = (f"run {run_id} with --config_file {elsewhere}" if elsewhere else
               f"run one of its stages: {', '.join(stages)}" + _closest(run_id, [*stages, *STAGE_CONFIGS]))
        raise BundleInputError(f"run {run_id}", f"{name} has no stage '{run_id}'", fix)
    if not files:
        return
    known = declared_ids(files) | EXTRA_IDS | set(also_known)
    for key in cli["ids"]:
        if key not in known:
            raise BundleInputError(f"--{key}", f"is not an id of {name}", "check the spelling" + _closest(key, sorted(known)) +
                                   " (docs/configuration.md lists every id)")


def _closest(word: str, choices: Sequence[str]) -> str:
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f": did you mean '{match[0]}'?" if match else ""


def normalise_and_validate(parser: ConfigParser) -> None:
    """Read the yes/no ids as booleans and a bare model name given to a list id as a one-element list (in the
    parser, so every consumer sees them so) and check every id of :data:`scripts.config_checks.RULES` the config
    holds, then the relations between them."""
    from scripts.config_checks import RULES, validate
    from scripts.config_values import as_bool

    values = {key: parser.get_parsed_content(key) for key in RULES if key in parser}
    validate(values)  # one line naming the id and the fix for the first bad value
    normalised = {k: as_bool(v) for k, v in values.items() if RULES[k].kind == "bool" and not isinstance(v, bool)}
    normalised.update({k: [v] for k, v in values.items() if RULES[k].kind == "model_list" and isinstance(v, str)})  # --eval_models csmil
    for key, value in normalised.items():
        parser[key] = value


def trained_ids() -> tuple[str, ...]:
    """The settings a trained model carries (:data:`scripts.checkpoint.contract.DEFAULTS`): inference and export take them
    from the checkpoint; on their command lines they are checked against it, not added."""
    from scripts.checkpoint.contract import DEFAULTS

    return tuple(DEFAULTS)


def given_trained_settings() -> dict[str, Any]:
    """The trained settings the current command sets (``--num_clusters 4`` on inference): compared with the
    checkpoint by :class:`scripts.checkpoint.trained.TrainedModel`."""
    parser = current_parser()
    return {k: parser.get_parsed_content(k) for k in trained_ids() if k in parser}


def start(overlay_on: str | None = None) -> bool:
    """Check the command line and every value of the current config (see the module docstring). ``overlay_on``: an
    id of the config this overlay goes on (configs/evaluate.yaml needs configs/train.yaml). Returns True."""
    parser = current_parser()
    if overlay_on is not None and overlay_on not in parser:
        raise BundleInputError("configs/evaluate.yaml", "is an overlay on configs/train.yaml and was given alone",
                               f"pass both: --config_file {STAGE_CONFIGS['evaluate']}")
    driven_by_checkpoint = "trained" in parser
    check_command_line(parser, command_line(), trained_ids() if driven_by_checkpoint else ())
    normalise_and_validate(parser)
    # parse again: later references resolve with the booleans, and the config's `$import scripts` is evaluated anew
    # (initialize may run before MONAI puts bundle_root on sys.path, when the import could only give a placeholder)
    parser.parse(reset=True)
    return True


def current_config() -> dict:
    """A copy of the current command's raw config (its files merged, the command line applied, yes/no ids as
    booleans): the evaluation protocol trains every run with it (:mod:`scripts.evaluation.protocol`)."""
    import copy

    return copy.deepcopy(current_parser().get())
