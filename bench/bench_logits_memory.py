"""Peak memory of one PPO training micro-step with Llama-3's vocabulary (128,256 tokens), not a test.

    python bench/bench_logits_memory.py                        # this checkout
    python bench/bench_logits_memory.py --before /tmp/old      # and an older checkout of the project, for before/after

A tiny Llama (hidden 16, 2 layers, untied embeddings) with 128,256 tokens, so that the logits dominate; one
micro-batch of 2 sequences, 64 prompt + 64 response tokens, no padding. Measured: one rto.ppo_update over that
micro-batch (policy and critic forward, both losses, backward, the statistics, the optimiser step), after one warm-up
update so that the optimisers' state already exists. Peak = the process's high-water resident memory during the
update minus its resident memory just before (Linux: writing 5 to /proc/self/clear_refs resets the high-water
mark). The yardstick is the size of the micro-step's response logits, b x R x V x 4 bytes (fp32). Each checkout
runs in a process of its own, with its own rto.py and common.py.
"""

import argparse
import ctypes
import gc
import json
import subprocess
import sys
from pathlib import Path

B, P, R, V = 2, 64, 64, 128_256
MB = 2**20


def status(key):
    with open("/proc/self/status") as f:
        # kB -> bytes
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def child(root):
    """One measurement with the rto.py and common.py of `root`; prints a JSON line."""
    sys.path.insert(0, root)
    from types import SimpleNamespace

    import torch
    from accelerate import Accelerator
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    import rto

    torch.manual_seed(0)
    cfg = dict(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    models = {
        "policy": LlamaForCausalLM(LlamaConfig(**cfg)),
        "critic": LlamaForSequenceClassification(LlamaConfig(**cfg, num_labels=1)),
    }
    acc = Accelerator(cpu=True)
    optimizers, schedulers = [], []
    for name in ("policy", "critic"):
        opt = torch.optim.Adam(models[name].parameters(), lr=1e-6)
        models[name], opt = acc.prepare(models[name], opt)
        optimizers.append(opt)
        schedulers.append(torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    g = torch.Generator().manual_seed(0)
    ro = {
        "input_ids": torch.randint(1, V, (B, P + R), generator=g),
        "attention_mask": torch.ones(B, P + R).long(),
        "response_mask": torch.ones(B, R),
        "ended": torch.ones(B).bool(),
        "prompt_len": P,
        "logprobs": -torch.rand(B, R, generator=g) * 10,
        "advantages": torch.randn(B, R, generator=g),
        "values": torch.zeros(B, R),
        "returns": torch.randn(B, R, generator=g),
    }
    args = SimpleNamespace(
        ppo_epochs=1,
        temperature=1.0,
        eps_clip=0.2,
        value_clip=0.2,
        max_grad_norm=1.0,
        skip_nonfinite=False,
        packing=False,
    )
    sizes = {"rollout": B, "mini": B, "micro": B, "accum": 1}
    # warm-up: the optimisers' state
    rto.ppo_update(acc, ro, models, optimizers, schedulers, args, sizes)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed memory back, so that RSS is what is in use
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark
    rto.ppo_update(acc, ro, models, optimizers, schedulers, args, sizes)
    print(json.dumps({"peak_bytes": status("VmHWM") - before}))


def measure(root):
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(root)],
        capture_output=True,
        text=True,
        env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"},
    )
    if out.returncode:
        sys.exit(f"error: the measurement in {root} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", help="an older checkout of the project to compare with")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.child:
        return child(a.child)
    logits = B * R * V * 4
    print(
        f"micro-batch {B} x ({P} prompt + {R} response) tokens, vocabulary {V:,}: "
        f"response logits {logits / MB:.1f} MiB (fp32)"
    )
    roots = ([("before", a.before)] if a.before else []) + [
        ("this checkout", Path(__file__).resolve().parents[1])
    ]
    for name, root in roots:
        peak = measure(root)
        print(
            f"{name:>14}: peak {peak / MB:7.1f} MiB = {peak / logits:.2f} x the response logits   ({root})"
        )


if __name__ == "__main__":
    main()
