"""LoRA adapters (--lora_rank, docs/lora.md): a stage trains an adapter (peft) on a frozen base, and the roles that
share that base are the same model with an adapter switched on or off (AdapterView), never a second copy of it.

When models may share a base: when their base weights are the same, checked by fingerprint() of the weights (not by
a path, which can name other weights tomorrow). An adapter folder records its base (the path it was trained on, and
that fingerprint, in lora_base.json); any stage given one as a checkpoint loads that base and merges the adapter in
(load_merged_adapter), unless rto.py can put it on a base it already holds (a second adapter). merged_weights
computes W + s B A from the tensors, for --merge_lora exports and the vLLM weight push; tests/test_lora.py holds it
equal to peft's own merge_and_unload().
"""

import contextlib
import importlib.util
import json
import os
import shutil

import torch

import common
import speed


def validate(args):
    """The checks of the LoRA flags (common.validate_shared calls it): one line for the first bad one."""
    common.check_at_least(args, 0, "lora_rank")
    common.check_between(args, "lora_dropout", 0, 0.99)
    if args.lora_rank:
        common.check_positive(args, "lora_alpha")
        peft_module()
    if args.merge_lora and not args.lora_rank:
        common.fail(
            "--merge_lora needs --lora_rank: without an adapter the checkpoint is already a plain model"
        )


LORA_BASE = "lora_base.json"  # in an adapter folder: {"base": path, "fingerprint": ..., "config": {extra keys}}


def peft_module():
    """peft, imported only when an adapter is used; without it, one line saying how to install it."""
    if importlib.util.find_spec("peft") is None:
        common.fail("--lora_rank and adapter checkpoints need the peft package (pip install peft)")
    import peft

    return peft


