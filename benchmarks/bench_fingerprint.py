"""Cost of the example fingerprints (trak_fast.fingerprint.example_hashes) per batch.

For a few batch shapes: the time to fingerprint one batch, and for the digits MLP the time
to featurize the same batch (the smallest model in the project, so the worst ratio). Prints a
table and writes benchmarks/results/fingerprint.json. One torch thread.
"""
import json
import time
from pathlib import Path

import torch

from trak_fast.eval import digits
from trak_fast.features.featurizer import Featurizer
from trak_fast.pipeline.fingerprint import example_hashes


def best_of(fn, repeats=5):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    cases = {
        "digits [256, 64] f32 + labels": (torch.rand(256, 64, generator=gen), torch.randint(0, 10, (256,))),
        "CIFAR [256, 3, 32, 32] f32 + labels": (torch.rand(256, 3, 32, 32, generator=gen),
                                                torch.randint(0, 10, (256,))),
        "ImageNet [64, 3, 224, 224] f32 + labels": (torch.rand(64, 3, 224, 224, generator=gen),
                                                    torch.randint(0, 1000, (64,))),
        "tokens {ids [32, 1024] i64, labels}": {"input_ids": torch.randint(0, 50000, (32, 1024)),
                                                "labels": torch.randint(0, 50000, (32,))},
    }
    rows = []
    for name, batch in cases.items():
        rows.append({"batch": name, "fingerprint_ms": 1e3 * best_of(lambda: example_hashes(batch))})
    x, y, _, _ = digits.load_digits(256, 1)
    model = digits.make_mlp(128)
    featurizer = Featurizer(model, model.state_dict(), proj_dim=2048)
    featurize_ms = 1e3 * best_of(lambda: featurizer((x, y)), repeats=3)
    fingerprint_ms = 1e3 * best_of(lambda: example_hashes((x, y)))
    print("loaded shared 2-core AMD EPYC VM, one torch thread")
    print("| batch | fingerprint (ms) |")
    print("|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['fingerprint_ms']:.2f} |")
    print(f"digits MLP 64-128-10, B = 256, k = 2048: featurize {featurize_ms:.1f} ms, fingerprint "
          f"{fingerprint_ms:.2f} ms ({100 * fingerprint_ms / featurize_ms:.1f}% of featurizing)")
    out = Path(__file__).parent / "results" / "fingerprint.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "digits_mlp_featurize_ms": featurize_ms,
                               "digits_mlp_fingerprint_ms": fingerprint_ms}, indent=1))


if __name__ == "__main__":
    main()
