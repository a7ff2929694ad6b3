"""Step 8 across processes: torchrun with 2 ranks gives one process's results byte for byte, a rank killed with
SIGKILL is resumed by one process, and the pieces of utils.distributed."""
import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import GRACE_HOPPER, OFFLINE, REPO
from utils.evaluation import distributed
from utils.samples import sample_paths

pytestmark = pytest.mark.slow  # end to end, several processes: make test-fast leaves it out

# 5 photos in batches of 2: batches [0, 1], [2, 3], [4]; under 2 ranks rank 0 runs the first and last, rank 1 the
# second. pgd at 2 and 4 steps plus the unbounded run: three jobs per batch.
GRID = ("--model", OFFLINE, "--methods", "pgd", "--epsilons", "2", "--steps", "2", "--batch-size", "2",
        "--threads", "1")


def command(processes, *args):
    script = str(REPO / "step_8_evaluate.py")
    if processes == 0:
        return [sys.executable, script, *map(str, args)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            script, *map(str, args)]


def evaluate(processes, photos, out, *extra):
    """Run step 8 as one plain process (processes=0) or under torchrun; returns the CompletedProcess."""
    result = subprocess.run(command(processes, photos, *GRID, "--output-dir", out, *extra), cwd=photos.parent,
                            capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def rows_without_seconds(out):
    with open(out / "results.csv", newline="") as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def png_bytes(out):
    return {path.relative_to(out).as_posix(): path.read_bytes() for path in sorted((out / "images").rglob("*.png"))}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist") / "photos"
    folder.mkdir()
    for path in [GRACE_HOPPER, *sample_paths()[1:5]]:
        shutil.copyfile(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def one_process(photos):
    out = photos.parent / "one"
    evaluate(0, photos, out)
    return out


def test_one_process_repeats_itself_byte_for_byte(one_process, photos):
    """The guarantee that holds on the real model: same inputs, seed, batch size and threads -> same bytes."""
    again = photos.parent / "again"
    evaluate(0, photos, again)
    assert rows_without_seconds(again) == rows_without_seconds(one_process)
    assert png_bytes(again) == png_bytes(one_process)


def test_torchrun_two_ranks_equal_one_process(one_process, photos):
    out = photos.parent / "two"
    evaluate(2, photos, out)
    assert rows_without_seconds(out) == rows_without_seconds(one_process), "merged in one process's order"
    pngs = png_bytes(out)
    assert len(pngs) == 5 * 3 and pngs == png_bytes(one_process)
    assert not (out / "shards").exists(), "rank 0 merged the shards into results.csv"
    summary = (out / "summary.md").read_text()
    assert "2 processes" in summary and "batch size 2" in summary and "1 torch thread(s)" in summary


def children(pid):
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def rank_pid(launcher, rank):
    """The pid of the torchrun worker of `rank` (its environment says RANK=rank)."""
    for pid in children(launcher):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    return None


def run_until_rows(processes, photos, out, shard, lines, victim):
    """Start step 8 and SIGKILL `victim(launcher)` (a pid) once `shard` has `lines` lines; returns the exit status."""
    launcher = subprocess.Popen(command(processes, photos, *GRID, "--output-dir", out), cwd=photos.parent,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 300
        while not (shard.is_file() and len(shard.read_text().splitlines()) >= lines):
            assert launcher.poll() is None and time.monotonic() < deadline, f"{shard.name} never had {lines} lines"
            time.sleep(0.02)
        pid = victim(launcher)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        return launcher.wait(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


def test_rank_killed_then_resumed_by_one_process(one_process, photos):
    out = photos.parent / "killed"
    shard = out / "shards" / "results.rank-1.csv"
    status = run_until_rows(2, photos, out, shard, 2, lambda launcher: rank_pid(launcher.pid, 1))  # a first job's rows
    assert status != 0, "torchrun reports the killed rank"
    assert not (out / "results.csv").exists(), "killed before the merge"
    written = len(shard.read_text().splitlines()) - 1
    assert 1 <= written < 3 * 2, "killed mid-run: some of rank 1's rows, not all"
    with open(shard, "a") as handle:  # as if the kill had landed mid-append
        handle.write("coffee.png,pgd,2,4,none,plain,1,,")

    resumed = evaluate(0, photos, out, "--resume")
    rows = rows_without_seconds(out)
    assert rows == rows_without_seconds(one_process), "the same rows as an uninterrupted run, in its order"
    assert len({tuple(row.values())[:6] for row in rows}) == len(rows), "no row twice"
    assert png_bytes(out) == png_bytes(one_process)
    assert "evaluating" in resumed.stderr


def test_thread_share_and_dealing():
    assert distributed.thread_share(None, distributed.Context(local_world_size=2), cores=16) == 8
    assert distributed.thread_share(None, distributed.Context(local_world_size=4), cores=2) == 1
    assert distributed.thread_share(3, distributed.Context(local_world_size=4), cores=2) == 3
    batches = [[0, 1], [2, 3], [4]]
    assert distributed.deal(batches, distributed.Context(0, 2)) == [[0, 1], [4]]
    assert distributed.deal(batches, distributed.Context(1, 2)) == [[2, 3]]
    assert distributed.deal(batches, distributed.Context()) == batches


def test_plain_process_is_rank_0_of_1_without_a_group():
    context = distributed.start("cpu", environ={})
    assert (context.rank, context.world_size, context.device, context.grouped) == (0, 1, "cpu", False)
    assert distributed.gather("x", context) == ["x"]


def test_each_rank_gets_the_gpu_of_its_local_rank():
    assert distributed.rank_device("cuda", 3) == "cuda:3"
    assert distributed.rank_device("cpu", 3) == "cpu"
    assert (distributed.backend_for("cuda:1"), distributed.backend_for("cpu")) == ("nccl", "gloo")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the NCCL path needs one")
def test_cuda_ranks_over_nccl(photos):
    """Under torchrun on CUDA: NCCL, each rank on the GPU of its LOCAL_RANK, results merged as on CPU."""
    processes = min(2, torch.cuda.device_count())
    out = photos.parent / "cuda"
    evaluate(processes, photos, out, "--device", "cuda")
    summary = (out / "summary.md").read_text()
    assert "device cuda:0" in summary
    rows = rows_without_seconds(out)
    assert len(rows) == 5 * 3 and len(png_bytes(out)) == 5 * 3


def killed_after(one_process, out, rows, torn):
    """The files a single process leaves when SIGKILL lands while it appends the row after the first `rows`: its shard
    with those rows (and, if `torn`, the start of the next line), no results.csv, and the PNGs written so far (those of
    the rows kept and of the job being recorded)."""
    header, *body = (one_process / "results.csv").read_text().splitlines(keepends=True)
    shutil.copytree(one_process, out)
    (out / "results.csv").unlink()
    (out / "summary.md").unlink()
    (out / "shards").mkdir()
    (out / "shards" / "results.rank-0.csv").write_text(header + "".join(body[:rows]) + (body[rows][:25] if torn else ""))
    written = {row["file"] for row in csv.DictReader([header, *body[:rows + 1]])}
    for path in (out / "images").rglob("*.png"):
        if path.relative_to(out).as_posix() not in written:
            path.unlink()


@pytest.mark.parametrize("rows, torn", [(1, True), (3, False), (8, True)])
def test_a_kill_inside_a_batch_is_resumed_byte_for_byte(one_process, photos, rows, torn):
    """Rows are appended as each job finishes a batch of 2 photos: after an odd number of rows the kill landed inside
    a batch's rows. The job runs again on that whole batch, never on the lone photo, so every float is as uninterrupted.
    (On this CPU EfficientNet-Lite0 happened to give a lone photo the same bytes as its batch of 2; the rule itself is
    checked in tests/test_evaluate.py::test_a_batch_recorded_in_part_runs_again_whole.)"""
    out = photos.parent / f"cut_{rows}_{torn}"
    killed_after(one_process, out, rows, torn)
    evaluate(0, photos, out, "--resume")
    assert rows_without_seconds(out) == rows_without_seconds(one_process)
    assert png_bytes(out) == png_bytes(one_process)


def test_one_process_killed_then_resumed(one_process, photos):
    """A real SIGKILL of a plain run, wherever it lands after its first rows, then --resume: the uninterrupted bytes."""
    out = photos.parent / "killed_one"
    run_until_rows(0, photos, out, out / "shards" / "results.rank-0.csv", 4, lambda process: process.pid)
    assert not (out / "results.csv").exists(), "killed before the merge"
    evaluate(0, photos, out, "--resume")
    assert rows_without_seconds(out) == rows_without_seconds(one_process)
    assert png_bytes(out) == png_bytes(one_process)


def test_torchrun_says_a_bad_input_once(photos, tmp_path):
    result = subprocess.run(command(2, photos, *GRID, "--output-dir", tmp_path / "out", "--target", "no such class"),
                            cwd=photos.parent, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    said = [line for line in result.stderr.splitlines() if "error: unknown class name 'no such class'" in line]
    assert len(said) == 1, result.stderr[-3000:]
    assert not (tmp_path / "out").exists()