def is_adapter(path):
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def fingerprint(model):
    """sha256 of a model's base weights: every body tensor's name and shape and its values, rounded to bfloat16 (so
    that a float32 and a bfloat16 copy of one checkpoint agree), at up to 4096 evenly spaced positions. The output
    heads (lm_head, score) are left out: a causal LM and a reward model built on the same body share it."""
    import hashlib

    digest, state = hashlib.sha256(), model.state_dict()
    if any(t.is_meta for t in state.values()):
        return None  # shapes only (loads_weights): nothing to compare
    for name, t in sorted(state.items()):
        name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        if (
            name.startswith(("lm_head.", "score."))
            or ".lora_" in name
            or ".modules_to_save." in name
        ):
            continue
        flat = t.detach().reshape(-1)
        sample = (
            flat[:: max(1, len(flat) // 4096)][:4096].to("cpu", torch.bfloat16).view(torch.int16)
        )
        digest.update(f"{name}{tuple(t.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def add_adapter(model, args, base_path, scorer=False):
    """Put a new LoRA adapter ("default") into `model`, the only trainable parameters with, for a scorer (reward
    model, critic), a trainable copy of its head `score` (the original stays, for the adapter-off role). Returns the
    same transformers model, its layers adapted: that is what the stage trains and accelerator.prepare() wraps, so
    that under FSDP2 the root is the model generate() and the forward passes call. The peft wrapper, which switches
    adapters and saves them, is model.lora, kept off the module tree; it records the base for the adapter folder
    (save_adapter): `base_path` and the weights' fingerprint."""
    peft = peft_module()
    targets = args.lora_target_modules
    config = peft.LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets if targets == "all-linear" else targets.split(","),
        modules_to_save=["score"] if scorer else None,
    )
    base_fingerprint = fingerprint(model)
    wrapper = peft.get_peft_model(model, config)
    # a bf16 base (--bf16): adapters (peft keeps them in fp32) and the head copy in fp32
    for p in common.trainable(model):
        p.data = p.data.float()
    model.enable_input_require_grads()  # gradient checkpointing: the frozen embeddings' output must carry a grad
    wrapper.lora_base = {
        "base": os.path.abspath(base_path) if os.path.exists(base_path) else base_path,
        "fingerprint": base_fingerprint,
    }
    object.__setattr__(model, "lora", wrapper)  # not a submodule: no cycle in the module tree
    return model


@contextlib.contextmanager
def adapter_active(model, name):
    """Run model (add_adapter's) with adapter `name` on, or with name=None with every adapter off (the bare base, whose
    reward head is the original one); the trained adapter is active again afterwards. (peft's set_adapter makes
    the active adapter's weights require grad: switching back makes the trained one's do, the other's not.)"""
    wrapper = model.lora
    if name is None:
        with wrapper.disable_adapter():
            yield model
        return
    before = wrapper.active_adapter
    wrapper.set_adapter(name)
    try:
        yield model
    finally:
        wrapper.set_adapter(before)


class AdapterView:
    """A frozen role of a LoRA model, called like a model, without gradients: adapter `name` on (None: none).
    rto.py's reference is AdapterView(policy, None), its DPO model AdapterView(policy, "dpo"), its reward model
    AdapterView(critic, None), of the unwrapped trained models. `module` is that model (speed.response_logprobs and
    head_outputs read it)."""

    def __init__(self, model, name):
        self.module, self.name, self.config = model, name, model.config

    def __call__(self, **kwargs):
        with torch.no_grad(), adapter_active(self.module, self.name):
            return self.module(**kwargs)

    def modules(self):  # speed.reshard
        return self.module.modules()


def frozen_views(policy, critic, dpo_shares):
    """rto.py's frozen models as views of its two LoRA models' bases: the reference is the policy adapter-off, the
    reward model the critic adapter-off, the DPO model the policy's second adapter "dpo" when it has one."""
    views = {"ref": AdapterView(policy, None), "rm": AdapterView(critic, None)}
    if dpo_shares:
        views["dpo"] = AdapterView(policy, "dpo")
    return views


def add_second_adapter(model, path, flag, name):
    """Load the adapter folder at `path` into `model` (add_adapter's) as frozen adapter `name`, if it was trained
    on this base (same fingerprint); returns False when it was not, or `path` is not an adapter folder."""
    if (
        not is_adapter(path)
        or adapter_base(path, flag)["fingerprint"] != model.lora.lora_base["fingerprint"]
    ):
        return False
    model.lora.load_adapter(path, adapter_name=name, is_trainable=False)
    model.lora.set_adapter("default")
    for n, p in model.named_parameters():
        p.requires_grad_(p.requires_grad and f".{name}." not in n)
    return True


def adapter_on(accelerator, model, path, flag, model_flag):
    """Whether the checkpoint at `path` is an adapter on `model`'s base weights (the same fingerprint, whatever path
    it names); an adapter on other weights stops every process, the main one with one line."""
    if not is_adapter(path):
        return False
    mine = fingerprint(model)  # None: this rank holds shapes only; the main process holds weights
    theirs = adapter_base(path, flag)["fingerprint"]
    other = mine is not None and mine != theirs
    # every rank takes the branch the weights decide
    if common.reduce(accelerator, float(other)).item() > 0:
        if not accelerator.is_main_process:
            raise SystemExit(1)
        common.fail(
            f"{flag} {path}: an adapter trained on other base weights than {model_flag}'s (fingerprint {theirs}, "
            f"not {mine}); train it from the {model_flag} model, or pass a full (merged) checkpoint"
        )
    return True


def adapter_base(path, flag):
    try:
        with open(os.path.join(path, LORA_BASE)) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        common.fail(
            f"{flag} {path}: an adapter folder without a readable {LORA_BASE} (its base and fingerprint; write "
            f"adapters with this project's stages): {e}"
        )


def load_merged_adapter(auto_class, path, flag, what, **kwargs):
    """An adapter folder as a plain model: its recorded base loaded (checked against the recorded fingerprint),
    the adapter merged in, the extra config keys (reward_mean, dpo_beta) set. Returns (model, missing keys)."""
    peft, record = peft_module(), adapter_base(path, flag)
    base, missing = common.from_checkpoint(
        auto_class, record["base"], f"{flag} {path}'s base", what, **kwargs
    )
    if fingerprint(base) != record["fingerprint"]:
        common.fail(
            f"{flag} {path}: its base {record['base']} now holds other weights than the adapter was trained on "
            f"(fingerprint {fingerprint(base)}, recorded {record['fingerprint']})"
        )
    # peft froze it
    model = peft.PeftModel.from_pretrained(base, path).merge_and_unload().requires_grad_(True)
    for k, v in record.get("config", {}).items():
        setattr(model.config, k, v)
    # a reward head comes from the adapter
    saved = set(peft.PeftConfig.from_pretrained(path).modules_to_save or [])
    return model, [k for k in missing if k.split(".")[0] not in saved]


def save_adapter(model, state, tokenizer, out_dir, extra_config=None, files=None):
    """The adapter folder (adapter_config.json, adapter_model.safetensors: the "default" adapter and a scorer's
    head copy), the tokenizer and lora_base.json, adapter_config.json moved in last (it marks the folder whole)."""
    tmp = os.path.join(out_dir, ".saving")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(
        tmp, state_dict=state, selected_adapters=["default"], safe_serialization=True
    )
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, LORA_BASE), "w") as f:
        json.dump({**model.lora_base, "config": extra_config or {}}, f, indent=1)
    common.write_files(tmp, files)
    if os.path.exists(os.path.join(out_dir, "adapter_config.json")):
        os.remove(os.path.join(out_dir, "adapter_config.json"))
    for name in sorted(os.listdir(tmp), key=lambda n: n == "adapter_config.json"):
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    os.rmdir(tmp)


