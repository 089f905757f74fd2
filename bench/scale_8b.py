"""The 8B recipe's memory and time per GPU, computed (not measured): prints the tables of docs/scale.md.

    python bench/scale_8b.py [--gpus 8] [--hbm_tb_s 2.0] [--tflops 312]
    python bench/scale_8b.py --lora_rank 16 [--generation_batch_size 64]   # one GPU with adapters (docs/lora.md)

recipes/llama3_8b_ultrafeedback.sh on 8 x A100-80GB under configs/gpu8_fsdp.yaml (FSDP2 full shard, bf16 compute,
fp32 master weights): Llama-3-8B policy, reference and DPO model; reward model and critic on the same backbone
without the LM head. Every figure is arithmetic on the shapes below, the recipe's flags and the stated hardware
rates; the assumptions are printed with the tables. Nothing here touches a GPU.
"""

import argparse

GB = 1e9
# Llama-3-8B
VOCAB, HIDDEN, LAYERS, FFN, HEADS, KV_HEADS = 128_256, 4096, 32, 14_336, 32, 8
HEAD_DIM = HIDDEN // HEADS
# one decoder layer
LAYER = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV_HEADS * HEAD_DIM + 3 * HIDDEN * FFN + 2 * HIDDEN
# embeddings, layers, final norm, LM head (untied): 8.03e9
LM = 2 * VOCAB * HIDDEN + LAYERS * LAYER + HIDDEN
# critic and reward model: no LM head, a 1-wide score head: 7.50e9
SCORER = LM - VOCAB * HIDDEN + HIDDEN
# the recipe's flags (per GPU: the global sizes / --gpus)
ROLLOUT, GEN_BATCH, MICRO, MAX_LEN = 1024, 32, 2, 1024 + 1024
PROMPT, RESPONSE = (
    175,
    500,
)  # assumed mean lengths (UltraFeedback prompts; responses of a chat model)
PAD_FROZEN, PAD_UPDATE = (
    0.346,
    0.535,
)  # padding shares measured by bench/bench_smollm2.py --padding_only
KV_PER_TOKEN = 2 * LAYERS * KV_HEADS * HEAD_DIM * 2  # K and V, bf16: 128 KiB


def memory(gpus):
    """GB per GPU, by phase: (phase, [(what, GB)])."""
    trained, frozen = (
        (LM, SCORER),
        (LM, LM, SCORER),
    )  # policy, critic; reference, DPO model, reward model

    def states(b):
        return sum(n * b for n in trained) / gpus / GB  # bytes per parameter of the trained models

    frozen_states = sum(n * 2 for n in frozen) / gpus / GB  # bf16
    layer_bf16 = LAYER * 2 / GB
    head_bf16 = VOCAB * HIDDEN * 2 / GB
    # checkpointed layer inputs, bf16, both models
    activations = 2 * MICRO * MAX_LEN * HIDDEN * 2 * LAYERS / GB
    per_token = (
        2 * HIDDEN + 2 * KV_HEADS * HEAD_DIM + 4 * FFN
    ) * 2  # one layer's recomputed activations, bf16
    return [
        (
            "load",
            [
                ("trained fp32 weights, no gradients or Adam state yet", states(4)),
                ("frozen bf16 weights", frozen_states),
            ],
        ),
        (
            "rollout",
            [
                (
                    "trained: fp32 weights + Adam's two moments (gradients freed by zero_grad)",
                    states(12),
                ),
                ("frozen bf16 weights", frozen_states),
                ("the policy gathered whole in bf16 for generate", LM * 2 / GB),
                (
                    f"KV cache, {GEN_BATCH} x {MAX_LEN} tokens x {KV_PER_TOKEN // 1024} KiB",
                    GEN_BATCH * MAX_LEN * KV_PER_TOKEN / GB,
                ),
            ],
        ),
        (
            "frozen pass",
            [
                ("trained, as in the rollout", states(12)),
                ("frozen bf16 weights", frozen_states),
                ("two decoder layers gathered (one computing, one prefetched)", 2 * layer_bf16),
                ("the head's chunks: 256 MiB of fp32 logits + one temporary", 2 * 2**28 / GB),
            ],
        ),
        (
            "update",
            [
                ("trained: fp32 weights, gradients, Adam's two moments", states(16)),
                ("frozen bf16 weights", frozen_states),
                (
                    f"checkpointed activations of both models, {MICRO} x {MAX_LEN} tokens",
                    activations,
                ),
                (
                    "the policy's final norm + LM head, kept gathered from forward to backward",
                    head_bf16,
                ),
                (
                    "LM head backward: fp32 grad_w + the fp32 copy of each chunk's bf16 product",
                    2 * head_bf16 * 2,
                ),
                ("two decoder layers gathered", 2 * layer_bf16),
                (
                    "one layer's recomputed activations and their gradients",
                    2 * MICRO * MAX_LEN * per_token / GB,
                ),
            ],
        ),
    ]


