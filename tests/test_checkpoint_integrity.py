"""Checkpoint integrity on tiny random checkpoints: non-finite weights are refused; damaged
converted directories are detected (sizes on every load, checksums on the first load and on
request) and cache entries repaired from their source; the cache is safe to share between
processes (one conversion per entry, stale temporary directories of killed conversions removed).
"""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import convert.writer as writer
from convert import CheckpointError, ConversionError, convert, remove_stale_temp_dirs
from convert import verify_checkpoint
from convert.__main__ import main as convert_main
from lserve_jax.checkpoint import _fingerprint, load_checkpoint, load_model, resolve_checkpoint
from test_convert import HF_NAMES, assert_clean, get, make_hf, rewrite_single, write_gguf

REPO = Path(__file__).resolve().parents[1]
CHILD_TIMEOUT_S = 300  # generous: a child imports jax and orbax, slow on a loaded machine


def assert_params_match(params, sd):
    """Every parameter equals its HF source tensor (untied checkpoint)."""
    for name, (path, transposed) in HF_NAMES.items():
        np.testing.assert_array_equal(get(params, path), sd[name].T if transposed else sd[name],
                                      path)


def largest_params_file(out: Path) -> Path:
    return max((p for p in (out / "params").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)


def damage_middle(f: Path, n: int = 4096) -> None:
    """Overwrite `n` bytes in the middle of `f` (inverted, so they surely differ); same size."""
    data = bytearray(f.read_bytes())
    assert len(data) > 2 * n
    mid = len(data) // 2 - n // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    f.write_bytes(bytes(data))


def temp_dirs(directory: Path) -> list[str]:
    """Hidden leftovers next to converted directories (lock files excepted)."""
    return sorted(p.name for p in directory.iterdir()
                  if p.name.startswith(".") and not p.name.endswith(".lock"))


@pytest.fixture
def count_hashes(monkeypatch):
    """The list of files convert.writer hashes, as they are hashed."""
    hashed = []
    real = writer._sha256

    def counting(path):
        hashed.append(path)
        return real(path)

    monkeypatch.setattr(writer, "_sha256", counting)
    return hashed


# ---- non-finite weights ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["nan", "inf", "float16 overflow"])
def test_nonfinite_hf_tensors_are_refused(tmp_path, kind):
    sd = make_hf(tmp_path / "hf")
    bad = {k: v.copy() for k, v in sd.items()}
    bad["model.layers.1.mlp.up_proj.weight"][3, 5] = {"nan": np.nan, "inf": -np.inf,
                                                      "float16 overflow": 1e5}[kind]
    if kind == "nan":  # every bad tensor is named, not just the first
        bad["model.norm.weight"][0] = np.inf
    rewrite_single(tmp_path / "hf", bad)
    dtype = "float16" if kind == "float16 overflow" else "float32"
    with pytest.raises(ConversionError, match="non-finite") as e:
        convert(tmp_path / "hf", tmp_path / "out", dtype=dtype, progress=False)
    assert "'model.layers.1.mlp.up_proj.weight' (parameter 'layers.1.w_up')" in str(e.value)
    if kind == "nan":
        assert "'model.norm.weight' (parameter 'final_norm')" in str(e.value)
    if kind == "float16 overflow":
        assert "float16" in str(e.value) and "become inf" in str(e.value)
        convert(tmp_path / "hf", tmp_path / "f32", progress=False)  # fine where it fits
    assert_clean(tmp_path / "out")
    # through the cache: no entry and no temporary directory either
    with pytest.raises(ConversionError, match="up_proj"):
        resolve_checkpoint(tmp_path / "hf", cache_dir=tmp_path / "cache", dtype=dtype,
                           progress=False)
    assert [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


def test_nonfinite_gguf_tensor_is_refused(tmp_path):
    sd = make_hf(tmp_path / "hf")
    sd["model.norm.weight"][7] = np.nan  # stored as F32 in the GGUF
    write_gguf(tmp_path / "m.gguf", sd, tie=False)
    with pytest.raises(ConversionError,
                       match=r"'output_norm.weight' \(parameter 'final_norm'\) has 1 NaN"):
        convert(tmp_path / "m.gguf", tmp_path / "out", progress=False)
    assert_clean(tmp_path / "out")


# ---- damage on disk ---------------------------------------------------------------------------

def test_damaged_data_file_is_found_and_cache_entry_reconverted(tmp_path, caplog):
    sd = make_hf(tmp_path / "hf")
    out, _, params, _ = load_model(tmp_path / "hf", cache_dir=tmp_path / "cache", progress=False)
    assert_params_match(params, sd)
    victim = largest_params_file(out)
    rel = victim.relative_to(out).as_posix()
    damage_middle(victim)
    with pytest.raises(CheckpointError, match="contents changed") as e:
        verify_checkpoint(out)
    assert str(out) in str(e.value) and rel in str(e.value) and "--force" in str(e.value)
    with pytest.raises(CheckpointError, match=rel):
        load_checkpoint(out, verify=True)
    with caplog.at_level(logging.WARNING):
        again, _, params, _ = load_model(tmp_path / "hf", cache_dir=tmp_path / "cache",
                                         verify=True, progress=False)
    assert again == out
    assert any(rel in r.getMessage() and "converting it again" in r.getMessage()
               for r in caplog.records)
    assert_params_match(params, sd)
    verify_checkpoint(out)
    assert temp_dirs(tmp_path / "cache") == []


def test_first_load_after_conversion_reads_every_checksum(tmp_path, count_hashes):
    make_hf(tmp_path / "hf")
    out = convert(tmp_path / "hf", tmp_path / "out", progress=False)
    recorded = json.loads((out / "convert_info.json").read_text())["files"]
    assert "config.json" in recorded and any(f.startswith("params/") for f in recorded)
    count_hashes.clear()
    load_checkpoint(out)
    assert len(count_hashes) == len(recorded)  # first load: everything
    count_hashes.clear()
    load_checkpoint(out)
    assert count_hashes == []  # verified before: sizes only
    load_checkpoint(out, verify=True)
    assert len(count_hashes) == len(recorded)  # asked for

    fresh = convert(tmp_path / "hf", tmp_path / "fresh", progress=False)
    damage_middle(largest_params_file(fresh))
    with pytest.raises(CheckpointError, match=largest_params_file(fresh).name):
        load_checkpoint(fresh)  # damaged before its first load: found without verify=True


def test_read_only_checkpoint_skips_the_stamp(tmp_path, monkeypatch, count_hashes):
    make_hf(tmp_path / "hf")
    out = convert(tmp_path / "hf", tmp_path / "out", progress=False)

    def read_only(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(writer.tempfile, "mkstemp", read_only)
    count_hashes.clear()
    load_checkpoint(out)
    load_checkpoint(out)
    assert not (out / writer.VERIFIED_FILE).exists()
    assert len(count_hashes) == 2 * len(json.loads((out / "convert_info.json").read_text())["files"])


def test_truncated_or_missing_file_is_found_by_the_size_check(tmp_path, caplog, count_hashes):
    sd = make_hf(tmp_path / "hf")
    out = convert(tmp_path / "hf", tmp_path / "out", progress=False)
    load_checkpoint(out)  # verified: from now on only sizes are checked
    victim = largest_params_file(out)
    size = victim.stat().st_size
    victim.write_bytes(victim.read_bytes()[:-10])
    (out / "params" / "_METADATA").unlink()
    count_hashes.clear()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(out)
    assert count_hashes == []
    message = str(e.value)
    assert str(out) in message and "params/_METADATA: missing" in message
    assert f"{victim.relative_to(out).as_posix()}: {size - 10} bytes, expected {size}" in message
    # a converted directory whose source is unchanged is converted again by load_model
    with caplog.at_level(logging.WARNING):
        again, _, params, _ = load_model(out, progress=False)
    assert again == out and "converting it again" in caplog.text
    assert_params_match(params, sd)
    # ... and without its source it is an error that says how to re-convert
    victim = largest_params_file(out)
    victim.write_bytes(victim.read_bytes()[:-10])
    (tmp_path / "hf").rename(tmp_path / "moved")
    with pytest.raises(CheckpointError, match="no longer exists") as e:
        load_model(out, progress=False)
    assert f"python -m convert {tmp_path / 'hf'} --out {out} --force" in str(e.value)


def test_failed_restore_of_a_verified_entry_checks_checksums_and_repairs(tmp_path, caplog):
    sd = make_hf(tmp_path / "hf")
    out, *_ = load_model(tmp_path / "hf", cache_dir=tmp_path / "cache", progress=False)
    metadata = out / "params" / "_METADATA"
    metadata.write_bytes(b"\0" * metadata.stat().st_size)  # same size: passes the cheap check
    with pytest.raises(Exception) as e:
        load_checkpoint(out)  # orbax itself fails on it
    assert not isinstance(e.value, CheckpointError)
    with caplog.at_level(logging.WARNING):
        again, _, params, _ = load_model(tmp_path / "hf", cache_dir=tmp_path / "cache",
                                         progress=False)
    assert again == out and "params/_METADATA" in caplog.text
    assert_params_match(params, sd)


def test_checkpoint_without_checksums_still_loads(tmp_path, caplog):
    sd = make_hf(tmp_path / "hf")
    out = convert(tmp_path / "hf", tmp_path / "old", progress=False)
    info = json.loads((out / "convert_info.json").read_text())
    del info["files"], info["source_fingerprint"]
    (out / "convert_info.json").write_text(json.dumps(info))
    with caplog.at_level(logging.WARNING):
        _, params, _ = load_checkpoint(out)
        load_checkpoint(out)
        path, *_ = load_model(out, progress=False)
    assert path == out
    assert_params_match(params, sd)
    warnings = [r.getMessage() for r in caplog.records if "cannot be verified" in r.getMessage()]
    assert len(warnings) == 1 and str(out) in warnings[0] and "--force" in warnings[0]


def test_cli_verify(tmp_path, capsys):
    make_hf(tmp_path / "hf")
    out = convert(tmp_path / "hf", tmp_path / "out", progress=False)
    assert convert_main([str(out), "--verify"]) == 0
    damage_middle(largest_params_file(out))
    assert convert_main([str(out), "--verify"]) == 1
    err = capsys.readouterr().err
    assert largest_params_file(out).relative_to(out).as_posix() in err and str(out) in err
    assert convert_main([str(tmp_path / "hf"), "--verify"]) == 1
    assert "not a converted checkpoint" in capsys.readouterr().err


def test_generate_cli_verify_reports_a_damaged_checkpoint(tmp_path, capsys):
    from lserve_jax import LLM
    from lserve_jax.generate import main as generate_main

    make_hf(tmp_path / "hf")
    out = convert(tmp_path / "hf", tmp_path / "out", progress=False)
    LLM(str(out))  # the first load checks every checksum; later ones check sizes only
    damage_middle(largest_params_file(out))
    (tmp_path / "hf").rename(tmp_path / "moved")  # no source to repair from
    with pytest.raises(CheckpointError, match="no longer exists"):
        LLM(str(out), verify=True)
    code = generate_main(["--ckpt", str(out), "--verify", "--prompt", "x"])
    err = capsys.readouterr().err
    assert code == 2 and largest_params_file(out).relative_to(out).as_posix() in err


# ---- a cache shared between processes ---------------------------------------------------------

CONCURRENT_CHILD = r"""
import json, sys, time
from pathlib import Path
import convert.writer as writer
from lserve_jax.checkpoint import resolve_checkpoint

src, work, me, rounds = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
save = writer.save_params

def counted(path, params):  # path: <cache>/.<entry>.tmp-.../params
    with open(work / "saves.log", "a") as f:
        f.write(f"{path.parent.parent.name} {me}\n")
    save(path, params)

writer.save_params = counted
for r in range(rounds):
    (work / f"ready-{r}-{me}").touch()  # a barrier: both start each round together
    deadline = time.monotonic() + 200
    while len(list(work.glob(f"ready-{r}-*"))) < 2:
        if time.monotonic() > deadline:
            sys.exit(f"round {r}: the other process never arrived")
        time.sleep(0.002)
    out = resolve_checkpoint(src, cache_dir=work / f"cache{r}", progress=False)
    inode = (out / "convert_info.json").stat().st_ino
    print(json.dumps({"round": r, "out": str(out), "inode": inode}), flush=True)
"""


def run_children(script: str, *argvs: list[str]) -> list[subprocess.CompletedProcess]:
    """Run `python -c script` once per argv, all at once, each bounded by CHILD_TIMEOUT_S."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", script, *argv], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for argv in argvs]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=CHILD_TIMEOUT_S)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
            results[-1].pid = p.pid
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def out_name(hf: Path) -> str:
    """The cache entry name of HF directory `hf` converted to float32."""
    return f"{hf.name}-{_fingerprint(hf, 'float32')}"


def test_concurrent_resolves_convert_each_entry_once(tmp_path):
    sd = make_hf(tmp_path / "hf")
    rounds = 3
    entry = out_name(tmp_path / "hf")
    for r in range(1, rounds):  # an entry that exists but is not converted (as after a crash)
        (tmp_path / f"cache{r}" / entry).mkdir(parents=True)
    results = run_children(CONCURRENT_CHILD, *[[str(tmp_path / "hf"), str(tmp_path), me,
                                                str(rounds)] for me in "ab"])
    assert [res.returncode for res in results] == [0, 0], "\n".join(
        res.stderr[-4000:] for res in results)
    saves = (tmp_path / "saves.log").read_text().split("\n")[:-1]
    reports = [json.loads(line) for res in results for line in res.stdout.splitlines()]
    for r in range(rounds):
        cache = tmp_path / f"cache{r}"
        assert len([s for s in saves if s.startswith(f"cache{r} ")]) == 1, saves
        seen = [rep for rep in reports if rep["round"] == r]
        assert len(seen) == 2 and seen[0]["out"] == seen[1]["out"] == str(cache / entry)
        assert seen[0]["inode"] == seen[1]["inode"] == (cache / entry / "convert_info.json"
                                                        ).stat().st_ino
        assert temp_dirs(cache) == []
    _, params, _ = load_checkpoint(tmp_path / f"cache{rounds - 1}" / entry)
    assert_params_match(params, sd)


KILLED_CHILD = r"""
import os, signal, sys
from pathlib import Path
import convert.writer as writer
from lserve_jax.checkpoint import resolve_checkpoint

def die_while_saving(path, params):
    path.mkdir()
    (path / "partial").write_bytes(b"x" * 100_000)
    os.kill(os.getpid(), signal.SIGKILL)

writer.save_params = die_while_saving
resolve_checkpoint(Path(sys.argv[1]), cache_dir=Path(sys.argv[2]), progress=False)
"""


def test_conversion_killed_while_saving_is_cleaned_up_by_the_next_resolve(tmp_path):
    sd = make_hf(tmp_path / "hf")
    cache = tmp_path / "cache"
    [res] = run_children(KILLED_CHILD, [str(tmp_path / "hf"), str(cache)])
    assert res.returncode == -signal.SIGKILL, res.stderr
    [left] = temp_dirs(cache)
    assert left.startswith(f".{out_name(tmp_path / 'hf')}.tmp-{res.pid}@{socket.gethostname()}-")
    assert (cache / left / "params" / "partial").is_file()
    out = resolve_checkpoint(tmp_path / "hf", cache_dir=cache, progress=False)
    assert out.name == out_name(tmp_path / "hf") and temp_dirs(cache) == []
    _, params, _ = load_checkpoint(out)
    assert_params_match(params, sd)


def test_temp_dirs_of_live_or_foreign_owners_are_kept(tmp_path):
    out = tmp_path / "entry"
    mine = writer._owned_temp_dir(out, "tmp")  # owner: this test's process, alive
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=CHILD_TIMEOUT_S)
    host = socket.gethostname()
    dead = tmp_path / f".entry.old-{gone.pid}@{host}-abc123"
    foreign = tmp_path / f".entry.tmp-{gone.pid}@not-{host}-abc123"
    unowned = tmp_path / ".entry.tmp-abc123"  # no owner recorded: cannot tell, so kept
    for d in (dead, foreign, unowned):
        d.mkdir()
    assert remove_stale_temp_dirs(tmp_path) == [dead]
    assert mine.is_dir() and foreign.is_dir() and unowned.is_dir() and not dead.exists()
