"""Give a weights-only checkpoint of 0.11 or earlier the training contract that 0.12 checkpoints carry.

::

    python -m scripts.checkpoint.upgrade models/model.pt [--output new.pt] [--<id> <value> ...]

The ``--<id> <value>`` pairs are the pipeline config overrides the model was *trained* with (as given to
``run training``, e.g. ``--mil_model csmil --encoder_arch resnet50 --encoder_weights "[...]"``); the ids not given
take configs/train.yaml's defaults. The tool proves what it can: the weights must load into the network those
settings build (model, feature size, clusters, scales), and the encoders and preprocessing are the ones those
settings build (their hashes go into the contract). What it cannot prove (that the features were extracted
with exactly these encoders) is the caller's word, so the tool prints the contract it wrote. The original file
is kept as ``<name>.orig`` when the output replaces it; the new file is written through a temporary name.
"""

from __future__ import annotations

import argparse
import ast
import io
import logging
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from scripts.cache import atomic_write_bytes, stable_hash
from scripts.errors import BundleInputError
from scripts.checkpoint import contract as contracts

logger = logging.getLogger(__name__)


def upgrade(ckpt: str | Path, output: str | Path | None = None, overrides: dict[str, Any] | None = None) -> dict:
    """Write ``ckpt`` with the contract of ``overrides`` (on the pipeline config's defaults) to ``output``
    (default: in place, the original kept as ``<name>.orig``); returns the contract."""
    from scripts.features.encoders import check_state_matches, encoder_signature
    from scripts.features.extraction import transform_signature
    from scripts.workflows.pipeline_config import pipeline_parser

    ckpt = Path(ckpt)
    output = Path(output) if output else ckpt
    state = contracts.read_checkpoint(ckpt)
    if contracts.read(state) is not None:
        raise BundleInputError(ckpt, "already carries a training contract (0.12.0 or later)", "nothing to upgrade: use it as it is")
    parser = pipeline_parser(overrides or {})
    network = parser.get_parsed_content("network_def")
    check_state_matches(network, state, ckpt, "pass the --mil_model / --encoder_arch / --num_clusters / --scales_mpp the "
                        "checkpoint was trained with")
    network.load_state_dict(state)
    encoders = parser.get_parsed_content("encoders")
    arch = parser.get_parsed_content("encoder_arch")
    contract = dict(parser.get_parsed_content("model_contract"),
                    encoders=[encoder_signature(e, arch) for e in encoders],
                    preprocessing_hash=stable_hash(transform_signature(parser.get_parsed_content("preprocessing")), 16),
                    upgraded_from=str(ckpt.name))
    contracts.attach(network, contract)
    buf = io.BytesIO()
    torch.save(network.state_dict(), buf)
    if output.resolve() == ckpt.resolve():
        shutil.copy2(ckpt, ckpt.with_name(ckpt.name + ".orig"))
    atomic_write_bytes(output, buf.getvalue())
    return contract


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main(argv: Sequence[str] | None = None) -> int:
    import scripts.excepthook  # noqa: F401 - bad input: one line (traceback with --debug)

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--output", default=None, help="where to write (default: in place, original kept as <name>.orig)")
    ap.add_argument("--debug", action="store_true", help="full traceback on bad input")
    args, rest = ap.parse_known_args(argv)
    if len(rest) % 2 or not all(k.startswith("--") for k in rest[::2]):
        ap.error("training settings are given as --<id> <value> pairs, e.g. --mil_model csmil")
    overrides = {k[2:]: _value(v) for k, v in zip(rest[::2], rest[1::2])}
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    contract = upgrade(args.checkpoint, args.output, overrides)
    logger.info("wrote %s with the contract: %s", args.output or args.checkpoint,
                ", ".join(f"{k}={v}" for k, v in contract.items() if k not in ("encoders",)))
    return 0


if __name__ == "__main__":
    from scripts.interrupts import install_interrupt_handlers

    install_interrupt_handlers()  # Ctrl-C: one line, exit 130
    sys.exit(main())
