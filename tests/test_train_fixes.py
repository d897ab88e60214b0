"""Issue 15 fixes 1-6: processor settings, per-sample weighting, no phantom Adam step, distinct action rows
trained in RFT, zero-spread policy + clamps, valid JSON / interval-mean logs / absolute base paths."""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from training import checkpoint as ckpt
from training.config import TrainConfig
from training.loss import Denominators, local_denominators, sft_loss
from training.model import ModelConfig, load_model
from training.tiny import build_tiny_qwen25vl
from training.vision import ClipProcessor, ProcessorSettingsError

K = 16


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny base model *without* action tokens (as a stock checkpoint)."""
    return build_tiny_qwen25vl(tmp_path_factory.mktemp("base") / "tiny")


# --------------------------------------------------------------------------- 1. processor settings


def test_checkpoint_processor_settings_win_and_conflicts_are_errors(base, tmp_path):
    saved = json.loads((base / "clip_processor.json").read_text())
    assert ClipProcessor.from_pretrained(base).max_pixels == saved["max_pixels"]
    # an explicit setting equal to the checkpoint's is fine; None keeps the checkpoint's
    same = ClipProcessor.from_pretrained(base, min_pixels=saved["min_pixels"], max_pixels=None)
    assert (same.min_pixels, same.max_pixels) == (saved["min_pixels"], saved["max_pixels"])
    with pytest.raises(ProcessorSettingsError, match="max_pixels: checkpoint 3136 vs requested 6272"):
        ClipProcessor.from_pretrained(base, max_pixels=6272)
    with pytest.raises(ProcessorSettingsError):
        load_model(ModelConfig(path=str(base), max_pixels=4 * 3136), K)
    # a stock Qwen directory (preprocessor_config.json only) is a starting point: the run's budget applies
    stock = tmp_path / "stock"
    shutil.copytree(base, stock)
    (stock / "clip_processor.json").unlink()
    pre = json.loads((stock / "preprocessor_config.json").read_text())
    (stock / "preprocessor_config.json").write_text(json.dumps(dict(pre, min_pixels=3136, max_pixels=10**7)))
    assert ClipProcessor.from_pretrained(stock, max_pixels=6272).max_pixels == 6272
    assert ClipProcessor.from_pretrained(stock).max_pixels == 10**7


# --------------------------------------------------------------------------- 2. per-sample weighting


def test_per_sample_weighting_is_the_default():
    torch.manual_seed(0)
    first, V = 10, 30
    labels = torch.full((3, 8), -100)
    labels[0, 1:8] = torch.tensor([1, 2, 3, 4, 10, 11, 5])  # long slow sample, 2 action tokens
    labels[1, 5:8] = torch.tensor([12, 3, 4])  # short fast sample, 1 action token
    labels[2, 4:8] = torch.tensor([13, 14, 15, 6])  # 3 action tokens
    slow = torch.tensor([True, False, False])
    logits = torch.randn(3, 8, V)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1),
                                           reduction="none", ignore_index=-100).view(3, 7)
    lab = labels[:, 1:]
    m, a = (lab != -100).float(), ((lab >= first) & (lab < first + 8)).float()
    w = torch.tensor([40.0, 1.0, 1.0])
    per_lm = (ce * m).sum(1) / m.sum(1)  # each sample's mean token loss
    per_act = (ce * a).sum(1) / a.sum(1)
    expect = (w * per_lm).mean() + 0.5 * (w * per_act).mean()
    den = local_denominators([{"labels": labels, "is_slow": slow}], 40.0, first, 8)  # default: sample
    assert den.tolist() == [3, 3]
    kw = dict(slow_weight=40.0, action_weight=0.5, first_action_id=first, num_action_tokens=8)
    got, _ = sft_loss(logits, labels, slow, Denominators(*den.tolist()), **kw)
    torch.testing.assert_close(got, expect)
    # micro-batches over the global denominators still sum to the full-batch loss
    parts = [sft_loss(logits[s], labels[s], slow[s], Denominators(*den.tolist()), **kw)[0]
             for s in (slice(0, 1), slice(1, 3))]
    torch.testing.assert_close(parts[0] + parts[1], got)
    # the token variant differs here (the long sample's tokens weigh more)
    den_t = local_denominators([{"labels": labels, "is_slow": slow}], 40.0, first, 8, "token")
    tok, _ = sft_loss(logits, labels, slow, Denominators(*den_t.tolist()), **kw, weighting="token")
    assert not torch.isclose(tok, got)
    with pytest.raises(ValueError, match="weighting"):
        local_denominators([{"labels": labels, "is_slow": slow}], 40.0, first, 8, "bogus")


# --------------------------------------------------------------------------- 3. no phantom Adam step


def test_saving_before_the_first_step_does_not_change_training(base, tmp_path):
    model, proc, ids = load_model(ModelConfig(path=str(base)), K)
    twin = copy.deepcopy(model)
    params = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    opt_a = torch.optim.AdamW(params(model), lr=1e-2, betas=(0.9, 0.95))
    opt_b = torch.optim.AdamW(params(twin), lr=1e-2, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt_a, lambda s: 1.0)
    path = ckpt.save_checkpoint(tmp_path, 0, model, opt_a, sched, proc, {"step": 0, "epoch": 0, "batch": 0},
                                TrainConfig())
    assert not opt_a.state, "saving must not initialise the optimizer state"
    assert ckpt.load_train_state(path)["optimizer"] is None
    # resuming from it restores "no state" (and must not fail)
    ckpt.restore_optimizer(model, opt_a, sched, ckpt.load_train_state(path))
    x = torch.tensor([[1, 2, 3, ids.first, ids.first + 1]])
    for m, opt in ((model, opt_a), (twin, opt_b)):
        torch.manual_seed(0)
        m(input_ids=x).logits.float().pow(2).mean().backward()
        opt.step()
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


# --------------------------------------------------------------------------- 4. action-token rows


def _min_pairwise(rows: torch.Tensor) -> float:
    d = torch.cdist(rows.float(), rows.float())
    return float(d[~torch.eye(len(rows), dtype=torch.bool)].min())


def test_action_rows_are_distinct_at_the_scale_of_other_rows(base):
    model, _, ids = load_model(ModelConfig(path=str(base)), K)
    for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        act = w[ids.first : ids.first + ids.count].detach()
        other = w[1 : ids.first].detach()  # row 0 (<|endoftext|>) may be special
        typical = float(torch.cdist(other[:64].float(), other[:64].float()).median())
        assert _min_pairwise(act) > 0.5 * typical, (_min_pairwise(act), typical)
        ratio = float(act.norm(dim=1).mean() / other.norm(dim=1).mean())
        assert 0.5 < ratio < 2.0, ratio


def test_rft_lora_trains_the_action_rows_and_tells_tokens_apart(base):
    from training.grpo import RFTConfig, load_policy

    cfg = RFTConfig(model=ModelConfig(path=str(base), lora=True, lora_rank=4, num_action_tokens=K),
                    precision="fp32")
    model, proc = load_policy(cfg, K, torch.device("cpu"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("embed_tokens" in n and "trainable_tokens_delta" in n for n in trainable), trainable
    assert any("lm_head" in n and "trainable_tokens_delta" in n for n in trainable), trainable
    first = proc.tokenizer.convert_tokens_to_ids("<action_0>")
    x = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        logp = model(input_ids=x).logits[0, -1].float().log_softmax(-1)[first : first + 10]
    assert float(logp.std()) > 1e-3, logp  # ten action tokens are not ten copies of one
    # the reference (adapter disabled) is the loaded model exactly, and a step moves the action rows
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=torch.tensor([[1, 2, first + 3]])).logits[0, -1, first + 5].backward()
    opt.step()
    with torch.no_grad():
        new = model(input_ids=x).logits[0, -1].float().log_softmax(-1)[first : first + 10]
        with model.disable_adapter():
            ref = model(input_ids=x).logits[0, -1].float().log_softmax(-1)[first : first + 10]
    assert not torch.allclose(new, logp) and torch.allclose(ref, logp, atol=1e-6)


# --------------------------------------------------------------------------- 5. clamps


def test_log_ratio_and_k3_are_clamped_as_easyr1():
    from training.grpo_loss import LossConfig, grpo_loss

    logp = torch.tensor([[0.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-100.0, -1.0]])  # log-ratio 100: exp overflows without the clamp
    ref = torch.tensor([[60.0, -1.0]])  # k3 term exp(60) without the clamp
    mask = torch.ones(1, 2)
    loss, st = grpo_loss(logp, old, torch.tensor([-1.0]), mask, LossConfig(kl_beta=0.1), ref_logp=ref)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    assert float(st["kl_sum"]) == pytest.approx(10.0)  # k3 clamped to 10 on the first token, 0 on the second


# --------------------------------------------------------------------------- 6. logs and paths


@pytest.fixture(scope="module")
def sft_env(tmp_path_factory):
    from tokenizer.codebook import Codebook, CodebookMeta, save_codebook
    from training.tiny import make_built_row, write_built_parquet

    root = tmp_path_factory.mktemp("sftfix")
    model_dir = build_tiny_qwen25vl(root / "tiny", num_action_tokens=K)
    rows = [make_built_row(i, K, slow=i % 4 == 0) for i in range(8)]
    train_file = write_built_parquet(rows, root / "build" / "train-00000.parquet")
    save_codebook(Codebook.from_tokens(np.stack([np.arange(K) * 0.3, np.zeros(K), np.zeros(K)], 1),
                                       CodebookMeta(k=K, tol=0.05, vehicle_length=4.8, vehicle_width=2.0,
                                                    dt=0.5, seed=0)), root / "data" / "codebook")
    return {"root": root, "model": model_dir, "train": train_file, "data": root / "data"}


def _cfg(env, out, **kw) -> TrainConfig:
    from training.config import DataConfig, LossConfig, OptimConfig

    base = TrainConfig(
        model=ModelConfig(path=str(env["model"])),
        data=DataConfig(data_dir=str(env["data"]), train_files=str(env["train"]), val_files=str(env["train"]),
                        batch_size=2, num_workers=0, length_group_size=2),
        loss=LossConfig(slow_weight=40.0, action_weight=1.0),
        optim=OptimConfig(lr=3e-3, warmup_steps=2, grad_accum=1),
        out_dir=str(out), max_steps=1, precision="fp32", parallel="none", save_every=1000, log_every=1,
    )
    return replace(base, **kw)


def test_sft_log_shows_the_interval_mean_loss(sft_env, tmp_path):
    from training.sft import train

    every = [h["loss"] for h in train(_cfg(sft_env, tmp_path / "a", max_steps=4, log_every=1))["history"]]
    paired = train(_cfg(sft_env, tmp_path / "b", max_steps=4, log_every=2))["history"]
    assert [h["step"] for h in paired] == [2, 4]
    np.testing.assert_allclose([h["loss"] for h in paired], [np.mean(every[:2]), np.mean(every[2:])], rtol=1e-5)
    assert paired[-1]["loss_last"] == pytest.approx(every[-1], rel=1e-5)
    lines = (tmp_path / "b" / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in lines] == pytest.approx([h["loss"] for h in paired])


def test_lora_checkpoint_names_its_base_by_absolute_path(sft_env, tmp_path, monkeypatch):
    from training.sft import train

    monkeypatch.chdir(sft_env["root"])  # model path relative to the working directory
    cfg = _cfg(sft_env, tmp_path / "lora", max_steps=1)
    cfg = replace(cfg, model=replace(cfg.model, path="tiny", lora=True, lora_rank=4))
    train(cfg)
    last = ckpt.latest_checkpoint(tmp_path / "lora")
    base_txt = (last / "base_model.txt").read_text()
    adapter = json.loads((last / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base_txt == adapter == str((sft_env["root"] / "tiny").resolve())


# --------------------------------------------------------------------------- multimodal RoPE positions


def test_text_after_a_multi_patch_video_resumes_past_its_largest_position(tmp_path):
    """Qwen2.5-VL's rule (and vLLM's): text after a vision block starts at that block's largest position + 1.

    transformers 5.x advances by max(h, w) // merge, ignoring the temporal extent, so with 4-frame clips
    (2 temporal patches, temporal step tokens_per_second x seconds per grid = 2) text positions fell 1 below
    vLLM's; with 2-frame clips (one patch) both rules agree and transformers' own result is kept.
    """
    from annotators.training_prompt import model_inputs_from_row
    from tests.test_grpo import K, _row
    from tests.test_rollout_vllm import _row_4_frames

    path = build_tiny_qwen25vl(tmp_path / "m", num_action_tokens=K)
    model, proc, _ = load_model(ModelConfig(path=str(path), num_action_tokens=K), K)
    core = model.model
    for row, frames in ((_row_4_frames(0), 4), (_row(0), 2)):
        ex = model_inputs_from_row(row, proc, with_target=False, num_action_tokens=K)
        ids = torch.as_tensor(ex["input_ids"])[None]
        types = torch.as_tensor(ex["mm_token_type_ids"])[None]
        kw = dict(video_grid_thw=torch.as_tensor(ex["video_grid_thw"]),
                  second_per_grid_ts=torch.as_tensor(ex["second_per_grid_ts"]), attention_mask=torch.ones_like(ids))
        pos, delta = core.get_rope_index(ids, types, **kw)
        pos, t = pos[:, 0], types[0]
        ends = [i for i in range(1, len(t)) if t[i - 1] == 2 and t[i] == 0]  # first text token after each video
        starts = [i for i in range(len(t)) if t[i] == 2 and (i == 0 or t[i - 1] != 2)]
        assert len(ends) == len(starts) == 4  # one clip per camera
        for s, e in zip(starts, ends, strict=True):
            block_max = int(pos[:, s:e].max())
            assert pos[:, e].tolist() == [block_max + 1] * 3
            if frames == 4:  # two temporal patches, 2 positions apart
                assert sorted(set(pos[0, s:e].tolist())) == [int(pos[0, s]), int(pos[0, s]) + 2]
        assert int(delta) == int(pos.max()) + 1 - ids.shape[1]
        if frames == 2:
            ref, ref_delta = type(core).get_rope_index(core, ids, types, **kw)  # transformers' own
            assert torch.equal(ref[:, 0], pos) and int(ref_delta) == int(delta)
