"""Several workers under torchrun (gloo, 2 processes of 1 thread each) give the one-worker bytes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import output_hashes

from awqkit.io.resume import STATE, partial_folder

SMALL = ["--n-calib", "8", "--seq-len", "32", "--batch-size", "2", "--n-grid", "2", "--max-search-tokens", "64"]
CASES = {
    "per-linear nearest": ["--group-size", "32"],
    "per-linear greedy clip both": ["--group-size", "32", "--rounding", "greedy", "--clip", "--scaling", "both"],
    "shared module greedy awq": ["--group-size", "32", "--scales", "shared", "--objective", "module", "--rounding", "greedy", "--format", "awq"],
    "shared nearest compressed-tensors": ["--group-size", "32", "--scales", "shared", "--format", "compressed-tensors"],
    "per-linear gptq gram clip": ["--group-size", "32", "--rounding", "gptq", "--search-error", "gram", "--clip"],
}  # fmt: skip


def _command(workers: int, model: Path | str, out: Path, calib: Path | str, *extra: str) -> list[str]:
    cli = [
        "-m",
        "awqkit",
        "--quiet",
        "quantize",
        str(model),
        "--out",
        str(out),
        "--calib-data",
        str(calib),
        *SMALL,
        *extra,
    ]
    if workers == 1:
        return [sys.executable, *cli]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(workers), *cli]


def _run(workers: int, *args, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(_command(workers, *args), env=env, capture_output=True, text=True, timeout=600, **kwargs)


# per-linear nearest runs on SmolLM2 below; greedy with clipping covers the per-linear path here
@pytest.mark.parametrize(
    "case", ["per-linear greedy clip both", "shared module greedy awq", "per-linear gptq gram clip"]
)
def test_two_workers_write_the_one_worker_bytes(case, tiny_llama_dir, calib_text, tmp_path):
    for workers in (1, 2):
        done = _run(workers, tiny_llama_dir, tmp_path / f"w{workers}", calib_text, *CASES[case])
        assert done.returncode == 0, done.stderr[-2000:]
    # Bit for bit: the statistics (Gram matrices too) are pooled per batch and summed in batch order,
    # as one worker sums them, and each candidate's rows, quantized apart, are gathered whole before
    # its error is taken.
    assert output_hashes(tmp_path / "w1") == output_hashes(tmp_path / "w2")


@pytest.mark.parametrize("moe_calibration", ["all", "routed"])
def test_two_workers_write_the_one_worker_bytes_on_a_mixture_of_experts(
    moe_calibration, tokenizer, calib_text, tmp_path
):
    from conftest import save_tiny

    model = save_tiny(tmp_path / "model", tokenizer, model_type="qwen3_moe")
    extra = ["--group-size", "32", "--rounding", "greedy", "--moe-calibration", moe_calibration, "--min-tokens", "16"]
    if moe_calibration == "all":
        extra += ["--scales", "shared", "--objective", "module", "--symmetric", "--format", "compressed-tensors"]
    for workers in (1, 2):
        done = _run(workers, model, tmp_path / f"w{workers}", calib_text, *extra)
        assert done.returncode == 0, done.stderr[-2000:]
    assert output_hashes(tmp_path / "w1") == output_hashes(tmp_path / "w2")


@pytest.mark.parametrize("workers", [2, 3])
def test_workers_with_no_rows_of_a_small_weight_write_the_one_worker_bytes(workers, tokenizer, calib_text, tmp_path):
    """q has 32 rows, k and v 16, gate and up 33 (a ragged group too): one row chunk or two, so
    some workers hold no rows of them and join each exchange with empty parts."""
    from conftest import save_tiny

    model = save_tiny(tmp_path / "model", tokenizer, head_dim=8, intermediate_size=33)
    extra = ["--group-size", "16", "--scales", "shared", "--objective", "module", "--rounding", "greedy", "--clip"]
    for world in (1, workers):
        done = _run(world, model, tmp_path / f"w{world}", calib_text, *extra)
        assert done.returncode == 0, done.stderr[-2000:]
    assert output_hashes(tmp_path / "w1") == output_hashes(tmp_path / f"w{workers}")


def test_more_workers_than_calibration_batches_is_one_line_and_nothing_written(tiny_llama_dir, calib_text, tmp_path):
    done = _run(2, tiny_llama_dir, tmp_path / "out", calib_text, "--n-calib", "2", "--batch-size", "2")
    said = [line for line in done.stderr.splitlines() if line.startswith("awqkit: error:")]
    assert done.returncode != 0 and not (tmp_path / "out").exists() and not list(tmp_path.iterdir())
    assert said and all("2 workers need at least 2 calibration batches" in line for line in said), done.stderr[-2000:]


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _wait_for_progress(partial: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while not (partial / STATE).exists():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its first block was saved"
        time.sleep(0.05)


def test_a_killed_worker_fails_the_run_and_nothing_appears_at_out(tokenizer, calib_text, tmp_path):
    from conftest import save_tiny

    model = save_tiny(tmp_path / "model", tokenizer, num_hidden_layers=6)
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    process = subprocess.Popen(_command(2, model, out, calib_text, "--group-size", "32"), env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    _wait_for_progress(partial_folder(out), process)
    workers = [child for child in _children(process.pid)]
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGKILL)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0 and not out.exists()
    # The surviving worker says so in one line (torchrun then adds its own report of the failure).
    said = [line for line in stderr.splitlines() if line.startswith("awqkit: error: worker 0: ")]
    assert len(said) == 1 and "another worker of this run stopped" in said[0], stderr[-3000:]
    # The same command afterwards continues from the saved blocks and gives the one-worker bytes.
    assert _run(2, model, out, calib_text, "--group-size", "32").returncode == 0
    assert _run(1, model, tmp_path / "one", calib_text, "--group-size", "32").returncode == 0
    assert output_hashes(out) == output_hashes(tmp_path / "one")


@pytest.mark.real
@pytest.mark.parametrize(
    "case",
    [
        "per-linear nearest",
        "per-linear greedy clip both",
        "shared nearest compressed-tensors",
        "shared module greedy awq",
    ],
)
def test_two_workers_on_smollm2_write_the_one_worker_bytes(case, smollm2_dir, tmp_path):
    extra = [*CASES[case], "--group-size", "64"]
    for workers in (1, 2):
        done = _run(workers, "smollm2", tmp_path / f"w{workers}", "fortunes", *extra)
        assert done.returncode == 0, done.stderr[-2000:]
    assert output_hashes(tmp_path / "w1") == output_hashes(tmp_path / "w2")
