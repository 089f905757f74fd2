"""How a batch runs through a model, fast: each function here computes what plain lines elsewhere show, and a test
holds the two equal. Nothing here is needed to follow the algorithm.

    pack, packed_sdpa      a micro-batch's sequences end to end in one row, each attending to itself alone (within a
                           sliding window if the model has one), so no padding is computed; replaces the padded
                           forward (tests/test_rollout.py: packed_rows_give_the_padded_numbers...)
    forward                the model over a batch of the common layout, padded or packed
    response_logprobs      log-probs of the response tokens without the (B, R, V) logits (TokenLogprobs); replaces
                           rto.plain_token_logprobs (tests/test_logprobs.py: chunked_logprobs...match_rtos_plain_lines)
    head_outputs,          a scalar head's output at every position, and at the last real token
    sequence_scores
    prefill                the prompts' KV cache computed packed, in a StaticCache; replaces generate()'s own padded
                           prefill (tests/test_logprobs.py: prefill_caches_what_a_padded_forward_does...)
    sample                 one response per prompt, each prompt with its own seed, whatever its batch; replaces
                           generate(do_sample=True) (tests/test_rollout.py: sampler_draws_from_the_tempered_nucleus)

register() puts packed_sdpa among transformers' attention functions; common.load_causal_lm and load_scorer call it
(use_packed_sdpa) for every model they load with sdpa attention.
"""

import contextlib
import math
import weakref

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import common


# What a model says about tokens already chosen (data.py's batch layout): log-probs, values, scores; and
# statistics over the response tokens only.
def position_ids(attention_mask):
    """Positions counted from the first real token, so left padding does not shift them (as generate does)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def pack(batch):
    """The batch with its packed layout under 'packed', which forward() then runs: the real tokens of its sequences
    end to end in one row, positions restarting at 0 for each sequence, no padding computed. 'packed' holds:
        input_ids, position_ids: (1, L), L the batch's real tokens
        sequences: each sequence's (start, end) in the row, for packed_sdpa
        index: (B, T), where in the row each token of the padded batch is (0 on padding)
        columns: (B, R), where the column predicting each response token is (the one before it; 0 if masked)"""
    real = batch["attention_mask"].bool()  # (B, T)
    lengths = real.sum(-1)  # (B,)
    ends = lengths.cumsum(0)  # (B,): where each sequence ends in the row
    positions = position_ids(real.long())  # (B, T): from 0 at each sequence's first real token
    index = ((ends - lengths)[:, None] + positions) * real  # (B, T)
    ends = ends.tolist()  # one host sync: packed_sdpa cuts the row on the host
    # response token j is predicted at padded column P-1+j
    P = batch["prompt_len"]
    mask = batch["response_mask"]
    columns = (index[:, P - 1 : P - 1 + mask.shape[1]] * mask).long()  # (B, R)
    return {
        **batch,
        "packed": {
            "input_ids": batch["input_ids"][real][None],
            "position_ids": positions[real][None],
            "sequences": list(zip([0] + ends[:-1], ends, strict=True)),
            "index": index,
            "columns": columns,
        },
    }


def packed_sdpa(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, sequences=None, **kwargs
):
    """transformers' sdpa attention, except in two cases. Over a packed row (forward() passes its `sequences`) each
    sequence attends causally to itself alone, one kernel call per sequence, within the layer's sliding window if it
    has one: sdpa over the whole row would compute every pair of positions in it, then mask out the pairs across
    sequences (on the CPU, and on GPUs without a variable-length kernel); the mask given alongside is not read.
    Attention that sdpa cannot express here (a position bias, attention sinks) stops the run with one line. And on
    the CPU, grouped-query attention under a mask (padded batches, every decoding step) is left to the kernel,
    which has it: transformers copies the key and value heads out to the query heads' number first, for GPU kernels
    that lack it. query (b, h, L, d), key and
    value (b, h_kv, L_kv, d)."""
    grouped = query.shape[1] != key.shape[1]
    if sequences is not None:
        unsupported = [
            k for k in ("position_bias", "s_aux", "sinks", "softcap") if kwargs.get(k) is not None
        ]
        if unsupported or kwargs.get("is_causal") is False:
            common.fail(
                f"packed rows: {type(module).__name__} attends with {unsupported or 'no causal mask'}, which packed "
                "attention does not compute; pass --packing false"
            )
        # a layer of a sliding-window model: each query sees `window` keys
        window = kwargs.get("sliding_window")
        outs = []
        for s, e in sequences:
            mask = None  # causal over the whole sequence (is_causal)
            if window and e - s > window:
                mask = sliding_causal_mask(e - s, window, query.device)  # (e - s, e - s)
            outs.append(
                torch.nn.functional.scaled_dot_product_attention(
                    query[:, :, s:e],
                    key[:, :, s:e],
                    value[:, :, s:e],
                    attn_mask=mask,
                    dropout_p=dropout,
                    is_causal=mask is None,
                    scale=scaling,
                    enable_gqa=grouped,
                )
            )  # (1, h, e - s, d)
        out = torch.cat(outs, dim=2)  # (1, h, L, d)
    elif (
        grouped
        and attention_mask is not None
        and query.device.type == "cpu"
        and kwargs.get("position_bias") is None
    ):
        out = torch.nn.functional.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=dropout,
            scale=scaling,
            enable_gqa=True,
        )
    else:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    return out.transpose(1, 2).contiguous(), None


def sliding_causal_mask(n, window, device):
    """(n, n) bool: query i sees key j when 0 <= i - j < window (transformers' sliding_window_overlay)."""
    i = torch.arange(n, device=device)
    back = i[:, None] - i[None, :]  # (n, n): how far key j lies behind query i
    return (back >= 0) & (back < window)


def register():
    """packed_sdpa among transformers' attention functions, as "sdpa_packed" (padded batches get sdpa's masks)."""
    AttentionInterface.register("sdpa_packed", packed_sdpa)
    AttentionMaskInterface.register("sdpa_packed", sdpa_mask)


def use_packed_sdpa(model):
    """A model that attends with sdpa attends with packed_sdpa, which is the same but for packed rows."""
    register()
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation("sdpa_packed")
    return model


def packed_kwargs(model, rows):
    """What a packed row runs with: its positions, and for packed_sdpa its sequences with a placeholder 4D mask
    (one is passed through as is, so transformers builds no (L, L) mask that packed_sdpa would not read)."""
    config = getattr(model, "module", model).config  # DDP
    # transformers finds the sequences from the positions
    if config._attn_implementation != "sdpa_packed":
        return {"input_ids": rows["input_ids"], "position_ids": rows["position_ids"]}
    return {
        "input_ids": rows["input_ids"],
        "position_ids": rows["position_ids"],
        "sequences": rows["sequences"],
        "attention_mask": torch.ones(1, 1, 1, 1, dtype=torch.bool, device=rows["input_ids"].device),
    }


def forward(model, batch, **kwargs):
    """The model over a batch of the common layout: padded, or packed if it holds a layout from pack()."""
    if "packed" in batch:
        return model(**packed_kwargs(model, batch["packed"]), use_cache=False, **kwargs)
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=position_ids(batch["attention_mask"]),
        use_cache=False,
        **kwargs,
    )