def lora_params(rank):
    """Adapter parameters of one model under --lora_target_modules all-linear: rank x (in + out) for q, k, v, o,
    gate, up, down in every layer. The same formula gives 5.01M for bench/bench_lora_memory.py's 71M model at rank
    16 (policy + critic), as measured there."""
    kv = KV_HEADS * HEAD_DIM
    return LAYERS * rank * (2 * HIDDEN + 2 * (HIDDEN + kv) + 2 * HIDDEN + 3 * (HIDDEN + FFN))


def lora_memory(rank, gen_batch, micro, dpo_adapter=True):
    """GB on one GPU, by phase, with adapters (recipes/llama3_8b_lora_1gpu.sh): two bf16 bases (SFT: policy,
    reference, DPO adapter; reward model: critic, reward model), adapters and their gradients and Adam state in
    fp32 (16 bytes a parameter, bench/bench_lora_memory.py), nothing sharded or gathered."""
    bases = (LM + SCORER + (0 if dpo_adapter else LM)) * 2 / GB  # bf16
    # + the critic's head copy; weights, grads, 2 moments
    adapters = (2 * lora_params(rank) + HIDDEN) * 16 / GB
    # checkpointed layer inputs, bf16, both models
    activations = 2 * micro * MAX_LEN * HIDDEN * 2 * LAYERS / GB
    per_token = (2 * HIDDEN + 2 * KV_HEADS * HEAD_DIM + 4 * FFN) * 2
    base = [
        (f"bases in bf16 ({'2' if dpo_adapter else '3: a full DPO model'})", bases),
        (f"adapters rank {rank}: fp32 weights, gradients, Adam", adapters),
    ]
    return [
        (
            "rollout",
            base
            + [
                (
                    f"KV cache, {gen_batch} x {MAX_LEN} tokens x {KV_PER_TOKEN // 1024} KiB",
                    gen_batch * MAX_LEN * KV_PER_TOKEN / GB,
                )
            ],
        ),
        (
            "frozen pass",
            base + [("the head's chunks: 256 MiB of fp32 logits + one temporary", 2 * 2**28 / GB)],
        ),
        (
            "update",
            base
            + [
                (
                    f"checkpointed activations of both models, {micro} x {MAX_LEN} tokens",
                    activations,
                ),
                (
                    "LM head backward (frozen head: no grad_w): fp32 copies of a chunk's product",
                    2 * 2**28 / GB,
                ),
                (
                    "one layer's recomputed activations and their gradients",
                    2 * micro * MAX_LEN * per_token / GB,
                ),
            ],
        ),
    ]


