"""A causal LM compressed with KD through the session in a plain PyTorch loop.

    .venv/bin/python benchmarks/causal_lm_session.py [--out benchmarks/results/causal_lm_session.json]

Data: token rows of arithmetic sequences (start + k*step mod 61, shifted past 3 special ids;
every 4th row padded after 12 tokens), shipped as code: 2,048 training rows, 256 held-out rows
from another seed. For GPT-2 (Conv1D converted to Linear, tied LM head left out) and a Llama
with grouped-query attention (4 query heads, 2 KV heads), tiny random configs:
1. the teacher is trained with compress() (the built-in loop, dict batches, the model's own
   next-token loss) for 3 epochs;
2. a copy is compressed with prune_unstructured 50% + LSQ 4-bit + distill_kd (token-level,
   over the attention mask) by a plain loop driving jointcompress.prepare(...);
3. finalize, the packed artifact saved and loaded back; held-out perplexity of the teacher,
   the masked student, the finalized and the loaded model; bytes; greedy generate() output.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

import jointcompress  # noqa: E402
from jointcompress.artifact import load, save  # noqa: E402
from jointcompress.hf.causal import arithmetic_rows as rows, conv1d_to_linear, perplexity  # noqa: E402

RECIPE = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5, "end": 0.5, "exclude": ["lm_head"]},
                         {"type": "quant_lsq", "bits": 4, "exclude": ["lm_head"]},
                         {"type": "distill_kd", "temperature": 2.0, "alpha": 0.5}],
          "coordination": {"every": 1}}  # measured on every step, as the stored results were (now: every log_every)


def gpt2():
    torch.manual_seed(0)
    return conv1d_to_linear(GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                                       bos_token_id=1, eos_token_id=2)))


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        bos_token_id=1, eos_token_id=2, pad_token_id=0))


def dict_loader(ids, mask, batch_size: int, seed: int):
    data = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": ids[i].masked_fill(mask[i] == 0, -100)}
            for i in range(len(ids))]
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True,
                                       generator=torch.Generator().manual_seed(seed))


def train_teacher(build, train, held):
    model = build()
    recipe = {"training": {"epochs": 3, "lr": 3e-3, "batch_size": 32, "metric": "neg_perplexity", "optimizer": "adamw"}}
    evaluate = lambda m: {"neg_perplexity": -perplexity(m, *held)}  # noqa: E731
    jointcompress.compress(model, recipe, dict_loader(*train, 32, 0), evaluate, distributed=False)
    return model.eval()


def compress_in_plain_loop(teacher, train, epochs: int = 2):
    model = copy.deepcopy(teacher)
    loader = dict_loader(*train, 32, 1)
    session = jointcompress.prepare(model, RECIPE, total_steps=epochs * len(loader), teacher=teacher)
    optimizer = torch.optim.AdamW(session.param_groups(lr=2e-3))
    session.bind(optimizer)
    model.train()
    for _ in range(epochs):
        for batch in loader:
            terms = session.loss(model(**batch), batch)
            optimizer.zero_grad()
            session.backward(terms)
            session.before_step()
            optimizer.step()
            session.after_step()
    return model, session


def run(build, train, held) -> dict:
    t0 = time.perf_counter()
    teacher = train_teacher(build, train, held)
    model, session = compress_in_plain_loop(teacher, train)
    masked_ppl = perplexity(model, *held)
    metrics = session.metrics()
    spec = session.finalize()
    final_ppl = perplexity(model, *held)
    with tempfile.TemporaryDirectory() as d:
        manifest = save(model, spec, Path(d) / "artifact", builder=build, example_inputs=held[0][:2])
        loaded = load(Path(d) / "artifact", build)
    prompt = held[0][1:3, :6]
    gen = loaded.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    return {
        "architecture": type(teacher).__name__,
        "parameters": sum(p.numel() for p in build().parameters()),
        "dense_fp32_parameter_bytes": sum(p.numel() * p.element_size() for p in build().parameters()),  # tied once
        "dense_fp32_state_dict_bytes": sum(v.numel() * v.element_size() for v in build().state_dict().values()),
        "artifact_bytes": manifest["bytes"]["total"],
        "perplexity": {"teacher": perplexity(teacher, *held), "student_masked": masked_ppl,
                       "student_finalized": final_ppl, "artifact_loaded": perplexity(loaded, *held)},
        "techniques": metrics,
        "generate": {"prompt": prompt.tolist(), "greedy_8_tokens": gen[:, prompt.shape[1]:].tolist(),
                     "pattern_continuation": [[3 + (r[-1] - 3 + j * ((r[-1] - r[-2]) % 61)) % 61 for j in range(1, 9)]
                                              for r in prompt.tolist()]},
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "causal_lm_session.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    train, held = rows(2048, 0), rows(256, 1)
    results = {"command": "python benchmarks/causal_lm_session.py", "threads": 1, "train_rows": 2048, "heldout_rows": 256,
               "recipe": RECIPE, "runs": [run(b, train, held) for b in (gpt2, llama)]}
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