# float32 logits of at most this size (and one temporary as large) exist at once
LOGITS_CHUNK_BYTES = 2**28


def response_logprobs(model, batch, temperature=1.0, with_entropy=False):
    """log pi(token | prefix) of each response token, (B, R), 0 on padding; with_entropy=True also returns the
    entropy of the distribution at each of those positions, (B, R), as a statistic (no gradient).

    The model's lm_head is asked for the R + 1 last columns only (logits_to_keep; packed: the R columns of each
    sequence that predict its response tokens), and for those it returns the
    log-probs straight from the hidden states (TokenLogprobs): the (B, R, V) logits never exist whole, in the
    forward or the backward, which at V = 128,256 would be several times the size of everything else in a micro-step.
    The swap happens inside the model's own forward, so DDP and FSDP2 see an ordinary forward of the whole model.
    A head that is not a plain bias-free linear map, or a model that changes its logits after the head
    (changes_logits: soft-capping, logit scales), gets the plain computation from the full logits instead."""
    tokens, mask = batch["input_ids"][:, batch["prompt_len"] :], batch["response_mask"]  # (B, R)
    inner = getattr(model, "module", model)  # DDP
    head, caught = inner.get_output_embeddings(), {}
    fused = (
        isinstance(head, torch.nn.Linear)
        and head.bias is None
        and not changes_logits(model, head, tokens)
    )

    packed = "packed" in batch  # rto.py --packing
    keep = batch["packed"]["columns"].flatten() if packed else tokens.shape[1] + 1

    def head_to_logprobs(hidden):  # padded (B, R + 1, d): columns P - 1 .. P + R - 1
        # the last padded column predicts nothing
        hidden = hidden[0] if packed else hidden[:, :-1].flatten(0, 1)  # packed: (1, B * R, d)
        logprobs, entropy = TokenLogprobs.apply(
            hidden, head.weight, tokens.flatten(), temperature, with_entropy
        )
        caught["entropy"] = entropy.view(tokens.shape) if with_entropy else None
        return logprobs.view(tokens.shape)

    if fused:
        head.forward = head_to_logprobs  # an attribute of this one module, removed below
    try:
        out = forward(model, batch, logits_to_keep=keep)
    finally:
        if fused:
            del head.forward
    if fused:
        logprobs, entropy = out.logits, caught["entropy"]
    else:  # (B, R, V) logits, the plain way
        logits = (
            out.logits.view(*tokens.shape, -1) if packed else out.logits[:, :-1]
        ).float() / temperature
        logprobs = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
        entropy = torch.cat(
            [torch.special.entr(c.detach().softmax(-1)).sum(-1) for c in logits.split(16, 1)], 1
        )
    return (logprobs * mask, entropy * mask) if with_entropy else logprobs * mask


