"""`benchmarks/gpu_checks.sh --dry-run`: every step of the GPU checks runs on CPU at small sizes,
so the script cannot rot between GPU sessions. Checks the exit status, the file budget of $OUT
and the records each step leaves there."""

import json
import os
import pathlib
import subprocess
import sys

from lserve_jax.sparsity import SparsityConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = ("decode_attention", "decode_e2e", "prefill_attention")  # records with a status
MAX_FILES = 6


def _records(path: pathlib.Path) -> list[dict]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    assert lines, f"{path.name} has no records"
    return [json.loads(line) for line in lines]


def test_gpu_checks_dry_run(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, LSERVE_COMMIT="dryrun0")
    env.pop("LSERVE_COPY_GBPS", None)
    proc = subprocess.run(["bash", "benchmarks/gpu_checks.sh", "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]

    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= MAX_FILES, files
    assert not [f for f in files if f.endswith(".png")], files
    device = (out / "device.txt").read_text()
    assert "copy_bandwidth_gbps:" in device and "commit: dryrun0" in device, device
    log = (out / "gpu_checks.log").read_text()
    assert "gpu_tests: ok" in log and "skipped" in log, log[-2000:]

    expected = list(BENCHMARKS)
    if (ROOT / "benchmarks" / "hlo_counts.py").is_file():
        expected.append("hlo_counts")
    for name in expected:
        records = _records(out / f"{name}.jsonl")
        for rec in records:
            assert rec["device"] and rec["jax"] and rec["commit"] == "dryrun0", (name, rec)
        if name in BENCHMARKS:
            ok = [r for r in records if r["status"] == "ok"]
            assert ok, (name, records)
    decode = _records(out / "decode_attention.jsonl")
    lserve = [r for r in decode if r["mode"] == "lserve"]
    shipped = SparsityConfig()
    assert lserve and all("speedup_vs_dense" in r and r["rotation"] >= 1
                          and r["keep_first_pages"] == shipped.keep_first_pages
                          and r["token_budget"] == shipped.token_budget
                          and r["fraction_of_copy_bw"] > 0 for r in lserve), lserve
    assert {r["kv_cache_dtype"] for r in decode} == {"auto", "int8"}
    assert all("speedup_vs_auto_kv" in r for r in decode if r["kv_cache_dtype"] == "int8")
    e2e = _records(out / "decode_e2e.jsonl")
    assert [(r["mode"], r["kv_cache_dtype"], r["weight_dtype"]) for r in e2e] == [
        ("lserve", "auto", "auto"), ("lserve", "int8", "int8"), ("dense", "auto", "auto"),
        ("dense", "int8", "int8")]
    assert all("lserve_speedup_vs_dense" in r for r in e2e[2:]) and e2e[0]["ours_over_floor"] > 0
    assert "speedup_vs_auto" in e2e[1] and e2e[1]["floor_ms"] < e2e[0]["floor_ms"]
