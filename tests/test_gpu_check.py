"""benchmarks/gpu_check.sh (the GPU machine's check) kept working between GPU sessions: its --dry-run runs
every stage on CPU with tiny sizes, and each stage must leave its result lines in the return folder. Also
the arithmetic of benchmarks/bench_mfu.py (parameters outside the embeddings, attended query-key pairs)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("env", "build", "bench_loss", "mfu", "tests", "smoke", "bench_train")  # the order they run in
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_scripts_parse_and_say_how_to_use_them():
    for script in ("gpu_check.sh", "carry_wheels.sh"):
        res = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / script)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--dry-run" in res.stdout and "GPU_CHECK_STAGES" in res.stdout


def test_gpu_stage_caps_fit_the_device_call():
    # the GPU caps (first argument of cap, or the plain number for env / build) add up to at most 380 s, the
    # usable part of a 480 s device call; the stages run most important first
    text = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    calls = re.findall(r'run_stage (\w+) "\$\(cap (\d+) \d+\)"', text)
    assert [name for name, _ in calls] == list(STAGES)
    assert sum(int(c) for _, c in calls) <= 380
    assert "timeout_s 480" in text


def _dry_run(tmp_path, **extra):
    out = tmp_path / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "RMFAST_BACKEND", "PYTHONPATH", "GPU_CHECK_STAGES")}
    env.update(OUT=str(out), PYTHON=sys.executable, GPU_CHECK_BUDGET="900", CUDA_VISIBLE_DEVICES="", **extra)
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                         text=True, env=env, timeout=1200, cwd=ROOT)
    return out, res, res.stdout[-4000:] + res.stderr[-3000:]


def _summary_lines(summary):
    return {x.split("|")[1].strip(): x.split("|")[2].strip() for x in summary.splitlines() if x.startswith("| ")
            and x.split("|")[1].strip() in STAGES}


@pytest.mark.slow
def test_dry_run_of_chosen_stages_runs_only_them(tmp_path):
    # a rerun on the warm machine: env and build are done (always, in a dry run), so only bench_loss runs
    out, res, log = _dry_run(tmp_path, GPU_CHECK_STAGES="bench_loss")
    status = _summary_lines((out / "summary.md").read_text())
    assert status == {"env": "ok (done before: carried wheels in /tmp/site)",
                      "build": "ok (done before: extension with CUDA)", "bench_loss": "ok"}, log
    assert res.returncode == 0, log
    assert "# bench_loss (dryrun)" in (out / "bench.md").read_text()
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                         text=True, env={**os.environ, "GPU_CHECK_STAGES": "mfu,nonsense"}, cwd=ROOT)
    assert res.returncode == 2 and "unknown stage nonsense" in res.stderr


def test_non_embedding_params_count_the_model():
    import torch
    from transformers import LlamaConfig, LlamaModel

    from bench_mfu import non_embedding_params

    cfg = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"):
        model = LlamaModel(cfg)
    body = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    assert non_embedding_params(cfg) == body + cfg.hidden_size  # + the value head
    big = LlamaConfig(vocab_size=8000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8)
    assert 0.95e9 < non_embedding_params(big) < 1.0e9  # the default model: Llama 3.2 1B's shape


def test_attended_pairs_follow_the_prefix_shared_masks():
    from bench_mfu import attended_pairs

    # chosen 5 tokens (prefix 2 + 3), rejected 4 (prefix 2 + 2): chosen causal over 5, rejected suffix sees
    # the prefix and itself causally
    def brute(c, r, s):
        n = 0
        for q in range(c):  # chosen rows
            n += q + 1
        for q in range(r - s):  # rejected suffix rows: the prefix, then causal within the suffix
            n += s + q + 1
        return n

    c, r, s = np.array([5, 7, 1]), np.array([4, 3, 2]), np.array([2, 0, 0])
    assert attended_pairs(c, r, s).tolist() == [brute(*x) for x in zip(c, r, s)]


@pytest.mark.slow
def test_dry_run_leaves_every_stage_result(tmp_path):
    out, res, log = _dry_run(tmp_path)
    summary = (out / "summary.md").read_text()

    # what the device tool brings back: at most 8 plain files, with plain names
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files
    status = _summary_lines(summary)
    assert list(status) == list(STAGES), f"{summary}\n{log}"
    assert all(s == "ok" for s in status.values()), f"{summary}\n{log}"
    assert res.returncode == 0, log

    env_txt = (out / "env.txt").read_text()
    assert re.search(r"^torch +\d", env_txt, re.M) and re.search(r"^deepspeed +\d", env_txt, re.M), env_txt
    assert "extension" in (out / "build.log").read_text()
    tests = (out / "tests.log").read_text()
    assert re.search(r"\d+ passed", tests) and "PASSED" in tests and "slowest" in tests  # -rA --durations=10
    assert re.search(r"^build needs setuptools >= 77: \S+ ok", env_txt, re.M), env_txt
    train = (out / "train.log").read_text()
    for run in ("padded:auto", "packed:varlen", "prefix_shared:varlen"):
        assert re.search(rf"^{run}: loss .* eval loss .* eval acc", train, re.M), train[-3000:]
    assert train.count("final eval: accuracy") == 3
    bench = (out / "bench.md").read_text()
    for title in ("# bench_loss (dryrun)", "# bench_mfu (dryrun)", "# bench_train (dryrun)"):
        assert title in bench, bench[:3000]
    assert bench.index("# bench_loss") < bench.index("# bench_mfu") < bench.index("# bench_train")
    for contender in ("dschat", "trl", "rmfast-padded", "rmfast-packed", "rmfast-prefix", "rmfast-trainer"):
        assert re.search(rf"^\| {contender} \| \d", bench, re.M), contender
    for mode in ("fwd", "fwd+bwd"):
        assert f"| {mode} | rmfast-cpu |" in bench and f"| {mode} | eager |" in bench
    assert "MFU" in bench and "copy bandwidth" in bench
    assert re.search(r"\| bench_loss \| ok \| \d+ \| fwd\+bwd .*× floor", summary), summary
    csv = (out / "bench.csv").read_text()
    assert "non_embedding_params_m" in csv and "pairs_per_s" in csv and "x_floor" in csv
