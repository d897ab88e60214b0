"""GRPO: the loss (clipping, advantages) and CPU steps on the tiny Qwen2.5-VL with LoRA."""

from __future__ import annotations

import io
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from training.grpo_loss import LossConfig, group_advantages, grpo_loss

K = 16  # action tokens in the tiny model


# --------------------------------------------------------------------------- loss


def test_group_advantages_std_dr_grpo_zero_spread_and_failed():
    r = np.array([1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.5, 2.0, np.nan, 0.0, 1.0])
    a = group_advantages(r, 4)
    assert a.num_groups == 3 and a.zero_spread_groups == 1  # the constant group carries no signal
    # ... but stays in the loss (normaliser, KL): only the failed reward is left out
    assert a.valid.tolist() == [True] * 8 + [True, False, True, True]
    assert a.signal.tolist() == [True] * 4 + [False] * 4 + [True, False, True, True]
    assert (a.advantages[4:8] == 0).all()
    np.testing.assert_allclose(a.advantages[:4], [0.866, -0.866, 0.866, -0.866], atol=1e-3)  # unbiased std
    assert a.advantages[9] == 0.0  # a failed reward is excluded, not scored
    np.testing.assert_allclose(a.advantages[[8, 10, 11]].sum(), 0.0, atol=1e-9)
    dr = group_advantages(r, 4, scale_by_std=False)
    np.testing.assert_allclose(dr.advantages[:4], [0.5, -0.5, 0.5, -0.5])
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(r[:10], 4)