def times(gpus, tflops, hbm):
    """Seconds per iteration per phase, for the recipe's flags and with --generation_logprobs too."""
    prompts = ROLLOUT // gpus
    real = prompts * (PROMPT + RESPONSE)  # tokens of the rollout on one GPU
    rate = tflops * 1e12 * 0.4  # 40% of the dense bf16 peak for forward/backward
    bandwidth = hbm * 1e12 * 0.6  # 60% of the HBM bandwidth for decoding
    calls = prompts // GEN_BATCH
    # speed.prefill's StaticCache: every step attends over the prompt and room for all the new tokens (masked)
    cache = GEN_BATCH * (PROMPT + MAX_LEN // 2) * KV_PER_TOKEN  # bytes of KV cache read per step
    step_read = (LM * 2 + cache) / bandwidth  # weights and cache read once per decode step
    step_overhead = (
        0.010,
        0.020,
    )  # Python, ~20 kernel launches per layer x 32 layers, a host sync per step
    rollout = [calls * MAX_LEN // 2 * (step_read + o) for o in step_overhead]

    def frozen(models):
        return 2 * models * real / (1 - PAD_FROZEN) / rate

    def update(pad):
        return 8 * (LM + SCORER) * real / (1 - pad) / rate  # fwd 2 + bwd 4 + recompute 2, per token

    recipe = {
        "rollout": rollout,
        "frozen pass (5 models)": frozen(3 * LM + 2 * SCORER),
        "update (--packing)": update(0),
    }
    return (
        step_read,
        step_overhead,
        recipe,
        {
            "frozen pass, --generation_logprobs (4 models)": frozen(2 * LM + 2 * SCORER),
            "update without --packing": update(PAD_UPDATE),
        },
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--tflops", type=float, default=312, help="dense bf16 peak per GPU (A100: 312)")
    p.add_argument(
        "--hbm_tb_s", type=float, default=2.0, help="HBM bandwidth per GPU, TB/s (A100-80GB: 2.0)"
    )
    p.add_argument(
        "--lora_rank",
        type=int,
        default=0,
        help="print the one-GPU LoRA table instead (docs/lora.md)",
    )
    p.add_argument("--generation_batch_size", type=int, default=GEN_BATCH)
    a = p.parse_args()
    if a.lora_rank:
        print(
            f"one GPU, LoRA rank {a.lora_rank}: {2 * lora_params(a.lora_rank) / 1e6:.1f}M adapter parameters "
            f"(policy + critic); --generation_batch_size {a.generation_batch_size}, --micro_batch_size {MICRO}\n"
        )
        for dpo_adapter in (True, False):
            print("| phase | held | GB |\n|---|---|---|")
            for phase, parts in lora_memory(
                a.lora_rank, a.generation_batch_size, MICRO, dpo_adapter
            ):
                print(
                    f"| {phase} | "
                    + "; ".join(f"{what} {gb:.2f}" for what, gb in parts)
                    + f" | **{sum(gb for _, gb in parts):.1f}** |"
                )
            print()
        return
    print(
        f"parameters: policy/reference/DPO {LM / 1e9:.2f}B, critic/reward model {SCORER / 1e9:.2f}B; "
        f"decoder layer {LAYER / 1e6:.1f}M; {a.gpus} GPUs\n"
    )
    print("| phase | held | GB per GPU |\n|---|---|---|")
    for phase, parts in memory(a.gpus):
        print(
            f"| {phase} | "
            + "; ".join(f"{what} {gb:.2f}" for what, gb in parts)
            + f" | **{sum(gb for _, gb in parts):.1f}** |"
        )
    memory_bound, overhead, recipe, variants = times(a.gpus, a.tflops, a.hbm_tb_s)
    print(
        f"\ndecode step: {memory_bound * 1e3:.0f} ms of memory traffic + {overhead[0] * 1e3:.0f}-"
        f"{overhead[1] * 1e3:.0f} ms of overhead; {ROLLOUT // a.gpus} prompts per GPU, mean lengths "
        f"{PROMPT} + {RESPONSE}, responses up to {MAX_LEN // 2} tokens\n"
    )
    print("| phase | seconds per iteration |\n|---|---|")
    low = high = 0
    for phase, s in recipe.items():
        lo, hi = s if isinstance(s, list) else (s, s)
        low, high = low + lo, high + hi
        print(f"| {phase} | {lo:.0f}" + (f"-{hi:.0f}" if hi != lo else "") + " |")
    print(f"| **iteration, the recipe's flags** | **{low:.0f}-{high:.0f}** |")
    for phase, s in variants.items():
        print(f"| {phase} | {s:.0f} |")


if __name__ == "__main__":
    main()
