"""Benchmark metrics (UniAD / ST-P3 conventions, WOD-E2E), the eval CLI (checkpoint and endpoint), predict,
and the export round trip (merged LoRA incl. modules_to_save and RFT action rows: same logits after reload)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from training import benchmarks
from training.tiny import build_tiny_qwen25vl, make_built_row, write_built_parquet

K = 16


pytestmark = pytest.mark.usefixtures("torch_one_thread")


# --------------------------------------------------------------------------- metrics


def _straight(speed: float, lateral: float = 0.0) -> np.ndarray:
    t = 0.5 * np.arange(1, 11)
    return np.stack([speed * t, np.full(10, lateral), np.zeros(10)], 1)


def test_nuscenes_l2_uniad_at_t_and_stp3_average_up_to_t():
    gt = _straight(5.0)
    pred = gt.copy()
    pred[:, 0] += 0.5 * np.arange(1, 11)  # error grows 0.5 m per step
    m = benchmarks.nuscenes_planning([{"pred": pred, "future": gt, "objects": []}])
    assert m["l2_1s_uniad"] == pytest.approx(1.0)  # step 2
    assert m["l2_1s_stp3"] == pytest.approx(0.75)  # mean of steps 1..2
    assert m["l2_3s_uniad"] == pytest.approx(3.0)
    assert m["l2_3s_stp3"] == pytest.approx(np.mean(0.5 * np.arange(1, 7)))
    assert m["collision_3s_uniad"] == 0.0 and m["n_collision"] == 1


def test_nuscenes_collision_conventions_and_gt_collisions_excluded():
    gt = _straight(5.0)
    pred = _straight(5.0, lateral=3.5)  # one lane to the left
    parked = {"category": "vehicle", "x": 7.5 - 0.5, "y": 3.5, "vx": 0.0, "vy": 0.0, "heading": 0.0,
              "length": 4.0, "width": 1.8, "track_id": "a"}  # where the prediction is at step 3 (1.5 s)
    m = benchmarks.nuscenes_planning([{"pred": pred, "future": gt, "objects": [parked]}])
    col = benchmarks.collision_per_step(pred, [parked])
    assert col[2] and not col[5:].any()
    assert m["collision_1s_uniad"] == float(col[1]) and m["collision_2s_uniad"] == float(col[3])
    assert m["collision_2s_stp3"] == pytest.approx(col[:4].mean())
    # the logged future hits the object too: UniAD does not count those steps
    m2 = benchmarks.nuscenes_planning([{"pred": pred, "future": pred, "objects": [parked]}])
    assert m2["collision_2s_uniad"] == 0.0 and m2["collision_avg_stp3"] == 0.0
    # rows without objects have no collision figure
    m3 = benchmarks.nuscenes_planning([{"pred": pred, "future": gt, "objects": None}])
    assert m3["n_collision"] == 0 and m3["collision_1s_uniad"] is None


def test_wod_e2e_ade_and_rfs_scale():
    gt = _straight(10.0)
    rater = np.stack([10.0 * 0.25 * np.arange(1, 21), np.zeros(20)], 1)  # (x, y) at 4 Hz, as WOD-E2E stores them
    row = {"sample_id": "w/0", "velocity": [10.0, 0.0], "preference_trajectories": [rater.tolist()],
           "preference_scores": [10.0]}
    m = benchmarks.wod_e2e([{"pred": gt, "future": gt, "row": row}])
    assert m["ade_3s"] == 0.0 and m["ade_5s"] == 0.0
    assert m["n_rfs"] == 1 and m["rfs"] == pytest.approx(10.0)  # on the rater's trajectory: full score
    far = benchmarks.wod_e2e([{"pred": _straight(10.0, lateral=8.0), "future": gt, "row": row}])
    assert far["rfs"] < 10.0 and far["ade_5s"] == pytest.approx(8.0)


def test_navsim_pdms_without_navsim_is_a_clear_error():
    from training.rewards import MissingDependencyError

    with pytest.raises(MissingDependencyError, match="navsim"):
        benchmarks.navsim_pdms([], "/nonexistent/cache")


# --------------------------------------------------------------------------- CLI, predict, export


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from tokenizer.codebook import Codebook, CodebookMeta, save_codebook

    root = tmp_path_factory.mktemp("evalx")
    model = build_tiny_qwen25vl(root / "tiny", num_action_tokens=K)
    rows = [make_built_row(i, K, slow=i % 2 == 0) for i in range(4)]
    shards = root / "shards"
    write_built_parquet(rows, shards / "validation-00000.parquet")
    tokens = np.stack([np.linspace(0.0, 7.5, K), np.zeros(K), np.zeros(K)], 1)
    save_codebook(Codebook.from_tokens(tokens, CodebookMeta(k=K, tol=0.05, vehicle_length=4.8, vehicle_width=2.0,
                                                            dt=0.5, seed=0)), root / "codebook")
    return {"root": root, "model": model, "shards": shards, "codebook": root / "codebook", "rows": rows}


def _eval_args(env, out, *extra):
    return ["--data", str(env["shards"] / "*.parquet"), "--codebook", str(env["codebook"]), "--out", str(out),
            "--max-new-tokens", "12", "--batch-size", "4", *extra]


def test_eval_cli_writes_predictions_metrics_and_report_outside_the_checkpoint(env, tmp_path, capsys):
    from training.eval import main

    out = tmp_path / "eval"
    assert main(["--checkpoint", str(env["model"]), *_eval_args(env, out)]) == 0
    preds = pq.read_table(out / "predictions.parquet")
    assert preds.num_rows == 4
    assert {"sample_id", "action_tokens", "trajectory", "reasoning", "think_mode", "latency_s"} <= set(
        preds.column_names)
    metrics = json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert metrics["overall"]["samples"] == 4 and 0.0 <= metrics["overall"]["format_rate"] <= 1.0
    assert "# Evaluation" in (out / "report.md").read_text()
    assert not (env["model"] / "eval.json").exists()
    # a directory inside the checkpoint is refused; a conflicting pixel budget too
    assert main(["--checkpoint", str(env["model"]), *_eval_args(env, env["model"] / "eval")]) == 2
    assert main(["--checkpoint", str(env["model"]), *_eval_args(env, tmp_path / "e2", "--max-pixels", "6272")]) == 2


class _FakeOpenAI(BaseHTTPRequestHandler):
    requests: list = []

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):  # /v1/models
        self._send({"data": [{"id": "drivevla"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        text = "<answer>" + "".join(f"<action_{i}>" for i in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)) + "</answer>"
        self._send({"choices": [{"message": {"role": "assistant", "content": text}}]})

    def _send(self, obj):
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_eval_cli_against_an_openai_compatible_endpoint(env, tmp_path):
    from training.eval import main

    server = HTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        assert main(["--endpoint", url, *_eval_args(env, tmp_path / "ep")]) == 0
    finally:
        server.shutdown()
    req = _FakeOpenAI.requests[0]
    assert req["model"] == "drivevla" and req["temperature"] == 0.0 and req["skip_special_tokens"] is False
    videos = [p for p in req["messages"][1]["content"] if p["type"] == "video_url"]
    assert len(videos) == 4 and videos[0]["video_url"]["url"].startswith("data:video/jpeg;base64,")
    # the clips' rate: vLLM would read a video/jpeg frame list at 1 fps (vllm/multimodal/media/video.py)
    assert req["media_io_kwargs"] == {"video": {"fps": 2.0}}
    metrics = json.loads((tmp_path / "ep" / "metrics.json").read_text())
    assert metrics["overall"]["format_rate"] == 1.0 and metrics["nuscenes"]["n"] == 4


def _rft_checkpoint(env, tmp_path):
    """An RFT-style LoRA checkpoint (LoRA + trainable action rows) with non-zero weights."""
    from training import checkpoint as ckpt
    from training.config import TrainConfig
    from training.grpo import apply_rft_lora
    from training.model import ModelConfig, load_model

    model, proc, ids = load_model(ModelConfig(path=str(env["model"])), K)
    peft = apply_rft_lora(model, ModelConfig(lora_rank=4, lora_alpha=8, lora_dropout=0.0), ids)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    path = ckpt.save_checkpoint(tmp_path / "rft", 1, peft, opt, sched, proc, {"step": 1, "epoch": 0, "batch": 1},
                                TrainConfig(), base_model_path=str(env["model"]))
    return peft, proc, ids, path


def test_export_round_trip_same_logits(env, tmp_path):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from training.export import export
    from training.vision import ClipProcessor

    peft, proc, ids, path = _rft_checkpoint(env, tmp_path)
    out = export(path, tmp_path / "export", K)
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.convert_tokens_to_ids(f"<action_{K - 1}>") == ids.first + K - 1
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert (pre["min_pixels"], pre["max_pixels"]) == (proc.min_pixels, proc.max_pixels)
    assert ClipProcessor.from_pretrained(out).settings() == proc.settings()
    x = torch.tensor([[1, 2, 3, ids.first + 2, ids.first + 7, 5]])
    peft.eval()
    with torch.no_grad():
        want = peft(input_ids=x).logits
        got = reloaded(input_ids=x).logits
        with peft.disable_adapter():
            base = peft(input_ids=x).logits
    assert not torch.allclose(want, base, atol=1e-4)  # the adapter and action rows matter ...
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # ... and survive the export
    with pytest.raises(FileExistsError):
        export(path, out, K)


def test_predict_one_row_prints_the_parse_result(env, capsys):
    from training.predict import format_record, main

    sid = env["rows"][1]["sample_id"]
    rc = main(["--checkpoint", str(env["model"]), "--data", str(env["shards"]), "--sample-id", sid,
               "--codebook", str(env["codebook"]), "--max-new-tokens", "8"])
    out = capsys.readouterr().out
    assert out.startswith(sid) and ("malformed output" in out) == (rc == 2)
    assert main(["--checkpoint", str(env["model"]), "--data", str(env["shards"]), "--sample-id", "nope",
                 "--codebook", str(env["codebook"])]) == 2
    rec = {"sample_id": "s", "dataset": "nuscenes", "think_mode": "slow", "latency_s": 0.1, "reasoning": "Go.",
           "format_error": None, "action_tokens": list(range(10)), "text": "",
           "trajectory": _straight(2.0).tolist()}
    text = format_record(rec)
    assert "reasoning:" in text and "5.0" in text and "10.00" in text
