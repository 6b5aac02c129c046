"""Peak memory of ``python -m trak_fast score --top-k`` with made-up train features.

For n = 20,000 and 200,000 training rows: a store whose checkpoint has made-up train features
``[n, 512]`` (float32, seeded normal; Q uniform in [0.1, 0.9]) for a tiny GPT-2 saved with
``save_pretrained`` (its tokenizer trained here with the ``tokenizers`` package), finalized by
``TRAK.finalize``, with the build's ``cli.json`` record written by the CLI's own
``prepare_build``/``record_build``. Then, in a subprocess, the real command

    python -m trak_fast score STORE --data queries.jsonl --top-k 10

featurizes 1,000 queries with the tiny GPT-2 (proj_dim 512), scores them against the n rows
(``scores.npy`` [n, 1000] float32, a memmap written blockwise) and writes the top-10
proponents and opponents per query with their text (the training texts streamed from a
jsonl file of n rows). Its memory is sampled every 10 ms from ``/proc/PID/status``:
``RssAnon`` is the memory beyond file-backed pages (the store's memmaps and the page cache of
the files read), ``VmHWM`` the peak resident set including those pages.

Prints a table and writes benchmarks/results/bench_top_k.json. One torch thread.
    python benchmarks/bench_top_k.py [--rows 20000 200000] [--work DIR]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trak_fast.cli.commands import prepare_build, record_build  # noqa: E402
from trak_fast.cli.options import BuildOptions  # noqa: E402
from trak_fast.features.tasks import LanguageModelingTask  # noqa: E402
from trak_fast.pipeline.fingerprint import checkpoint_fingerprint  # noqa: E402
from trak_fast.pipeline.trak import TRAK  # noqa: E402
from trak_fast.settings import FeatureSettings  # noqa: E402

K, QUERIES, TOP_K, BLOCK = 512, 1000, 10, 20000
WORDS = "the cat dog sat ran on a mat rug and ate fish meat slowly quickly today".split()


def text(i):
    rng = np.random.default_rng(i)
    return " ".join(rng.choice(WORDS, 6 + i % 5))


def tiny_gpt2(path):
    import tokenizers
    import transformers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text(i) for i in range(200)], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(fast), n_positions=64, n_embd=32, n_layer=2,
                                     n_head=2, bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)


def made_up_store(work, n):
    """A finalized store of n made-up train rows and its cli.json, as build would leave it."""
    train = work / f"train_{n}.jsonl"
    with open(train, "w") as handle:
        handle.writelines(json.dumps({"text": f"row {i}: {text(i)}"}) + "\n" for i in range(n))
    store = work / f"store_{n}"
    shutil.rmtree(store, ignore_errors=True)
    options = BuildOptions(store=str(store), model=str(work / "gpt2"), data=[str(train)],
                           features=FeatureSettings(proj_dim=K), progress=False)
    model, _, rows, _, _, record = prepare_build(options)
    trak = TRAK(store, model, train_size=n, task=LanguageModelingTask(),
                features=options.features, progress=False)
    features, q, finished, examples = trak.store.open_train_arrays(0, "float32")
    gen = torch.Generator().manual_seed(n)
    for start in range(0, n, BLOCK):
        stop = min(n, start + BLOCK)
        features[start:stop] = torch.randn(stop - start, K, generator=gen).numpy()
        q[start:stop] = (0.1 + 0.8 * torch.rand(stop - start, generator=gen)).numpy()
        examples[start:stop, 0] = 1
        examples[start:stop, 1] = 2 * np.arange(start, stop, dtype=np.uint64) + 1
    for array in (features, q, examples):
        array.flush()
    finished[:] = 1
    finished.flush()
    fingerprint = checkpoint_fingerprint(model.state_dict())

    def featurized(metadata):
        metadata["models"]["0"] = {"checkpoint": fingerprint, "featurized": True, "kernels": {}}
    trak.store.update(featurized)
    trak.finalize()
    record_build(store, record)
    return store


def measure(command, env):
    """(seconds, peak RssAnon MiB, peak VmHWM MiB, output) of a subprocess."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = {"RssAnon": 0, "VmHWM": 0}

    def sample():
        while proc.poll() is None:
            try:
                for line in open(f"/proc/{proc.pid}/status"):
                    key, _, value = line.partition(":")
                    if key in peak:
                        peak[key] = max(peak[key], int(value.split()[0]))
            except OSError:
                return
            time.sleep(0.01)
    thread = threading.Thread(target=sample)
    start = time.perf_counter()
    thread.start()
    output = proc.communicate()[0].decode()
    thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{command} failed:\n{output[-3000:]}")
    return time.perf_counter() - start, peak["RssAnon"] / 1024, peak["VmHWM"] / 1024, output


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[20000, 200000])
    parser.add_argument("--work", help="working folder [a temporary one, deleted]")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_top_k_"))
    work.mkdir(parents=True, exist_ok=True)
    tiny_gpt2(work / "gpt2")
    queries = work / "queries.jsonl"
    with open(queries, "w") as handle:
        handle.writelines(json.dumps({"text": f"query {j}: {text(10**6 + j)}"}) + "\n"
                          for j in range(QUERIES))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    results = []
    print(f"{'train rows':>10} {'queries':>8} {'k':>4} {'top-k':>5} {'seconds':>8} "
          f"{'peak RssAnon MiB':>17} {'peak VmHWM MiB':>15} {'memmaps MiB':>12}")
    for n in args.rows:
        store = made_up_store(work, n)
        seconds, anon, hwm, _ = measure(
            [sys.executable, "-m", "trak_fast", "score", str(store), "--data", str(queries),
             "--top-k", str(TOP_K), "--no-progress"], env)
        memmaps = sum(p.stat().st_size for p in store.rglob("*.npy")) / 2**20
        lines = (store / "experiment_queries" / f"top_{TOP_K}.jsonl").read_text().splitlines()
        assert len(lines) == QUERIES and len(json.loads(lines[0])["proponents"]) == TOP_K
        results.append({"train_rows": n, "queries": QUERIES, "features": K, "top_k": TOP_K,
                        "seconds": round(seconds, 1), "peak_rss_anon_mib": round(anon, 1),
                        "peak_vmhwm_mib": round(hwm, 1), "store_npy_mib": round(memmaps, 1)})
        print(f"{n:>10} {QUERIES:>8} {K:>4} {TOP_K:>5} {seconds:>8.1f} {anon:>17.1f} "
              f"{hwm:>15.1f} {memmaps:>12.1f}")
        shutil.rmtree(store)
    out = ROOT / "benchmarks" / "results" / "bench_top_k.json"
    out.write_text(json.dumps({"command": "python -m trak_fast score STORE --data queries.jsonl "
                               f"--top-k {TOP_K} --no-progress", "torch_threads": 1,
                               "cpu_count": os.cpu_count(),
                               "load_average": os.getloadavg(), "rows": results}, indent=1))
    print(f"wrote {out}")
    if not args.work:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
