"""What ``factored_dims="auto"`` costs on GPT-2 small (124M): 48 x 48 against 32 x 32.

``trak_fast.attribute(task="language_modeling")`` at its defaults (factored features, per-layer
Fisher with 4 rows per sequence, c = 0.01) on a randomly initialized GPT-2 small (eager
attention, built from ``GPT2Config()``, never downloaded): ``--n`` train sequences of ``--tokens``
random tokens in batches of 8, 4 targets, one checkpoint. ``"auto"`` resolves to 48 x 48 here
(width 768); ``(32, 32)`` was the language-modeling default before. Timed alternately ``--repeat``
times after one untimed call each; prints seconds and the ratio, writes JSON.

    python benchmarks/auto_dims_124m.py            # -> results/auto_dims_124m.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main(argv=None) -> dict:
    import trak_fast
    from lm_cost import alternate, write_report
    from transformers import GPT2Config, GPT2LMHeadModel

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", type=Path, default=HERE / "results" / "auto_dims_124m.json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(attn_implementation="eager")).eval()
    checkpoint = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, model.config.vocab_size, (args.n, args.tokens))
    train = [{"input_ids": ids[i:i + 8]} for i in range(0, args.n, 8)]
    targets = [{"input_ids": ids[:4]}]
    choices = {"auto (48 x 48)": "auto", "32 x 32": (32, 32)}
    features = {}

    def call(dims):
        return trak_fast.attribute(model, [checkpoint], train, targets, task="language_modeling",
                                   projection="factored", factored_dims=dims, progress=False)

    for name, dims in choices.items():
        spec = trak_fast.Featurizer(model, checkpoint, task="language_modeling",
                                    projection="factored", factored_dims=dims).spec
        features[name] = {"factored_dims": list(spec.factored_dims), "features": spec.num_features}
    timed = alternate({name: (lambda dims=dims: call(dims)) for name, dims in choices.items()},
                      args.repeat, "auto (48 x 48)", "32 x 32")
    seconds = timed["seconds"]
    print(f"{'factored_dims':16s} {'features':>9s} {'s (min / median)':>18s}")
    for name in choices:
        print(f"{name:16s} {features[name]['features']:9d} {min(seconds[name]):8.1f} / "
              f"{statistics.median(seconds[name]):5.1f}")
    print(f"auto / 32 x 32: {timed['ratio_min']:.2f} (min), {timed['ratio_median']:.2f} (median)")
    return write_report({"n": args.n, "tokens": args.tokens, "features": features, **timed},
                        args.out)


if __name__ == "__main__":
    main()
