"""Peak host memory of each rank while rto.py loads and shards its five models, 2 processes under FSDP2 (not a test).

    python bench/bench_loading.py [--bf16] [--before /tmp/old]     # an older checkout of the project, to compare

Both loading settings, back to back: configs/cpu_fsdp.yaml (fsdp_cpu_ram_efficient_loading: false, every rank
reads every checkpoint) and configs/cpu_fsdp_ram_efficient.yaml (true, as in the GPU configs: the main process
reads, the others build shapes and receive their shards). Per rank, and summed over the ranks (what a node holds).

A random Llama of 71M parameters (hidden 768, 12 layers, the built-in task's tokenizer) saved once as the SFT, DPO
and reference checkpoint, and with a scalar head as the reward model. Each checkout's rto.py runs under
`accelerate launch --config_file <config>` (this checkout's configs, 2 CPU processes) up to its first
rollout; there every rank writes its high-water resident memory (VmHWM) and its resident memory measured before
main() started (torch and the stage imported), and exits. Loading = the difference. A whole model in float32 is
the yardstick. Also the anonymous resident memory (RssAnon) gained by then: safetensors files are memory-mapped,
so pages of a checkpoint count in RSS once read although the kernel can drop them; RssAnon is what the models
themselves hold (a rank's shards), and RssFile: the checkpoint pages a rank read. On CPU a rank's shards are host
memory too; on GPUs they are device memory, and what stays in host memory is what a rank reads and builds.
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
import os, sys
sys.path.insert(0, {root!r})
os.chdir({root!r})
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
import rto
start, start_anon, start_file = status("VmRSS"), status("RssAnon"), status("RssFile")
def stop(*a, **k):  # at the first rollout every model is loaded and sharded
    with open({out!r} + "/rank-" + os.environ["RANK"] + ".txt", "w") as f:
        f.write(f"{{status('VmHWM')}} {{start}} {{status('RssAnon')}} {{start_anon}} "
                f"{{status('RssFile')}} {{start_file}}")
    os._exit(0)
rto.rollout = stop
rto.main({argv!r})
"""


def checkpoints(work):
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    import common
    import data

    lm, rm = work / "lm", work / "rm"
    if not (rm / "config.json").exists():
        tok = data.build_tiny_tokenizer(common.TOY)
        cfg = common.tiny_config(tok, hidden=768, layers=12)
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(lm)
        scorer = LlamaForSequenceClassification(LlamaConfig(**{**cfg.to_dict(), "num_labels": 1}))
        scorer.config.reward_mean, scorer.config.reward_std = 0.0, 1.0
        scorer.save_pretrained(rm)
        for folder in (lm, rm):
            tok.save_pretrained(folder)
    n = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(lm).parameters())
    return lm, rm, n


def measure(root, lm, rm, prompts, bf16, config):
    with tempfile.TemporaryDirectory() as out:
        argv = [
            "--sft_ckpt",
            str(lm),
            "--dpo_ckpt",
            str(lm),
            "--rm_ckpt",
            str(rm),
            "--dataset",
            str(prompts),
            "--rollout_batch_size",
            "2",
            "--mini_batch_size",
            "2",
            "--num_iterations",
            "1",
            "--sample_every",
            "0",
            "--output_dir",
            f"{out}/run",
        ] + ["--bf16"] * bf16
        (Path(out) / "probe.py").write_text(PROBE.format(root=str(root), out=out, argv=argv))
        # MALLOC_MMAP_THRESHOLD_: on CPU the tensors a rank receives from rank 0 (RAM-efficient loading) are host
        # memory, and glibc's moving mmap threshold would keep the freed ones in its heap (rank 1 then held up to
        # 1.4x its shards here); a fixed threshold returns them, so that what is counted is what the code holds.
        # On GPUs they are device memory.
        env = {
            **os.environ,
            "ACCELERATE_USE_CPU": "1",
            "OMP_NUM_THREADS": "1",
            "MALLOC_MMAP_THRESHOLD_": "65536",
        }
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--config_file",
                str(ROOT / "configs" / config),
                f"{out}/probe.py",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        files = [Path(out) / f"rank-{r}.txt" for r in (0, 1)]
        if not all(f.exists() for f in files):
            sys.exit(
                f"error: the run in {root} did not reach its first rollout:\n{proc.stderr[-3000:]}"
            )
        return [tuple(map(int, f.read_text().split())) for f in files]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", help="an older checkout of the project to compare with")
    p.add_argument("--bf16", action="store_true", help="pass --bf16 to rto.py")
    p.add_argument("--work", default="/tmp/bench_loading", help="where the checkpoints go")
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    lm, rm, n = checkpoints(work)
    prompts = work / "prompts.jsonl"
    import toy_task

    prompts.write_text(
        "".join(json.dumps({"context_messages": m}) + "\n" for m in toy_task.prompts("train", 8))
    )
    whole = n * 4
    print(
        f"model: {n / 1e6:.1f}M parameters, {whole / MB:.0f} MiB in float32; 5 models (policy, critic, "
        f"reference, DPO, reward model){' with --bf16' * a.bf16}"
    )
    for name, root in ([("before", a.before)] if a.before else []) + [("this checkout", ROOT)]:
        for config in ("cpu_fsdp.yaml", "cpu_fsdp_ram_efficient.yaml"):
            ranks = measure(root, lm, rm, prompts, a.bf16, config)
            # per rank: peak minus the memory before main()
            loading = [hwm - start for hwm, start, *_ in ranks]
            held = [anon - start_anon for _, _, anon, start_anon, *_ in ranks]
            # checkpoint pages mapped in
            read = [file - start_file for *_, file, start_file in ranks]
            print(
                f"{name}, {config}: loading peak "
                + ", ".join(
                    f"rank {r} {x / MB:.0f} MiB = {x / whole:.2f} models"
                    for r, x in enumerate(loading)
                )
                + f"; summed over ranks {sum(loading) / MB:.0f} MiB = {sum(loading) / whole:.2f} whole fp32 models; "
                f"anonymous memory held after loading, summed {sum(held) / MB:.0f} MiB; "
                "checkpoint pages read (RssFile) "
                + ", ".join(f"rank {r} {x / MB:.0f} MiB" for r, x in enumerate(read))
            )


if __name__ == "__main__":
    main()