# output head -> whether its model changes the head's output
CHANGES_LOGITS = weakref.WeakKeyDictionary()


def changes_logits(model, head, tokens):
    """Whether the model's forward changes what its head returns (Gemma's soft-capping, Cohere's and Granite's
    scales, Falcon-H1's multiplier), in which case response_logprobs' head, which returns log-probs in place of the
    logits, must not be swapped in. Found once per model by a no-grad forward of one token whose head returns a
    marker tensor: the model hands back that very tensor, or a new one it made from it. (Under gradients a second
    forward before the backward would break DDP; the no-grad probe does not.)"""
    if head not in CHANGES_LOGITS:
        made = {}

        def marker(hidden):  # float32, as the log-probs: a model's .float() returns it unchanged
            made["marker"] = hidden[..., 0].float()
            return made["marker"]

        head.forward = marker
        try:
            with torch.no_grad():
                out = model(input_ids=tokens[:1, :1], use_cache=False, logits_to_keep=1)
        finally:
            del head.forward
        CHANGES_LOGITS[head] = out.logits is not made["marker"]
    return CHANGES_LOGITS[head]


class TokenLogprobs(torch.autograd.Function):
    """log softmax(h W^T / T)[token] for N rows of hidden states h (N, d), head weight W (V, d), tokens (N,); and,
    if asked, the entropy of each row's softmax (no gradient). It works a few rows at a time (chunks) and
    keeps only h and W for the backward, which computes each chunk's logits again:
        d logp / d logits = (onehot(token) - softmax(logits)) / T,   dh = dlogits W,   dW = dlogits^T h.
    The head computes in the dtype it would in the model: bf16 under autocast or FSDP's mixed precision."""

    @staticmethod
    def forward(ctx, h, weight, tokens, temperature, with_entropy):
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        # rows per chunk: as many as 256 MiB of logits hold (Llama-3-8B, 2 x 1024 tokens: 4 chunks of 523 rows).
        # Each chunk reads all of W, so fewer, larger chunks run nearer the matmul rate: W is (V, d), 113 MB for
        # SmolLM2, and a chunk of a few dozen rows spends its time reading it
        w, rows = weight.to(dtype), max(1, min(len(h), LOGITS_CHUNK_BYTES // (4 * weight.shape[0])))
        logprobs, lses, entropy = (
            h.new_empty(len(h), dtype=torch.float),
            [],
            h.new_empty(len(h), dtype=torch.float),
        )
        for i in range(0, len(h), rows):
            # (n, V)
            logits = (
                torch.nn.functional.linear(h[i : i + rows].to(dtype), w).float().div_(temperature)
            )
            lse = logits.logsumexp(-1)
            logprobs[i : i + rows] = logits.gather(-1, tokens[i : i + rows, None]).squeeze(-1) - lse
            if with_entropy:  # H = lse - sum p * logits
                entropy[i : i + rows] = lse - logits.sub(lse[:, None]).exp_().mul_(logits).sum(-1)
            lses.append(lse)
        ctx.save_for_backward(h, weight, tokens, torch.cat(lses))
        ctx.temperature, ctx.dtype, ctx.rows = temperature, dtype, rows
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad, _):
        h, weight, tokens, lse = ctx.saved_tensors
        w, rows, grad = weight.to(ctx.dtype), ctx.rows, grad.float()
        need_w = ctx.needs_input_grad[1]  # a frozen head (LoRA) needs no (V, d) fp32 gradient
        grad_h = torch.empty_like(h)
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float, device=weight.device) if need_w else None
        )
        for i in range(0, len(h), rows):
            hi, g = h[i : i + rows].to(ctx.dtype), grad[i : i + rows]
            # (n, V), then in place:
            dlogits = torch.nn.functional.linear(hi, w).float().div_(ctx.temperature)
            dlogits.sub_(lse[i : i + rows, None]).exp_().mul_(-g[:, None])  # - softmax * g
            dlogits.scatter_add_(1, tokens[i : i + rows, None], g[:, None]).div_(ctx.temperature)
            dlogits = dlogits.to(ctx.dtype)
            grad_h[i : i + rows] = (dlogits @ w).to(h.dtype)
            if need_w:
                grad_w += (dlogits.T @ hi).float()  # (V, d), summed in float32 over the chunks
        return grad_h, grad_w.to(weight.dtype) if need_w else None, None, None, None


