"""bench/gpu.py's code paths on CPU (the GPU numbers need a GPU; what runs there is what runs here), and the
bootstrap's ~100M size and device option."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_runs_its_code_paths_on_cpu(tmp_path):
    out = tmp_path / "gpu.md"
    proc = subprocess.run([sys.executable, "bench/gpu.py", "--quick", "--device", "cpu", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    assert text.startswith("# GPU checks — cpu (")
    rollout = next(line for line in text.splitlines() if line.startswith("| tiny |") and "| 16 |" in line)
    ours, raw, ratio = (float(c.replace(",", "")) for c in rollout.split("|")[5:8])
    assert ours > 0 and raw > 0 and abs(ratio - ours / raw) < 0.02 + ours / raw / raw  # (tokens/s are printed rounded)
    update = [line for line in text.splitlines() if line.startswith("| tiny |") and "8 × 32" in line]
    assert update and "4 / 2" in update[0] and "| True |" in update[0]


def test_bootstrap_sizes_and_device_option(cli):
    from tasks.models.tiny_policy import SIZES, TinyPolicyConfig, build_model, build_tokenizer

    model = build_model(TinyPolicyConfig(**SIZES["100m"]), build_tokenizer())
    assert 90e6 < sum(p.numel() for p in model.parameters()) < 110e6  # "a from-scratch model of ~100M parameters"
    bad = cli("bootstrap", "--device", "gpu", "--out", "/tmp/never", check=False)
    assert bad.returncode != 0 and "--device 'gpu': one of auto, cpu, cuda, cuda:N" in bad.stdout + bad.stderr
    missing = cli("bootstrap", "--device", "cuda:3", "--out", "/tmp/never", check=False)
    assert missing.returncode != 0 and "--device: cuda:3, but torch sees no CUDA device" in missing.stdout + missing.stderr
    size = cli("bootstrap", "--size", "huge", "--out", "/tmp/never", check=False)
    assert size.returncode != 0 and "unknown --size 'huge'; sizes: tiny, 100m" in size.stdout + size.stderr
