"""Prototype (issue 24, not kept): each checkpoint scored with two independent 32 x 32
projections (and label draws), the two score matrices averaged -- twice the defaults' cost,
against one 48 x 48 projection. Medium model, seeds 0/1/2: 0.081 / 0.080 / 0.081 (one 48 x 48:
0.086 / 0.083 / 0.079; one 32 x 32: 0.081 / 0.077 / 0.076)::

    python benchmarks/variants/two_projections.py --size medium --only "two projections" \
        --no-kronfluence --seed-offset 0 --out benchmarks/results/lm_lds_explore/medium_two_projections_seed0.json
"""
import sys, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import bench_lm_lds as B, trak_fast
orig = B.method_table
def table(args):
    t = orig(args)
    def two(ck):
        s = ck.model_id + 1000 * args.seed_offset
        out = 0
        for extra in (0, 500):
            out = out + trak_fast.attribute(ck.model, [ck.checkpoint], ck.train, ck.targets,
                task="language_modeling", projection="factored", factored_dims=(32, 32), seed=s + extra, progress=False).double()
        return out / 2, None
    t["two projections 32x32 averaged"] = (two, "mean of the defaults at two seeds")
    return t
B.method_table = table
B.main(sys.argv[1:])
