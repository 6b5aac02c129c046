"""``python -m trak_fast build`` and ``score``: TRAK on a saved model and text files, no script.

``build`` featurizes a training set for each checkpoint and finalizes the kernels into a store;
``score`` featurizes a query set, writes the scores ``[train, queries]`` (an ``.npy`` memmap,
written blockwise) and, with ``--top-k N``, each query's N strongest proponents and opponents
with their text (JSONL). Both resume when run again with the same options, and refuse other
inputs naming the option. Modules: :mod:`.options` (flags, config files), :mod:`.data` (files,
columns, tokenization), :mod:`.model` (models, checkpoints, tokenizers), :mod:`.commands`.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from .errors import CLIError

BUILD_EXAMPLE = """\
example:
  python -m trak_fast build runs/store --model my_model/ --data train.jsonl
  (my_model/ holds save_pretrained's model and tokenizer; train.jsonl has a 'text' column,
   or 'prompt' and 'completion': then only the completion's tokens are attributed)

Run the same command again after an interruption: it resumes. Other inputs are refused.
Under torchrun (torchrun --nproc-per-node 2 -m trak_fast build ...) the work is split."""

SCORE_EXAMPLE = """\
example:
  python -m trak_fast score runs/store --data queries.jsonl --top-k 5
  -> runs/store/experiment_queries/scores.npy   [train examples x queries] float32
     runs/store/experiment_queries/top_5.jsonl  per query: its text, the 5 training
     examples with the largest scores (proponents) and the 5 smallest (opponents)

Queries are tokenized with the build's tokenizer and options; the model is the build's."""


def parser() -> argparse.ArgumentParser:
    from .options import add_build_flags, add_score_flags

    top = argparse.ArgumentParser(prog="python -m trak_fast",
                                  description="TRAK data attribution (trak_fast).")
    commands = top.add_subparsers(dest="command", metavar="{build,score,info,demo}")
    build = commands.add_parser(
        "build", help="featurize and finalize a training set into a store",
        description="Featurize a training set with each checkpoint and finalize the kernels.",
        epilog=BUILD_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_build_flags(build)
    build.set_defaults(command_parser=build)
    score = commands.add_parser(
        "score", help="score a query set against a store; top-k proponents as JSONL",
        description="Featurize a query set, score it against a store made by build, and "
        "optionally write each query's top-k proponents and opponents.",
        epilog=SCORE_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_score_flags(score)
    score.set_defaults(command_parser=score)
    commands.add_parser("info", help="versions, CUDA build and GPU")
    commands.add_parser("demo", help="the LDS demo on digits (demo --help for its options)")
    return top


def _process_group(device: Optional[str]) -> bool:
    """Starts the default process group under torchrun (WORLD_SIZE > 1); True if it did."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if cuda and device is None:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def main(argv: Optional[List[str]] = None) -> int:
    from ..pipeline.distributed import DistributedError
    from ..pipeline.store import StoreBusyError
    from .commands import run_build, run_score
    from .options import build_options, score_options

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("info", "demo"):
        from ..__main__ import main as package_main

        return package_main(argv)
    namespace = parser().parse_args(argv)
    command, sub = namespace.__dict__.pop("command"), namespace.__dict__.pop("command_parser", None)
    if sub is None:
        parser().print_help()
        return 2
    started = False
    try:
        if command == "build":
            options = build_options(namespace, sub)
            started = _process_group(options.device)
            return run_build(options)
        options = score_options(namespace, sub)
        started = _process_group(options.device)
        return run_score(options)
    except CLIError as exc:
        print(f"python -m trak_fast {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\npython -m trak_fast {command}: interrupted; run the same command again to "
              "resume", file=sys.stderr)
        return 130
    except (ValueError, StoreBusyError, DistributedError) as exc:     # trak_fast's own checks
        print(f"python -m trak_fast {command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()
