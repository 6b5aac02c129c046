"""Which Hugging Face families run at trak_fast's defaults, and how exactly (issue table).

    python benchmarks/hf_reach.py            # ~30 s on 2 CPU cores; writes results/hf_reach.json

Tiny models built from transformers configs (hidden 32, 2 layers, 4 heads, 2 KV heads where the
family has it, default attention: sdpa), float32, padded dict batches with an attention mask
(right and left padding; labels -100 at padding; the left-padded features are compared with the
right-padded ones: they must not depend on the padding). For each: ``featurize`` at defaults with
``proj_dim=None`` (raw per-example gradients of every parameter), compared with one autograd
pass per example of the task's own output (relative Gram error, float64 accumulation); the
parameters that took each path; and the share of parameters ``projection="factored"`` covers.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import transformers

import trak_fast

VOCAB, PAD, LENGTHS = 64, 3, [9, 5, 7, 3]


def build(family):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64)
    t = transformers
    if family == "gpt2":
        return t.GPT2LMHeadModel(t.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2,
                                              n_head=4)), "language_modeling"
    if family == "bert":
        return t.BertForSequenceClassification(t.BertConfig(num_labels=3, **common)), "classification"
    if family == "gptneox":
        return t.GPTNeoXForCausalLM(t.GPTNeoXConfig(**common)), "language_modeling"
    cls, cfg = {"llama": (t.LlamaForCausalLM, t.LlamaConfig), "qwen2": (t.Qwen2ForCausalLM, t.Qwen2Config),
                "mistral": (t.MistralForCausalLM, t.MistralConfig)}[family]
    return cls(cfg(num_key_value_heads=2, **common)), "language_modeling"


def batch(side, classification):
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(4, VOCAB, (n,), generator=g) for n in LENGTHS]
    T = max(LENGTHS)
    ids, mask = torch.full((4, T), PAD), torch.zeros(4, T, dtype=torch.long)
    labels = torch.full((4, T), -100)
    for r, s in enumerate(seqs):
        where = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        ids[r, where], mask[r, where], labels[r, where] = s, 1, s
    out = {"input_ids": ids, "attention_mask": mask}
    out["labels"] = torch.tensor([0, 2, 1, 2]) if classification else labels
    return out


def reference(model, task, b):
    names, params = zip(*model.named_parameters())
    rows = []
    for i in range(4):
        f = task.outputs(model, {k: v[i:i + 1] for k, v in b.items()})
        grads = torch.autograd.grad(f[0], params, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                               for g, p in zip(grads, params)]))
    return torch.stack(rows)


def main() -> None:
    rows, phis = [], {}
    for family in ["gpt2", "llama", "qwen2", "mistral", "gptneox", "bert"]:
        for side in ["right", "left"]:
            torch.manual_seed(0)
            model, task_name = build(family)
            model.eval()
            task = trak_fast.features.get_task(task_name)
            b = batch(side, task_name == "classification")
            row = {"family": type(model).__name__, "padding": side}
            start = time.perf_counter()
            try:
                feats = trak_fast.featurize(model, model.state_dict(), [b], task=task, proj_dim=None)
                ref = reference(model, task, b).double()
                got = feats.phi.double()
                row["gram_error"] = float((got @ got.T - ref @ ref.T).norm() / (ref @ ref.T).norm())
                phis[side] = got
                if side == "left":      # an example's features must not depend on the padding
                    row["left_vs_right"] = float((got - phis["right"]).norm() / phis["right"].norm())
                row["hooks"], row["vmap"] = len(feats.paths["hooks"]), feats.paths["vmap"]
                fac = trak_fast.featurize(model, model.state_dict(), [b], task=task,
                                          projection="factored")
                sizes = {n: p.numel() for n, p in model.named_parameters()}
                row["factored_coverage"] = sum(sizes[n] for n in fac.paths["hooks"]) / sum(sizes.values())
                row["status"] = "runs"
            except Exception as exc:          # the table reports failures, it does not stop
                row["status"] = f"fails: {type(exc).__name__}: {str(exc)[:120]}"
            row["seconds"] = round(time.perf_counter() - start, 2)
            rows.append(row)
            print(f"{row['family']:32s} {side:5s} {row['status']:5s} gram err "
                  f"{row.get('gram_error', float('nan')):.1e}  hooks {row.get('hooks')}  vmap "
                  f"{row.get('vmap')}  factored {100 * row.get('factored_coverage', 0):.0f}%"
                  + (f"  left vs right {row['left_vs_right']:.1e}" if "left_vs_right" in row else ""))
    out = Path(__file__).parent / "results" / "hf_reach.json"
    out.write_text(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__,
                               "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