def test_clipping_engages_when_ratio_exceeds_bounds():
    cfg = LossConfig(clip_low=0.2, clip_high=0.2)
    old = torch.zeros(2, 3)
    # ratios exp(.) = [1.5, 1.1, 0.6] in both rows; row 0 advantage +1, row 1 advantage -1
    logp = torch.log(torch.tensor([[1.5, 1.1, 0.6], [1.5, 1.1, 0.6]])).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 3)
    loss, st = grpo_loss(logp, old, adv, mask, cfg)
    loss.backward()
    g = logp.grad
    # A > 0: ratio 1.5 > 1.2 is clipped (no gradient); 1.1 and 0.6 are not
    assert g[0, 0] == 0 and g[0, 1] != 0 and g[0, 2] != 0
    # A < 0: ratio 0.6 < 0.8 is clipped; 1.5 and 1.1 are not
    assert g[1, 2] == 0 and g[1, 0] != 0 and g[1, 1] != 0
    assert st["clip_high_sum"].item() == 1 and st["clip_low_sum"].item() == 1 and st["tokens"].item() == 6
    # loss value: -(mean over tokens of min(r A, clip(r) A))
    want = -(1.2 + 1.1 + 0.6 - 1.5 - 1.1 - 0.8) / 6
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_loss_token_normalisation_mask_and_kl():
    cfg = LossConfig(kl_beta=0.5)
    logp = torch.zeros(2, 4, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    ref = torch.full((2, 4), -1.0)
    loss, st = grpo_loss(logp, logp.detach(), torch.tensor([1.0, 1.0]), mask, cfg, ref_logp=ref, num_tokens=12.0)
    k3 = np.exp(-1.0) + 1.0 - 1.0  # exp(ref - logp) - (ref - logp) - 1
    assert loss.item() == pytest.approx((-6 + 0.5 * k3 * 6) / 12, rel=1e-5)
    assert st["kl_sum"].item() == pytest.approx(6 * k3, rel=1e-5)
    with pytest.raises(ValueError, match="reference"):
        grpo_loss(logp, logp.detach(), torch.ones(2), mask, cfg)


# --------------------------------------------------------------------------- rollout helpers


def test_seeded_sampler_is_per_row_deterministic():
    from training.rollout import SeededSampler, sample_seed

    logits = torch.randn(3, 50)
    a = SeededSampler([1, 2, 3], 1.0, 0.9)(None, logits)
    b = SeededSampler([9, 2, 7], 1.0, 0.9)(None, logits)  # row 1 shares its seed
    assert torch.equal(a[1], b[1])
    assert (torch.isfinite(a).sum(-1) == 1).all()
    assert sample_seed(0, 1, 2, 3) == sample_seed(0, 1, 2, 3) != sample_seed(0, 1, 2, 4)


def test_to_completion_parses_and_decodes():
    from training.rollout import ActionDecoder, Generation, to_completion

    tokens = np.zeros((K, 3))
    tokens[3] = (5.0, 0.0, 0.0)
    dec = ActionDecoder.from_tokens(tokens)
    ok = Generation(np.arange(12), "<answer>" + "<action_3>" * 10 + "</answer><|im_end|>", False)
    c = to_completion(ok, dec)
    assert c.format_error is None and c.think_mode == "fast"
    np.testing.assert_allclose(c.trajectory[:, 0], 5.0 * np.arange(1, 11))
    slow = Generation(np.arange(30), "<think>\nScene: a road\n</think>\n<answer>" + "<action_3>" * 9 + "</answer>", False)
    c = to_completion(slow, dec)
    assert c.is_slow and c.reasoning == "Scene: a road" and c.trajectory is None and "expected 10" in c.format_error


# --------------------------------------------------------------------------- tiny model steps


def _jpeg(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _row(i: int) -> dict:
    from annotators.training_prompt import CAMERAS_FOR_MODEL

    cams = [
        {
            "name": name,
            "width": 56,
            "height": 56,
            "intrinsics": [1.0] * 9,
            "extrinsics": [1.0] * 16,
            "frames": [{"image": {"bytes": _jpeg(i * 10 + j + k), "path": None}, "timestamp_us": k * 500_000}
                       for k in range(2)],
        }
        for j, name in enumerate(CAMERAS_FOR_MODEL)
    ]
    fut = [[5.0 * (t + 1), 0.0, 0.0] for t in range(10)]
    return {"sample_id": f"nuscenes/s{i}/0", "dataset": "nuscenes", "cameras": cams, "velocity": [10.0, 0.0],
            "acceleration": [0.0, 0.0], "command": "straight", "history_meta_lateral": "move forward",
            "history_meta_longitudinal": "constant speed", "future": fut, "objects": [],
            "preference_trajectories": None, "preference_scores": None}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from training.tiny import build_tiny_qwen25vl

    return build_tiny_qwen25vl(tmp_path_factory.mktemp("tiny_rft"), num_action_tokens=K)


def _trainer(path, score, **over):
    from annotators.training_prompt import model_inputs_from_row
    from training.grpo import RFTConfig, RFTOptimConfig, Trainer, build_optimizer, load_policy
    from training.model import ModelConfig
    from training.rollout import ActionDecoder, RolloutConfig

    cfg = RFTConfig(
        model=ModelConfig(path=str(path), lora=True, lora_rank=8, lora_alpha=16, num_action_tokens=K),
        rollout=RolloutConfig(num_generations=over.pop("G", 8), max_new_tokens=over.pop("max_new", 6),
                              temperature=1.0, top_p=over.pop("top_p", 1.0)),
        loss=over.pop("loss", LossConfig(mask_truncated=False)),  # tiny rollouts are all truncated
        optim=RFTOptimConfig(lr=over.pop("lr", 1e-3)),
        micro_batch_size=8,
        precision="fp32",
    )
    torch.manual_seed(0)
    model, proc = load_policy(cfg, K, torch.device("cpu"))
    opt, sched = build_optimizer(model, cfg.optim)
    tokens = np.zeros((K, 3))
    tokens[:, 0] = np.linspace(0.0, 7.5, K)
    tr = Trainer(cfg, model, proc.tokenizer, ActionDecoder.from_tokens(tokens), score, opt, sched)
    rows = [_row(i) for i in range(over.pop("scenes", 1))]
    assert not over, over
    examples = [model_inputs_from_row(r, proc, with_target=False, num_action_tokens=K) for r in rows]
    return tr, rows, examples


def _favour_first_token(tr, token: int):
    """Install a reward favouring one token: 1 when the completion starts with it, else 0."""
    captured = {}
    generate = tr.backend.generate

    def capture(*args, **kwargs):
        captured["gens"] = generate(*args, **kwargs)
        return captured["gens"]

    def score(rows, comps):
        total = np.array([float(g.token_ids[0] == token) for row in captured["gens"] for g in row])
        return SimpleNamespace(total=total, components={"favour": total}, failed=np.zeros(len(comps), bool),
                               failures={})

    tr.backend.generate = capture
    tr.score = score


def _argmax_first_token(tr, example) -> int:
    from training.data import collate, model_batch

    b = model_batch(collate([example], tr.pad_id, padding_side="left"), "cpu")
    with torch.no_grad():
        return int(tr.model(**b, use_cache=False).logits[0, -1].argmax())


def _first_token_logprob(tr, example, token: int) -> float:
    from training.data import collate, model_batch

    b = model_batch(collate([example], tr.pad_id, padding_side="left"), "cpu")
    tr.model.eval()
    with torch.no_grad():
        logits = tr.model(**b, use_cache=False).logits[0, -1]
    return float(torch.log_softmax(logits.float(), -1)[token])


def test_grpo_step_updates_only_lora_weights(tiny):
    from training.rewards import RewardRunner, RewardsConfig

    runner = RewardRunner(RewardsConfig(weights={"ade": 1.0}, executor="inline"))
    tr, rows, ex = _trainer(tiny, runner.score, top_p=0.02)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    # the random model rarely writes a valid answer: every completion gets the same
    # (format-penalised) reward, the group has no spread (advantage 0, no KL): nothing may change
    m = tr.step(0, rows, ex, [0])
    assert m["zero_spread_groups"] == 1 and m["sequences_with_signal"] == 0 and m["sequences_trained"] == 8
    assert all(torch.equal(before[n], p) for n, p in tr.model.named_parameters())
    # with a reward that separates the completions, exactly the LoRA weights move
    _favour_first_token(tr, _argmax_first_token(tr, ex[0]))
    t0 = time.perf_counter()
    m = tr.step(1, rows, ex, [0])
    print(f"CPU GRPO step (tiny, 1 scene x 8 completions x <= 6 tokens): {time.perf_counter() - t0:.2f} s")
    assert m["tokens_trained"] > 0
    changed = {n for n, p in tr.model.named_parameters() if not torch.equal(before[n], p)}
    # the LoRA weights and the action tokens' rows (peft trainable tokens), nothing else
    assert changed and all("lora_" in n or "trainable_tokens_delta" in n for n in changed), sorted(changed)[:5]
    assert any("lora_B" in n for n in changed)
    for key in ("reward/total", "slow_share", "completion_tokens_mean", "clip_high_frac", "grad_norm"):
        assert key in m


def test_reward_favouring_a_token_raises_its_probability(tiny):
    # A near-uniform random model: a narrow nucleus (top-p) makes the favoured token
    # common enough in 16 samples that every group has reward spread.
    tr, rows, ex = _trainer(tiny, None, G=16, max_new=2, lr=1e-2, top_p=0.02)
    target = _argmax_first_token(tr, ex[0])
    _favour_first_token(tr, target)
    p0 = _first_token_logprob(tr, ex[0], target)
    rewards = []
    for step in range(3):
        rewards.append(tr.step(step, rows, ex, [0])["reward/total"])
    p1 = _first_token_logprob(tr, ex[0], target)
    assert p1 > p0 + 0.3, (p0, p1, rewards)


def test_single_iteration_ratio_is_exactly_one(tiny):
    tr, rows, ex = _trainer(tiny, None, G=16, max_new=2, top_p=0.02,
                            loss=LossConfig(clip_high=0.0, clip_low=0.0, mask_truncated=False))
    _favour_first_token(tr, _argmax_first_token(tr, ex[0]))
    m = tr.step(0, rows, ex, [0])
    assert m["tokens_trained"] > 0 and m["grad_norm"] > 0  # zero-width clipping still passes the gradient
    assert m["ratio_mean"] == 1.0 and m["clip_low_frac"] == m["clip_high_frac"] == 0.0
    assert m["reward/favour_count"] == 16 and m["reward/total_count"] == 16


def test_num_iterations_and_kl_use_stored_and_reference_logprobs(tiny):
    loss = LossConfig(num_iterations=2, kl_beta=0.1, clip_high=0.01, clip_low=0.01, mask_truncated=False)
    tr, rows, ex = _trainer(tiny, None, G=16, max_new=2, lr=1e-2, top_p=0.02, loss=loss)
    _favour_first_token(tr, _argmax_first_token(tr, ex[0]))
    m = tr.step(0, rows, ex, [0])
    assert m["tokens_trained"] > 0
    assert m["kl"] > 0.0  # second iteration: the adapter has moved away from the reference
    # the second iteration sees ratios != 1 against the stored old log-probs, and tight bounds clip
    assert m["ratio_mean"] != pytest.approx(1.0, abs=1e-6)
    assert m["clip_low_frac"] + m["clip_high_frac"] > 0


def _write_demo(tmp_path, n: int = 4):
    """A built shard (rows with cameras) and a K-token codebook, as `make demo` leaves them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.geometry import VEHICLE_LENGTH, VEHICLE_WIDTH
    from tokenizer.codebook import Codebook, CodebookMeta, save_codebook

    build = tmp_path / "build"
    build.mkdir()
    rows = [_row(i) for i in range(n)]
    rows[0]["objects"] = [{"category": "vehicle", "x": 10.0, "y": 0.0, "heading": 0.0, "length": 4.5,
                           "width": 1.9, "vx": 0.0, "vy": 0.0, "track_id": "t0"}]
    for r in rows[1:]:
        r["objects"] = [dict(rows[0]["objects"][0], y=30.0)]
    pq.write_table(pa.Table.from_pylist(rows), build / "train-00000.parquet", row_group_size=2)
    tokens = np.zeros((K, 3))
    tokens[:, 0] = np.linspace(0.0, 7.5, K)
    meta = CodebookMeta(k=K, tol=0.05, vehicle_length=VEHICLE_LENGTH, vehicle_width=VEHICLE_WIDTH, dt=0.5, seed=0)
    save_codebook(Codebook.from_tokens(tokens, meta), tmp_path / "codebook")
    return build, tmp_path / "codebook"


def test_config_validation():
    from training.grpo import RFTConfig
    from training.model import ModelConfig
    from training.rollout import RolloutConfig

    with pytest.raises(ValueError, match="kl_beta > 0 needs model.lora"):
        RFTConfig(model=ModelConfig(lora=False), loss=LossConfig(kl_beta=0.1))
    with pytest.raises(ValueError, match="num_generations"):
        RolloutConfig(num_generations=1)
    with pytest.raises(ValueError, match="num_iterations"):
        LossConfig(num_iterations=0)


def _no_nan(token: str):
    raise ValueError(f"invalid JSON constant {token} in metrics.jsonl")


@pytest.mark.parametrize("lora", [True, False])
def test_cli_runs_checkpoints_and_resumes(tiny, tmp_path, capsys, lora):
    import json

    from training.grpo import main

    build, codebook = _write_demo(tmp_path)
    out = tmp_path / "rft"
    common = ["--config", "configs/train/rft_tiny.yaml", "--set", f"model.path={tiny}",
              "--set", f"data.train_files={build}/train-*.parquet", "--set", f"data.codebook_dir={codebook}",
              "--set", f"out_dir={out}", "--set", "save_every=1", "--set", "rollout.max_new_tokens=8",
              "--set", f"eval_files={build}/train-*.parquet", "--set", "eval_samples=2"]
    if not lora:  # full-parameter RFT resumes from the checkpoint's full weights (no KL reference)
        common += ["--set", "model.lora=false", "--set", "loss.kl_beta=0.0"]
    assert main([*common, "--set", "max_steps=2"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000001", "step_0000002"]
    assert main([*common, "--set", "max_steps=3"]) == 0  # resumes at step 2
    lines = [json.loads(x, parse_constant=_no_nan) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    for key in ("reward/total", "reward/driving", "reward/format", "reward/cot_penalty", "zero_spread_groups",
                "sequences_with_signal",
                "slow_share", "completion_tokens_mean", "reward_failed", "reward/total_count"):
        assert key in lines[-1], key
    # held-out reward before the first step and after the last step of each run (strict JSON)
    evals = [json.loads(x, parse_constant=_no_nan) for x in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["eval_step"] for e in evals] == [0, 2, 3]
    assert all(e["eval/samples"] == 2 and "eval/reward_total" in e for e in evals)
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    assert (out / "checkpoints" / "step_0000003" / weights).is_file()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 3