def merged_state_dict(model, state, name="default"):
    """A peft model's state dict (gathered, any dtype) -> the plain model's, adapter `name` merged in
    (merged_weights)."""
    return dict(merged_weights(model, state, name))


def merged_weights(model, state, name="default"):
    """(name, tensor) of the plain model, one at a time, from a peft model's state dict: W + s * B A for every adapted
    weight (s: the layer's scale, alpha / r, or alpha / sqrt(r) under rsLoRA; transposed for Conv1D layers), the
    head copy in place of the original head, other adapters dropped. Computed from the tensors, so it works on a
    gathered FSDP2 state dict as on one process; FSDP2's sharded tensors (DTensor) are gathered one at a time
    (vllm_engine.push takes the merged weights this way, never a whole second copy)."""

    def full(t):
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    for key, value in state.items():
        plain = key.removeprefix("base_model.model.")
        if (
            ".lora_" in plain
            or ".original_module." in plain
            or (".modules_to_save." in plain and f".modules_to_save.{name}." not in plain)
        ):
            continue
        value = full(value)
        if ".base_layer." in plain:
            module = key.split(".base_layer.")[0]
            plain = plain.replace(".base_layer.", ".")
            if plain.endswith(".weight"):
                # peft's LoRA layer: its own scale and weight layout
                layer = model.get_submodule(module)
                a = full(state[f"{module}.lora_A.{name}.weight"])  # (r, in)
                b = full(state[f"{module}.lora_B.{name}.weight"])  # (out, r)
                delta = layer.scaling[name] * (b.float() @ a.float())  # (out, in)
                if layer.fan_in_fan_out:  # GPT-2's Conv1D stores its weight as (in, out)
                    delta = delta.T
                value = (value.float() + delta).to(value.dtype)
        yield plain.replace(f".modules_to_save.{name}.", "."), value


def plain_model(model):
    """A peft model's underlying transformers model with no adapter layers, on the meta device (shapes and
    config only): what save_pretrained of a merged state dict needs."""
    from accelerate import init_empty_weights

    base = model.get_base_model()
    cls = type(base)  # FSDP2 swaps the class for FSDP<cls>, a subclass of (FSDPModule, cls)
    cls = cls.__bases__[-1] if speed.fsdp_modules(base) and cls.__name__.startswith("FSDP") else cls
    with init_empty_weights():
        return cls(base.config)
