"""Memory of one rto.py iteration, every weight trained versus LoRA rank 16 (not a test).

    python bench/bench_lora_memory.py [--rank 16] [--bf16]

A random Llama of 71M parameters (hidden 768, 12 layers, the built-in task's tokenizer, as bench/bench_loading.py)
saved as the SFT checkpoint, with a scalar head as the reward model, and as DPO checkpoint: for the full run the
same weights as a full folder, for the LoRA run an adapter on the SFT model (a stand-in for dpo.py --lora_rank).
Each mode runs rto.py for one iteration (8 prompts, 16 new tokens) in a process of its own, which reports:
    models     distinct models held (the reference, DPO and reward model are views of a base under LoRA)
    params     bytes of every parameter of those models
    grads      bytes of the trainable parameters' gradients (one per trainable parameter in the backward)
    optimizer  bytes of Adam's state after the update (exp_avg, exp_avg_sq, step)
    peak RSS   the process's high-water resident memory (VmHWM) minus its resident memory before main()
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20

PROBE = """
import json, os, sys
sys.path.insert(0, {root!r})
os.chdir({root!r})
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
import torch, common, rto
start, held = status("VmRSS"), {{}}
load = rto.load_models
def spy(args, accelerator):
    held["tokenizer"], held["models"], held["optimizers"] = out = load(args, accelerator)
    return out
rto.load_models = spy
rto.main({argv!r})
models = {{id(m): m for m in (getattr(v, "module", v) for v in held["models"].values())}}.values()
nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
params = {{id(p): p for m in models for p in m.parameters()}}.values()
state = [t for o in held["optimizers"] for s in o.state.values() for t in s.values() if torch.is_tensor(t)]
print("RESULT " + json.dumps({{"models": len(models), "params": nbytes(params),
      "grads": nbytes(p for p in params if p.requires_grad), "optimizer": nbytes(state),
      "peak_rss": status("VmHWM") - start, "trainable": sum(p.numel() for p in params if p.requires_grad)}}))
"""


def checkpoints(work, rank):
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    import common
    import data
    import lora

    tok = data.build_tiny_tokenizer(common.TOY)
    cfg = common.tiny_config(tok, hidden=768, layers=12)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(cfg)
    for name in ("sft", "dpo"):
        lm.save_pretrained(work / name)
        tok.save_pretrained(work / name)
    rm = LlamaForSequenceClassification(cfg.__class__(**{**cfg.to_dict(), "num_labels": 1}))
    rm.model.load_state_dict(lm.model.state_dict())
    rm.config.reward_mean, rm.config.reward_std = 0.0, 1.0
    rm.save_pretrained(work / "rm")
    tok.save_pretrained(work / "rm")
    flags = argparse.Namespace(
        lora_rank=rank, lora_alpha=2.0 * rank, lora_dropout=0.0, lora_target_modules="all-linear"
    )
    adapter = lora.add_adapter(
        common.load_causal_lm(str(work / "sft"), tok), flags, str(work / "sft")
    )
    adapter.lora.save_pretrained(work / "dpo_lora", selected_adapters=["default"])
    tok.save_pretrained(work / "dpo_lora")
    with open(work / "dpo_lora" / lora.LORA_BASE, "w") as f:
        json.dump({**adapter.lora.lora_base, "config": {}}, f)
    return sum(p.numel() for p in lm.parameters())


def run(work, lora, rank, bf16):
    argv = [
        "--sft_ckpt",
        str(work / "sft"),
        "--dpo_ckpt",
        str(work / ("dpo_lora" if lora else "dpo")),
        "--rm_ckpt",
        str(work / "rm"),
        "--output_dir",
        str(work / f"rto_{lora}"),
        "--overwrite",
        "--num_iterations",
        1,
        "--rollout_batch_size",
        8,
        "--mini_batch_size",
        8,
        "--max_new_tokens",
        16,
        "--eval_num_prompts",
        4,
        "--sample_every",
        0,
        *(["--lora_rank", rank] if lora else []),
        *(["--bf16"] if bf16 else []),
    ]
    code = PROBE.format(root=str(ROOT), argv=[str(a) for a in argv])
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")},
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(lines[0][7:])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--bf16", action="store_true")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        n = checkpoints(Path(tmp), a.rank)
        print(
            f"model: {n / 1e6:.1f}M parameters ({n * 4 / MB:.0f} MiB in float32); one rto.py iteration"
            f"{' --bf16' if a.bf16 else ''}"
        )
        print(
            f"{'mode':<14}{'models':>7}{'params MiB':>12}{'grads MiB':>11}{'Adam MiB':>10}{'trainable':>12}"
            f"{'peak RSS MiB':>14}"
        )
        for lora in (False, True):
            r = run(Path(tmp), lora, a.rank, a.bf16)
            mode = f"LoRA r={a.rank}" if lora else "full"
            print(
                f"{mode:<14}{r['models']:>7}{r['params'] / MB:>12.1f}{r['grads'] / MB:>11.1f}"
                f"{r['optimizer'] / MB:>10.1f}{r['trainable'] / 1e6:>11.2f}M{r['peak_rss'] / MB:>14.0f}"
            )


if __name__ == "__main__":
    main()
