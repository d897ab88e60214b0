"""SFT on CPU with the tiny Qwen2.5-VL: one step, masking, weights, overfitting, exact resume, bad rows."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from annotators.training_prompt import PromptError
from tokenizer.codebook import Codebook, CodebookMeta, save_codebook
from training import checkpoint as ckpt
from training.config import DataConfig, LossConfig, OptimConfig, TrainConfig
from training.data import BuiltRows, LengthGroupedBatchSampler, ShardIndex, collate
from training.loss import Denominators, local_denominators, sft_loss
from training.model import ModelConfig, load_model
from training.sft import train
from training.tiny import build_tiny_qwen25vl, make_built_row, write_built_parquet

K = 16


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    model_dir = build_tiny_qwen25vl(root / "tiny", num_action_tokens=K)
    rows = [make_built_row(i, K, slow=i % 4 == 0) for i in range(8)]
    train_file = write_built_parquet(rows, root / "build" / "train-00000.parquet")
    save_codebook(Codebook.from_tokens(np.stack([np.arange(K) * 0.3, np.zeros(K), np.zeros(K)], 1),
                                       CodebookMeta(k=K, tol=0.05, vehicle_length=4.8, vehicle_width=2.0,
                                                    dt=0.5, seed=0)), root / "data" / "codebook")
    return {"root": root, "model": model_dir, "rows": rows, "train": train_file, "data": root / "data"}


def make_cfg(env, out, **kw) -> TrainConfig:
    base = TrainConfig(
        model=ModelConfig(path=str(env["model"]), num_action_tokens=None, min_pixels=3136, max_pixels=3136),
        data=DataConfig(data_dir=str(env["data"]), train_files=str(env["train"]), val_files=str(env["train"]),
                        batch_size=2,
                        num_workers=0, length_group_size=2),
        loss=LossConfig(slow_weight=40.0, action_weight=1.0),
        optim=OptimConfig(lr=3e-3, warmup_steps=2, grad_accum=1),
        out_dir=str(out), max_steps=1, precision="fp32", parallel="none", save_every=1000, log_every=1,
    )
    return replace(base, **kw)


def test_one_step_runs_and_checkpoints(env, tmp_path):
    m = train(make_cfg(env, tmp_path / "run", max_steps=1))
    assert np.isfinite(m["loss"]) and m["tokens"] > 0 and m["grad_norm"] > 0
    last = ckpt.latest_checkpoint(tmp_path / "run")
    names = {p.name for p in last.iterdir()}
    assert {"model.safetensors", "config.json", "clip_processor.json", "train_state.pt",
            "train_config.yaml", "tokenizer.json"} <= names
    state = ckpt.load_train_state(last)
    assert (state["step"], state["epoch"], state["batch"]) == (1, 0, 1)
    tok = json.loads((last / "tokenizer.json").read_text())
    assert any(t["content"] == f"<action_{K - 1}>" for t in tok["added_tokens"])


def test_labels_masked_outside_assistant_span_and_on_padding(env):
    _, proc, ids = load_model(ModelConfig(path=str(env["model"]), min_pixels=3136, max_pixels=3136), K)
    rows = BuiltRows(ShardIndex.from_glob(str(env["train"])), proc, num_action_tokens=K)
    exs = [rows[0], rows[1]]  # slow (long target) and fast (short)
    batch = collate(exs, pad_id=proc.tokenizer.pad_token_id)
    for b, ex in enumerate(exs):
        n, p = len(ex["input_ids"]), ex["prompt_length"]
        lab, att = batch["labels"][b], batch["attention_mask"][b]
        assert (lab[:p] == -100).all(), "prompt must be masked"
        assert (lab[p:n] == batch["input_ids"][b, p:n]).all(), "assistant span must be labelled"
        assert (lab[n:] == -100).all() and (att[n:] == 0).all() and (att[:n] == 1).all(), "padding masked"
        span = proc.tokenizer.decode(batch["input_ids"][b, p:n])
        assert span.endswith("</answer><|im_end|>") and span.startswith("<think>" if ex["is_slow"] else "<answer>")
    assert batch["video_grid_thw"].shape == (8, 3)
    n_act = ((batch["labels"] >= ids.first) & (batch["labels"] < ids.first + K)).sum(1)
    assert n_act.tolist() == [10, 10]


def test_token_weighting_variant_and_global_normalisation():
    torch.manual_seed(0)
    first, V = 10, 30
    labels = torch.full((3, 6), -100)
    labels[0, 2:6] = torch.tensor([1, 10, 11, 2])  # 2 action tokens
    labels[1, 3:6] = torch.tensor([12, 3, 4])  # 1 action token
    labels[2, 1:6] = torch.tensor([5, 13, 14, 15, 6])  # 3 action tokens
    slow = torch.tensor([True, False, False])
    logits = torch.randn(3, 6, V, requires_grad=True)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1),
                                           reduction="none", ignore_index=-100).view(3, 5)
    lab = labels[:, 1:]
    m, a = lab != -100, (lab >= first) & (lab < first + 8)
    w = torch.tensor([40.0, 1.0, 1.0])[:, None]
    expect = (w * ce * m).sum() / (w * m).sum() + 0.5 * (w * ce * a).sum() / (w * a).sum()
    kw = dict(slow_weight=40.0, action_weight=0.5, first_action_id=first, num_action_tokens=8, weighting="token")
    den = local_denominators([{"labels": labels, "is_slow": slow}], 40.0, first, 8, "token")
    assert den.tolist() == [4 * 40 + 3 + 5, 2 * 40 + 1 + 3]
    full, _ = sft_loss(logits, labels, slow, Denominators(*den.tolist()), **kw)
    torch.testing.assert_close(full, expect)
    # the weight applies to its own sample only: making sample 0 fast changes the expected value exactly
    w1 = torch.ones(3, 1)
    expect_fast = (w1 * ce * m).sum() / m.sum() + 0.5 * (ce * a).sum() / a.sum()
    den_f = local_denominators([{"labels": labels, "is_slow": ~slow & False}], 40.0, first, 8, "token")
    got_fast, _ = sft_loss(logits, labels, slow & False, Denominators(*den_f.tolist()), **kw)
    torch.testing.assert_close(got_fast, expect_fast)
    # micro-batches normalised by the global denominators sum to the full-batch loss
    parts = [sft_loss(logits[s], labels[s], slow[s], Denominators(*den.tolist()), **kw)[0]
             for s in (slice(0, 1), slice(1, 3))]
    torch.testing.assert_close(parts[0] + parts[1], full)


@pytest.fixture(scope="module")
def overfit(env, tmp_path_factory):
    """The shorter `make train`: SFT on eight rows until greedy decoding reproduces them (shared run)."""
    cfg = make_cfg(env, tmp_path_factory.mktemp("fit") / "run", max_steps=120,
                   data=replace(make_cfg(env, "x").data, batch_size=8),
                   optim=OptimConfig(lr=1e-2, warmup_steps=5, min_lr_ratio=0.3), log_every=10)
    return cfg, train(cfg)


def test_overfit_eight_samples(env, overfit):
    from training.eval import evaluate

    cfg, m = overfit
    losses = [h["loss"] for h in m["history"]]
    assert losses[-1] < 0.1 * losses[0], losses
    model, proc, ids = load_model(replace(cfg.model, path=str(ckpt.latest_checkpoint(cfg.out_dir))), K)
    res = evaluate(model, proc, ids, str(env["train"]), data_dir=str(env["data"]), batch_size=8,
                   max_new_tokens=100)  # trajectories decoded with the codebook written above
    assert res["malformed"] == 0, res["malformed_examples"]
    assert res["action_token_acc"] >= 0.95, res
    assert res["slow_share"] == pytest.approx(2 / 8)
    # decoded trajectories vs the rows' futures: finite errors, growing with the horizon
    assert res["meta_action_acc"] is not None and res["think_meta_action_acc"] == 1.0
    assert 0 <= res["ade_1s"] <= res["ade_5s"] and np.isfinite(res["fde_5s"])


@pytest.mark.slow
def test_rft_from_the_sft_run_trains_on_every_completion_every_step(env, overfit, tmp_path):
    """The shorter `make rft`: GRPO from the SFT run directory (its latest checkpoint), LoRA + action rows."""
    from training.grpo import main

    cfg, _ = overfit
    out = tmp_path / "rft"
    argv = ["--config", "configs/train/rft_tiny.yaml", "--set", f"model.path={cfg.out_dir}",
            "--set", f"data.train_files={env['train']}", "--set", f"data.codebook_dir={env['data']}/codebook",
            "--set", f"eval_files={env['train']}", "--set", "eval_samples=8", "--set", f"out_dir={out}",
            "--set", "max_steps=6", "--set", "save_every=6", "--set", "data.scenes_per_step=4",
            "--set", "rollout.max_new_tokens=100", "--set", "optim.lr=1e-3", "--set", "rewards.executor=inline",
            "--set", "rollout.temperature=2.0"]  # the overfit policy is near-deterministic at 1.0
    assert main(argv) == 0
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # every completion enters the loss at every step (zero-spread groups included, advantage 0) ...
    assert len(steps) == 6 and all(s["sequences_trained"] == 16 for s in steps), steps
    # ... and the near-deterministic overfit policy still finds reward spread to learn from
    assert sum(s["sequences_with_signal"] for s in steps) > 0
    evals = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["eval_step"] for e in evals] == [0, 5, 6]
    assert evals[0]["eval/format_ok_share"] == 1.0 and evals[-1]["eval/format_ok_share"] == 1.0
    assert np.isfinite(evals[-1]["eval/reward_driving"])


@pytest.mark.parametrize("variant", ["full", "lora_dropout_workers"])
def test_resume_gives_the_same_next_losses(env, tmp_path, variant):
    cfg = make_cfg(env, tmp_path / "a", max_steps=4, save_every=2, keep_last=5)
    if variant != "full":  # dropout RNG and a decode worker must not perturb the resumed stream
        cfg = replace(cfg, model=replace(cfg.model, lora=True, lora_rank=4, lora_dropout=0.2),
                      data=replace(cfg.data, num_workers=1))
    full = [h["loss"] for h in train(cfg)["history"]]
    # "crash" after step 2: drop later checkpoints and resume in a fresh model/optimizer
    shutil.rmtree(ckpt.checkpoint_root(cfg.out_dir) / "step_0000004")
    resumed = [h["loss"] for h in train(cfg)["history"]]
    assert len(full) == 4 and len(resumed) == 2
    np.testing.assert_allclose(resumed, full[2:], rtol=1e-5, atol=1e-6)
    assert full[2] != full[1]


def test_sampler_is_deterministic_and_rank_disjoint(env):
    index = ShardIndex.from_glob(str(env["train"]))
    s0 = LengthGroupedBatchSampler(index, 2, rank=0, world_size=2, group_size=2, seed=3)
    s1 = LengthGroupedBatchSampler(index, 2, rank=1, world_size=2, group_size=2, seed=3)
    a, b = list(s0), list(s1)
    assert sorted(i for x in a + b for i in x) == list(range(8))
    s0.set_epoch(0, start_batch=1)
    assert list(s0) == a[1:]
    s0.set_epoch(1)
    assert list(s0) != a


def test_bad_row_in_shard_names_the_sample(env, tmp_path):
    rows = [make_built_row(i, K) for i in range(2)]
    rows[1]["cameras"] = rows[1]["cameras"][:2]  # front_right and back missing
    rows[1]["messages"] = None
    f = write_built_parquet(rows, tmp_path / "bad" / "train-0.parquet")
    _, proc, _ = load_model(ModelConfig(path=str(env["model"]), min_pixels=3136, max_pixels=3136), K)
    ds = BuiltRows(ShardIndex.from_glob(str(f)), proc, num_action_tokens=K)
    ds[0]
    with pytest.raises(PromptError, match="nuscenes/scene-0001/1.*camera 'front_right' is missing"):
        ds[1]


def test_two_ranks_fsdp_equal_one_process_with_accumulation(env, tmp_path):
    """Global normalisation: 2 ranks x 2 micro-batches (FSDP2, gloo) == 1 process x 4 micro-batches."""
    import os
    import subprocess
    import sys

    common = [f"model.path={env['model']}", f"model.num_action_tokens={K}", f"data.train_files={env['train']}",
              "max_steps=2", "save_every=100", "log_every=1", "data.batch_size=1", "data.num_workers=0",
              "data.shuffle=false", "model.min_pixels=3136", "model.max_pixels=3136"]
    envv = dict(os.environ, OMP_NUM_THREADS="1")

    def run(prefix, extra):
        args = [*prefix, "-m", "training.sft", "--config", "configs/train/sft_tiny.yaml"]
        for kv in common + extra:
            args += ["--set", kv]
        subprocess.run(args, check=True, env=envv, capture_output=True, timeout=300)

    run([sys.executable], [f"out_dir={tmp_path / 'one'}", "optim.grad_accum=4", "parallel=none"])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run(torchrun, [f"out_dir={tmp_path / 'two'}", "optim.grad_accum=2", "parallel=fsdp"])
    logs = [[json.loads(x) for x in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in ("one", "two")]
    for a, b in zip(*logs, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