def head_outputs(model, batch):
    """The scalar head's output at every position, (B, T), from a forward pass of the whole model.

    transformers' sequence-classification models apply the head to every position and then pool; we catch
    the head's output with a hook, so the forward goes through any DDP/FSDP wrapper (gradients stay in sync)."""
    head = model
    while hasattr(head, "module"):  # DDP / FSDP1 wrappers
        head = head.module
    caught = []
    hook = head.score.register_forward_hook(lambda module, inputs, output: caught.append(output))
    try:
        forward(model, batch)
    finally:
        hook.remove()
    # (B, T), packed (1, L): put back where the real tokens were
    out = caught[0].squeeze(-1).float()
    return (
        out.flatten()[batch["packed"]["index"]] * batch["attention_mask"]
        if "packed" in batch
        else out
    )


def sequence_scores(model, batch):
    """Reward-model score read at the last real token of prompt + response, whatever the padding: (B,).

    Read from the attention mask rather than by looking for pad tokens, so it stays right when pad == EOS."""
    T = batch["attention_mask"].shape[1]
    last = T - 1 - batch["attention_mask"].flip(-1).argmax(-1)  # index of the last 1 in each row
    return head_outputs(model, batch).gather(1, last[:, None]).squeeze(1)


@torch.no_grad()
def prefill(model, input_ids, attention_mask, max_new_tokens):
    """The KV cache of left-padded prompts but their last column, from one forward pass over the prompts packed
    (pack(), packed_sdpa), so none of the padding is computed; generate() given it runs the last column and goes on.
    The cache is a StaticCache with room for max_new_tokens more: decoding writes each token's keys and values in
    place, where a DynamicCache would copy the whole cache to grow it by one column at every step. Generate with
    disable_compile=True: on GPUs transformers compiles the decoding step for a StaticCache, once per cache size.
    None, and generate() runs the padded prompts itself, for attention other than packed_sdpa, for caches that are
    not full attention in every layer (sliding windows, linear attention), and while training with gradient
    checkpointing (transformers then keeps no cache)."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    B, W = input_ids.shape
    # allocated at its first update
    cache = StaticCache(config=model.config, max_cache_len=W + max_new_tokens)
    # full attention in every layer
    full = all(type(layer) is StaticLayer for layer in cache.layers)
    checkpointing = model.training and getattr(model, "is_gradient_checkpointing", False)
    empty = not attention_mask[:, :-1].any()  # every prompt one token long: nothing to cache
    if not full or checkpointing or empty or model.config._attn_implementation != "sdpa_packed":
        return None
    rows = pack(
        {
            "input_ids": input_ids[:, :-1],
            "attention_mask": attention_mask[:, :-1],
            "response_mask": attention_mask[:, :0],
            "prompt_len": W - 1,
        }
    )["packed"]
    # (1, h, L, d)
    packed = model(**packed_kwargs(model, rows), use_cache=True, logits_to_keep=1).past_key_values
    # (B * (W - 1),): each padded position's place in the row (padding: 0, masked)
    index = rows["index"].flatten()
    for i, layer in enumerate(packed.layers):
        # (B, h, W - 1, d) each, left-padded as the prompts
        keys, values = (
            t.transpose(1, 2).flatten(0, 1)[index].unflatten(0, (B, W - 1)).transpose(1, 2)
            for t in (layer.keys, layer.values)
        )
        cache.update(keys.contiguous(), values.contiguous(), i)
    return cache


def draw_with_own_generators(generators, temperature, top_p, logprobs=None):
    """A logits processor for greedy generate(): Gumbel-max sampling of softmax(logits / T) in the top-p nucleus,
    row i with its own generator, so a prompt's draw does not depend on its batch; each step appends
    log softmax(logits / T)[drawn token], (b,), to a list `logprobs` (--generation_logprobs)."""

    def pick(input_ids, logits):  # (b, V) logits of the next token
        tempered = logits = logits.float() / temperature
        if top_p < 1:  # drop the tokens outside the smallest set whose probability reaches top_p
            p, idx = logits.softmax(-1).sort(-1, descending=True)
            outside = (p.cumsum(-1) - p) >= top_p  # the top token is always kept
            logits = logits.masked_fill(outside.scatter(-1, idx, outside), -math.inf)
        gumbel = torch.stack(
            [-torch.empty_like(logits[0]).exponential_(generator=g).log() for g in generators]
        )
        scores = logits + gumbel
        # generate() takes the argmax of the scores: that is the drawn token
        if logprobs is not None:
            drawn = scores.argmax(-1, keepdim=True)
            logprobs.append(tempered.gather(-1, drawn)[:, 0] - tempered.logsumexp(-1))
        return scores

    return pick


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompt_ids,
    seeds,
    max_new_tokens,
    temperature=1.0,
    top_p=1.0,
    width=None,
    logprobs=False,
):
    """One response per prompt (lists of token ids), prompt i drawn with seed seeds[i] whatever its batch: greedy
    generate() over Gumbel-perturbed logits, the prompts prefilled unpadded. Replaces generate(do_sample=True) on
    the global RNG, the same distribution (tests/test_rollout.py: sampler_draws_from_the_tempered_nucleus). The
    global RNG is not touched. Returns common.response_batch's layout, prompts left-padded to `width`; with
    logprobs=True "logprobs" (b, R) holds log softmax(logits / T) of the drawn tokens."""
    from transformers import GenerationConfig

    device = model.device
    input_ids, attention_mask = common.left_pad(prompt_ids, tokenizer.pad_token_id, width)  # (b, P)
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device)
    # disable_compile: on GPUs transformers would compile decoding for a StaticCache, once per cache size
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        disable_compile=True,
    )
    generators = [torch.Generator(device).manual_seed(s) for s in seeds]
    steps = [] if logprobs else None  # (b,) log pi per step
    pick = draw_with_own_generators(generators, temperature, top_p, steps)
    out = model.generate(
        input_ids,
        attention_mask=attention_mask,
        generation_config=config,
        past_key_values=prefill(model, input_ids, attention_mask, max_new_tokens),  # or None
        synced_gpus=False,  # FSDP2: the callers gather the weights once (gathered_weights)
        logits_processor=[pick],
    )
    responses = out[:, input_ids.shape[1] :]  # (b, R)
    return common.response_batch(input_ids, attention_mask, responses, tokenizer, steps)


def fsdp_modules(model):
    """The FSDP2-sharded modules of a model (each decoder layer and the root), or [] when it is not sharded."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered_weights(model, enabled=True):
    """Under FSDP2, all-gather every weight once on entry and reshard on exit, and no collective in between:
    generate() would otherwise all-gather every layer at every decode step, and ranks whose responses end at
    different lengths would have to step together (synced_gpus). On exit each sharded module gets back the
    reshard-after-forward setting it had: Accelerate keeps the root and the final norm + LM head gathered between
    forward and backward, which saves an all-gather per micro-step. Nothing to do for DDP or one process, nor
    with enabled=False (rto.py's vLLM engine holds its own weights)."""
    modules = fsdp_modules(model) if enabled else []
    before = {m: reshards_after_forward(m, root=m is model) for m in modules}
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for m, value in before.items():
            m.set_reshard_after_forward(value, recurse=False)
        reshard(model)


def reshards_after_forward(module, root):
    """An FSDP2 module's reshard-after-forward setting (FSDP2 has a setter only): whether its parameter groups free
    the gathered weights after forward. The root's default is decided at its first forward, and is no."""
    state = module._get_fsdp_state()
    return not (root and state._auto_reshard_after_forward) and any(
        group._reshard_after_forward for group in state._fsdp_param_groups
    )


def reshard(*models):
    """FSDP2: free the gathered full weights of every sharded module of each model (a no-grad forward leaves the
    final norm and LM head gathered). Nothing to do for DDP or one process."""
    for m in (module for model in models for module in fsdp_modules(model)):
        m.reshard()
