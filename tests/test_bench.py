"""The benchmarks of bench/, each run in process on tiny inputs (the digits MLP and its four digits, the tiny model
file, a few photos, tiny n, steps and query budgets), so that make test-fast runs every one of them: what each writes
or prints is read back and checked against what must hold, its numbers recomputed where they can be. The parts that
start step 8 in a fresh process run step 8 here instead, by step 8's own command line; torchrun's throughput runs are
replaced by known rates, so that only their table is checked. bench/attack_speed.py has its run in
tests/test_speed.py."""
import csv
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import step_8_evaluate
from bench import certify as bench_certify
from bench import (evaluate_scaling, fast_ensemble, robust_accuracy, smoothing_demo, smoothing_photo,
                   smoothing_speed, square_crosscheck)
from tests.conftest import REPO, run_main
from utils.certify.report_smoothing import certified_accuracy_at
from utils.certify.smoothing import largest_radius, levels_per_value, lower_confidence_bound, radius_from_bound
from utils import speed
from utils.cli import UsageError
from utils.data import list_photos
from utils.flags import norm_budgets
from utils.evaluation.distributed import launcher
from utils.models import load_model, predict_images, prepare_image


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One torch thread, as the benchmarks run by default (--threads 1, which their mains set): on two cores shared
    with other work, two threads on these tiny models wait on each other (the reference AutoAttack on the four
    digits: 0.5 s on one thread, up to 9 s on two). The tests after these get their own count back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def digits(digits_setup):
    """(folder, model file, model, paths, labels, how many the model gets right) of the four digits."""
    folder, model_file = digits_setup / "digits", digits_setup / "mlp.pt2"
    model = load_model(str(model_file))
    paths, names = list_photos(folder)
    labels = [int(name.split("/")[0]) for name in names]
    right = sum(p == label for p, label in zip(predict_images(model, [prepare_image(p, model) for p in paths]), labels))
    return SimpleNamespace(folder=folder, model_file=model_file, model=model, paths=paths, labels=labels, right=right)


def parse(module, *argv):
    return module.get_args_parser().parse_args([str(arg) for arg in argv])


# ---- bench/certify.py ---------------------------------------------------------------------------------------------

def test_certify_counts_each_verdict_once_and_orders_bounds_exact_and_reference(digits, monkeypatch, capsys):
    """At 32 levels (every correctly classified digit falls, so the attacks cost milliseconds): each method's
    verdicts add up to the images, the misclassified ones are those the model gets wrong, interval <= CROWN <=
    alpha-CROWN <= exact <= what the attacks leave robust, and the exact verifier's seconds per image and its ratio
    to the reference's are those this test's own clock reads around the calls."""
    took = {}

    def clocked(name, function):
        def call(*args, **kwargs):
            started = time.perf_counter()
            found = function(*args, **kwargs)
            took.setdefault(name, []).append(time.perf_counter() - started)
            return found
        return call
    monkeypatch.setattr(bench_certify, "timed", clocked("certifier", bench_certify.timed))
    monkeypatch.setattr(bench_certify, "reference_autoattack", clocked("reference", bench_certify.reference_autoattack))
    # each certifier in this process (certify_alone, what the spawned process runs) instead of a fresh spawned one:
    # four spawns cost about 4.5 s each here; test_certify_runs_each_certifier_in_a_spawned_process checks the spawn
    monkeypatch.setattr(bench_certify, "in_own_process", lambda *args: bench_certify.certify_alone(*args))
    bench_certify.main(parse(bench_certify, "--model", digits.model_file, "--folder", digits.folder, "--images", 4,
                             "--epsilon", 32, "--time-limit", 5, "--device", "cpu"))
    out = capsys.readouterr().out
    assert re.search(r"^4 images of .*, model mlp\.pt2 \(16 ReLUs\), epsilon 32 levels, 1 thread\(s\), cpu", out, re.M), out
    table = {row[0]: row[1:] for row in ([cell.strip() for cell in line.strip().strip("|").split("|")]
                                         for line in out.splitlines()
                                         if line.startswith("| ") and not line.startswith("| method"))}
    proved = []
    for method in ("bounds (interval)", "bounds (CROWN)", "bounds (alpha-CROWN)", "exact (time limit 5 s)"):
        seconds, memory, robust, fooled, unknown, misclassified, _ = table[method]
        assert float(memory) > 0 and misclassified == str(4 - digits.right)
        counted = int(robust) + (0 if fooled == "-" else int(fooled)) + int(unknown) + int(misclassified)
        assert counted == 4, (method, table[method])
        proved.append(int(robust))
    attacks = int(table["step 8's ensemble (attacks)"][2].split()[0])
    reference = int(table["reference AutoAttack (standard)"][2].split()[0])
    assert proved == sorted(proved) and proved[-1] <= min(attacks, reference) <= digits.right
    exact_seconds, reference_seconds = (float(table[name][0]) for name in ("exact (time limit 5 s)",
                                                                           "reference AutoAttack (standard)"))
    assert reference_seconds == pytest.approx(took["reference"][0] / 4, abs=0.006)  # printed to 0.01 s
    ratio = float(re.search(r"exact / AutoAttack: time x([\d.]+) \(target: at most x1\)", out)[1])
    assert abs(ratio * reference_seconds - exact_seconds) <= 0.005 * (1 + ratio) + 0.001  # each printed to 0.01 s


def test_certify_runs_each_certifier_in_a_spawned_process(digits):
    """in_own_process (a spawned process that loads the model itself) gives the verdicts certify_alone gives in this
    process: the spawn the test above replaces, once, on the cheapest certifier."""
    images, labels = bench_certify.the_images(parse(bench_certify, "--model", digits.model_file, "--folder",
                                                    digits.folder, "--images", 4), digits.model)
    args = (str(digits.model_file), bench_certify.BoundsCertifier, bench_certify.BoundSettings("Linf", "interval"),
            images, labels, 2, "cpu", 1)
    _, spawned, memory = bench_certify.in_own_process(*args)
    _, here, _ = bench_certify.certify_alone(*args)
    assert memory > 0 and len(spawned) == 4
    assert [row["verdict"] for row in spawned] == [row["verdict"] for row in here]
    assert [row["margin_bound"] for row in spawned] == [row["margin_bound"] for row in here]


def test_certify_refuses_a_folder_without_labels(digits):
    flat = sorted(digits.folder.iterdir())[0]  # one class's folder: its photos have no label
    with pytest.raises(UsageError, match="needs true labels"):
        bench_certify.main(parse(bench_certify, "--model", digits.model_file, "--folder", flat, "--images", 1))


# ---- bench/robust_accuracy.py and bench/evaluate_scaling.py: step 8 in this process --------------------------------

class Step8InProcess:
    """Stands in for a benchmark's subprocess module: runs the step 8 command line it is given in this process
    (conftest's run_main) and answers as a finished process would (exit status, stdout, stderr)."""

    def __init__(self):
        self.commands, self.seconds = [], []

    def run(self, command, capture_output=True, text=True):
        assert command[:2] == [sys.executable, str(REPO / "step_8_evaluate.py")], command
        self.commands.append(command[2:])
        started = time.perf_counter()
        try:
            return run_main(step_8_evaluate, *command[2:])
        finally:
            self.seconds.append(time.perf_counter() - started)


SPLIT = re.compile(r"^\| (\w+) \| (ours|reference) \| ([\w-]+) \| (\d+)\+(\d+) \| ([\d.]+) \| (-?[\d.]+) \| ([\d.]+) \| "
                   r"([\d.]+|-) \|$", re.M)
ROW = re.compile(r"^\| (\w+) \| ([\d.]+) \| (\d+) \| ([\d.]+)% \((\d+)\) \| ([\d.]+)% \((\d+)\) \| ([+-]\d+) \| "
                 r"([\d.]+) \| ([\d.]+) \| x([\d.]+|inf) \| ([\d.]+) \| x([\d.]+|inf) \|$", re.M)


# ---- bench/fast_ensemble.py ----------------------------------------------------------------------------------------

def test_the_same_budget_may_serve_two_norms():
    """One budget per norm, in order: 8 levels in L-infinity and 8 in L1 are two budgets, not a repeat."""
    for bench in (fast_ensemble, robust_accuracy):
        assert parse(bench, "--norm", "Linf,L2,L1", "--epsilons", "8,1,8").epsilons == [8, 1, 8]
    assert norm_budgets(["Linf", "L2", "L1"], [8, 1, 8]) == [("Linf", 8), ("L2", 1), ("L1", 8)]


def test_fast_ensemble_rows_are_the_library_calls_counts(digits, capsys):
    """A row per norm whose robust counts are the library call's for each ensemble on the same digits (recomputed
    here), whose difference follows from them, and whose ratio is the two printed times'."""
    from utils.evaluation import robust_accuracy as call
    fast_ensemble.main(parse(fast_ensemble, "--model", digits.model_file, "--folder", digits.folder, "--norm",
                             "Linf,L2", "--epsilons", "16,2", "--steps", "3", "--queries", "20", "--batch-size", "3"))
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith(("| Linf", "| L2"))]
    images, labels = fast_ensemble.labelled_images(digits.folder, digits.model)
    assert len(rows) == 2
    for row, (norm, epsilon) in zip(rows, (("Linf", 16), ("L2", 2))):
        counts = [round(call(digits.model, images, labels, norm=norm, epsilon=epsilon, attacks=name, steps=3,
                             queries=20, batch_size=3).robust_accuracy * 4) for name in ("standard", "fast")]
        assert [int(row[3]), int(row[4]), int(row[5])] == [*counts, counts[1] - counts[0]], (row, counts)
        assert int(row[3]) <= digits.right
        standard_s, fast_s, ratio = float(row[6]), float(row[7]), float(row[8].strip(" |x"))
        # the ratio of the unrounded times, which the printed ones give to within their last digit
        low, high = (fast_s - 0.005) / (standard_s + 0.005), (fast_s + 0.005) / (standard_s - 0.005)
        assert low - 0.005 <= ratio <= high + 0.005, (row, low, high)


def test_robust_accuracy_puts_step_8_beside_the_reference_one_row_per_norm(digits, monkeypatch, capsys):
    """Ours is step 8's command line as the benchmark builds it (run here), the reference pyautoattack's, in L-infinity
    and L2 at budgets that fool every correctly classified digit: per norm a row whose counts are those of the four
    digits, whose percentages and difference follow from the counts, and whose robust counts are at most the digits
    the model gets right."""
    step_8 = Step8InProcess()
    monkeypatch.setattr(robust_accuracy, "subprocess", step_8)
    batches, clocks, reference_seconds = [], [], []
    real_reference = robust_accuracy.reference_autoattack

    def reference(*args, batch_size, **kwargs):
        batches.append(batch_size)
        started = time.perf_counter()
        found = real_reference(*args, batch_size=batch_size, **kwargs)
        reference_seconds.append(time.perf_counter() - started)
        return found
    monkeypatch.setattr(robust_accuracy, "reference_autoattack", reference)
    monkeypatch.setattr(robust_accuracy, "NetworkClock", lambda net: clocks.append(speed.NetworkClock(net)) or clocks[-1])
    robust_accuracy.main(parse(robust_accuracy, "--model", digits.model_file, "--folder", digits.folder,
                               "--norm", "Linf,L2", "--epsilons", "32,4", "--batch-size", "3"))
    out = capsys.readouterr().out
    assert [command[command.index("--norm") + 1:command.index("--norm") + 6] for command in step_8.commands] == \
        [["Linf", "--epsilons", "32", "--batch-size", "3"], ["L2", "--epsilons", "4", "--batch-size", "3"]]
    assert batches == [3, 3]  # the reference on the same batches as ours
    # per norm two clocked networks, ours (step 8 once more, in process) then the reference's: every digit forwarded,
    # the gradient attacks' backward passes through it
    assert len(clocks) == 4 and all(clock.images["forward"] >= 4 and clock.images["backward"] > 0 for clock in clocks)
    # and with its iterations: step 8's ensemble runs as many steps as its largest --steps (50 by default)
    assert all(command[command.index("--steps") + 1] == "100" for command in step_8.commands)
    assert out.startswith(f"{digits.folder}, model {Path(digits.model_file).name}, batches of 3, 100 iterations per gradient attack, 1 thread(s);")
    rows = ROW.findall(out)
    assert [(norm, epsilon, images) for norm, epsilon, images, *_ in rows] == [("Linf", "32", "4"), ("L2", "4", "4")]
    for index, ((_, _, images, ours_share, ours, reference_share, reference, difference, ours_s, reference_s, _,
                 network_s, floor), step_8_seconds, reference_took) in enumerate(zip(rows, step_8.seconds,
                                                                                      reference_seconds)):
        ours, reference = int(ours), int(reference)
        assert 0 <= ours <= digits.right and 0 <= reference <= digits.right
        assert float(ours_share) == pytest.approx(100 * ours / 4, abs=0.05)
        assert float(reference_share) == pytest.approx(100 * reference / 4, abs=0.05)
        assert int(difference) == ours - reference
        # each time as this test's own clock read it around the call (the bench's clock encloses that call alone)
        assert float(ours_s) == pytest.approx(step_8_seconds, abs=0.06)
        assert float(reference_s) == pytest.approx(reference_took, abs=0.06)
        # the reference's network passes, clocked inside its run: a part of it, and the floor is that share
        assert 0 <= float(network_s) <= float(reference_s)
        # the reference's own network clock over this test's clock of its run (the bench prints both times to 0.1 s,
        # 0.0 on a fast machine, and the floor to 0.01; its clock encloses the test's by one call's overhead)
        inside = clocks[2 * index + 1].inside()  # per norm ours, then the reference's
        assert float(floor) == pytest.approx(inside / reference_took, abs=0.006 + 0.002 / reference_took)
    assert "\nTarget: ours at most the reference plus one image, in at most half its time (x0.5).\nFloor: " in out
    # inside and outside the network: per norm ours per attack that ran and in all, then the reference in all
    splits = SPLIT.findall(out)
    for (norm, *_), ours_clock, reference_clock in zip(rows, clocks[0::2], clocks[1::2]):
        found = {(who, attack): (int(forward), int(backward), float(inside), float(outside), float(total), ratio)
                 for row_norm, who, attack, forward, backward, inside, outside, total, ratio in splits if row_norm == norm}
        attacks = [attack for who, attack in found if who == "ours" and attack != "all"]
        assert attacks and attacks[0] == "apgd" and set(attacks) <= {"apgd", "apgd-t", "fab", "square"}, found
        for key, (forward, backward, inside, outside, total, ratio) in found.items():
            assert inside + outside == pytest.approx(total, abs=0.0016), key  # each rounded to 0.0005 s
            assert forward > 0 and inside > 0 and outside >= 0, key
            if ratio != "-":
                assert float(ratio) == pytest.approx(outside / inside, abs=0.001 + 0.001 * (1 + outside / inside) / inside)
            if key[1] != "square":
                assert backward > 0, key
        # "all" is the clock's whole reading, and holds each attack's passes and time
        assert found["ours", "all"][:2] == (ours_clock.passes["forward"], ours_clock.passes["backward"])
        assert found["ours", "all"][2] == pytest.approx(ours_clock.inside(), abs=0.0005)
        for index in range(3):
            assert sum(found["ours", attack][index] for attack in attacks) <= found["ours", "all"][index] + 0.001
        assert found["reference", "all"][:2] == (reference_clock.passes["forward"], reference_clock.passes["backward"])
        assert found["reference", "all"][2] == pytest.approx(reference_clock.inside(), abs=0.0005)
    table = dict(zip([row[0] for row in rows], rows))
    for norm, row in table.items():  # the reference's total and time inside, as in the first table
        reference_all = next(split for split in splits if split[0] == norm and split[1:3] == ("reference", "all"))
        assert float(reference_all[7]) == pytest.approx(float(row[9]), abs=0.051)
        assert float(reference_all[5]) == pytest.approx(float(row[11]), abs=0.051)


def test_robust_accuracy_on_several_processes_gives_both_the_same_cores(digits, monkeypatch, capsys):
    """--processes 2: ours is step 8 under torchrun's launcher, 2 ranks of --threads 1 (run here as one process, whose
    results two ranks equal: tests/test_distributed.py), and the reference runs with 2 torch threads; the header
    says so."""
    step_8 = Step8InProcess()
    prefix = launcher(2)
    assert prefix == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

    def under_torchrun(command, **kwargs):
        assert command[:len(prefix)] == prefix, command
        return step_8.run([sys.executable, *command[len(prefix):]], **kwargs)
    monkeypatch.setattr(robust_accuracy, "subprocess", SimpleNamespace(run=under_torchrun))
    threads = []
    real_reference = robust_accuracy.reference_autoattack
    monkeypatch.setattr(robust_accuracy, "reference_autoattack", lambda *args, **kwargs: (
        threads.append(torch.get_num_threads()), real_reference(*args, **kwargs))[1])
    before = torch.get_num_threads()
    try:
        robust_accuracy.main(parse(robust_accuracy, "--model", digits.model_file, "--folder", digits.folder,
                                   "--norm", "Linf", "--epsilons", "32", "--batch-size", "2", "--processes", "2"))
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    assert [command[command.index("--threads") + 1] for command in step_8.commands] == ["1"]
    assert threads == [2]
    assert "ours as 2 torchrun processes of 1 thread(s), the reference in one process of 2 threads;" in out
    assert len(ROW.findall(out)) == 1


@pytest.mark.parametrize("argv, message", [
    (["--norm", "Linf,L2", "--epsilons", "8,1,2"], "gives 3 budgets for 2 norms"),
    (["--norm", "Linf", "--epsilons", "300"], r"--epsilons must be in \(0, 255\]"),
], ids=["budgets per norm", "Linf over 255 levels"])
def test_robust_accuracy_refuses_budgets_that_do_not_fit(digits, argv, message, capsys):
    """Refused before anything runs: no table started."""
    with pytest.raises(UsageError, match=message):
        robust_accuracy.main(parse(robust_accuracy, "--model", digits.model_file, "--folder", digits.folder, *argv))
    assert capsys.readouterr().out == ""


def test_evaluate_scaling_memory_run_is_step_8_on_every_photo_with_its_peak(tmp_path, capsys):
    """The memory child in process: step 8 on three seeded noise photos with a small network; its own timer line
    (which the throughput runs parse) counts them, results.csv has each, and the peak resident set is printed (here
    this test process's: what it says about memory growth is the fresh child's business)."""
    photos = evaluate_scaling.synthetic_photos(tmp_path / "photos", 3)
    written = sorted(photos.iterdir())
    assert [path.name for path in written] == ["00000.png", "00001.png", "00002.png"]
    assert {Image.open(path).size for path in written} == {(256, 256)}
    started = time.perf_counter()
    evaluate_scaling.main(parse(evaluate_scaling, "--memory-child", photos, tmp_path / "out"))
    took = time.perf_counter() - started
    out = capsys.readouterr().out
    found = evaluate_scaling.TIMER.search(out)
    assert found and int(found[1]) == 3, out
    # the attacks' seconds: within this test's own reading of the whole run, and the rate beside them follows from them
    seconds = float(found[2])
    assert 0 < seconds <= took + 0.005, (seconds, took)
    rate = float(re.search(r"Evaluated 3 photos in [\d.]+ s \(([\d.]+) photos/s\)", out)[1])
    assert rate == pytest.approx(3 / seconds, rel=0.005 / seconds + 0.001), (rate, seconds)
    with open(tmp_path / "out" / "results.csv", newline="") as handle:
        assert {row["image"] for row in csv.DictReader(handle)} == {path.name for path in written}
    peak = int(re.search(r"^peak_rss_kib (\d+)$", out, re.M)[1])
    assert peak > 50 * 1024, "torch alone takes more than 50 MiB"


def test_evaluate_scaling_tables_speedups_and_memory_growth_with_verdicts(monkeypatch, capsys):
    """main with its fresh-process runs replaced by known rates and peaks: each configuration on the photos it
    wrote, the speedups computed from those rates, and one PASS and one FAIL verdict."""
    rates = {(1, 2): 1.5, (1, 1): 1.0, (2, 1): 1.8}
    peaks = {1: 200.0, 2: 240.0}

    def throughput(processes, threads, folder, work, args):
        assert len(list(folder.glob("*.png"))) == 8 and args.steps == 2
        return rates[processes, threads]

    monkeypatch.setattr(evaluate_scaling, "throughput", throughput)
    monkeypatch.setattr(evaluate_scaling, "peak_memory", lambda folder, out: peaks[len(list(folder.glob("*.png")))])
    evaluate_scaling.main(parse(evaluate_scaling, "--images", 8, "--memory-images", "1,2"))
    out = capsys.readouterr().out
    assert "| 1 x 2 | 1.500 | 1.50 | 1.00 |\n| 1 x 1 | 1.000 | 1.00 | 0.67 |\n| 2 x 1 | 1.800 | 1.80 | 1.20 |" in out
    assert "2 x 1 over 1 x 1: 1.80 (target >= 1.7: PASS); 2 x 1 over 1 x 2: 1.20 (target >= 1.0: PASS)" in out
    assert "| 1 | 200 |\n| 2 | 240 |" in out
    assert "2 photos against 1: +20.0% (target within 15%: FAIL)" in out


# ---- randomized smoothing: bench/smoothing_demo.py, smoothing_photo.py, smoothing_speed.py -------------------------

def test_smoothing_demo_writes_each_models_rows_the_table_and_the_figure(digits, tmp_path, capsys):
    """Two models (the MLP and a copy of its file) on the four digits: a certified-NAME.csv of four rows each, equal
    but for the seconds (same seed), radii that follow from their counts, and a table whose shares are recomputed
    from the rows, with the cap n = 100 sets."""
    twin = tmp_path / "twin.pt2"
    twin.write_bytes(digits.model_file.read_bytes())
    twin.with_suffix(".classes.txt").write_bytes(digits.model_file.with_suffix(".classes.txt").read_bytes())
    out = tmp_path / "out"
    smoothing_demo.main(parse(smoothing_demo, "--folder", digits.folder, "--models", f"{digits.model_file},{twin}",
                              "--names", "mlp,twin", "--sigma", 0.25, "--n0", 10, "--n", 100, "--batch-size", 100,
                              "--radii", "0,0.2", "--output-dir", out))
    tables = {}
    for name in ("mlp", "twin"):
        with open(out / f"certified-{name}.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert list(rows[0]) == list(smoothing_demo.COLUMNS) and len(rows) == 4
        for row, label in zip(rows, digits.labels):
            assert row["label"] == str(label) and row["n"] == "100"
            p_lower = lower_confidence_bound(int(row["n_a"]), 100, 0.001)
            if row["verdict"] == "abstain":
                assert p_lower <= 0.5 and row["radius"] == ""
            else:
                assert float(row["radius"]) == pytest.approx(radius_from_bound(p_lower, 0.25))
                assert (row["verdict"] == "robust") == (row["prediction"] == row["label"])
        tables[name] = [{k: v for k, v in row.items() if k != "seconds"} for row in rows]
        shares = certified_accuracy_at([0.0, 0.2], rows)
        cells = " | ".join(f"{share:.0%} ({round(share * 4)}/4)" for share in shares)
        assert f"| {name} | {cells} |" in (out / "certified_accuracy.md").read_text()
    assert tables["mlp"] == tables["twin"]
    assert any(row["verdict"] == "robust" for row in tables["mlp"]), "a certificate to check"
    cap = largest_radius(100, 0.001, 0.25)
    assert f"no radius above {cap:.2f} can be certified with n = 100." in (out / "certified_accuracy.md").read_text()
    assert Image.open(out / "certified_accuracy.png").size[0] > 300
    assert "| mlp |" in capsys.readouterr().out


def test_smoothing_photo_says_each_radius_in_three_units(digits, capsys):
    """Two digits, n = 100: each line's lower bound and radius follow from its count (Clopper-Pearson, then
    sigma * Phi^-1), the radius is at most the cap n sets, and its levels per value are the radius spread evenly."""
    sigma, n = 0.25, 100
    smoothing_photo.main(parse(smoothing_photo, *digits.paths[:2], "--model", digits.model_file, "--sigma", sigma,
                               "--n0", 10, "--n", n))
    out = capsys.readouterr().out
    cap = largest_radius(n, 0.001, sigma)
    assert f"(no radius above {cap:.3f} can be certified with this n):" in out.splitlines()[0]
    lines = out.splitlines()[1:]
    assert len(lines) == 2
    said = 0
    for line, path in zip(lines, digits.paths[:2]):
        assert line.startswith(f"  {path.name}: ")
        found = re.search(r"in (\d+) of 100 noisy copies \(lower bound ([\d.]+)\): certified L2 radius ([\d.]+), "
                          r"([\d.]+) levels of 255 per value spread evenly over 3x32x32", line)
        if found is None:
            assert "abstains" in line
            continue
        n_a, p_lower, radius, levels = int(found[1]), float(found[2]), float(found[3]), float(found[4])
        assert p_lower == pytest.approx(lower_confidence_bound(n_a, n, 0.001), abs=1e-4)
        assert radius == pytest.approx(radius_from_bound(lower_confidence_bound(n_a, n, 0.001), sigma), abs=1e-3)
        assert 0 < radius <= round(cap, 3) and levels == pytest.approx(levels_per_value(radius, (32, 32, 3)), abs=2e-3)
        said += 1
    assert said, "a radius to check"


def test_smoothing_speed_times_each_batch_size_and_names_the_fastest(digits, capsys):
    """n = 200 at batch sizes 50 and 100, one repeat: a line per batch size with a positive finite ratio, and the
    fastest named is the one with the most samples per second, its ratio and verdict against x1.1 as on its line."""
    smoothing_speed.main(parse(smoothing_speed, "--model", digits.model_file, "--image", digits.paths[0], "--n", 200,
                               "--batch-sizes", "50,100", "--repeats", 1))
    out = capsys.readouterr().out
    lines = re.findall(r"^  batch +(\d+): forward +([\d.]+) images/s, smoothing +([\d.]+) samples/s = ([\d.]+) images/s "
                       r"at n = 200; x([\d.]+) of n forward passes$", out, re.M)
    assert [int(line[0]) for line in lines] == [50, 100], out
    ratios = {int(batch): float(ratio) for batch, *_, ratio in lines}
    for batch, forward, samples, images, ratio in lines:  # each figure follows from the two times measured
        forward, samples, images, ratio = float(forward), float(samples), float(images), float(ratio)
        # forward = n / plain, samples = n / smoothed, images = 1 / smoothed, ratio = smoothed / plain; printed to 0.1
        # (rates), 0.0001 and 0.001
        assert ratio == pytest.approx(forward / samples, rel=0.05 / forward + 0.05 / samples, abs=0.0005), batch
        assert images == pytest.approx(samples / 200, rel=0.05 / samples, abs=0.00005), batch
    fastest = re.search(r"^fastest: batch (\d+), x([\d.]+) of n forward passes \((within|over) the x1\.1 target\)",
                        out, re.M)
    assert fastest, out
    batch = int(fastest[1])
    assert batch == int(max(lines, key=lambda line: float(line[2]))[0]), "the most samples per second"
    assert float(fastest[2]) == ratios[batch] and (fastest[3] == "within") == (ratios[batch] <= 1.1)


# ---- bench/square_crosscheck.py -----------------------------------------------------------------------------------

def test_square_crosscheck_tables_each_seed_and_the_totals(tiny_program, tmp_path, capsys):
    """The three Square attacks on the sample photos with the tiny model file, 10 queries, 2 seeds (each result is
    checked against the budget after rounding on the way): per seed a count of photos fooled per implementation, per
    budget their totals, and the verdict line that follows from them, in the Markdown file as on stdout."""
    pytest.importorskip("torchattacks")
    pytest.importorskip("pyautoattack")
    output = tmp_path / "square.md"
    square_crosscheck.main(parse(square_crosscheck, "--model", tiny_program, "--queries", 10, "--seeds", 2,
                                 "--device", "cpu", "--output", output))
    out = capsys.readouterr().out
    assert output.read_text() == "```\n" + out + "```\n"
    photos = len(square_crosscheck.sample_paths())
    per_seed = re.findall(r"^ +10 +(\d) +" + r" +".join([rf"(\d+)/{photos}"] * 3) + "$", out, re.M)
    assert [int(seed) for seed, *_ in per_seed] == [0, 1], out
    counts = np.array([[int(count) for count in counts] for _, *counts in per_seed])
    assert ((0 <= counts) & (counts <= photos)).all()
    total = re.search(r"^ +10 +total +" + r" +".join([rf"(\d+)/{2 * photos}"] * 3) + "$", out, re.M)
    assert total and [int(count) for count in total.groups()] == counts.sum(axis=0).tolist(), out
    ours, torchattacks, reference = counts.sum(axis=0)
    verdict = "meets" if ours >= torchattacks and ours >= reference else "misses"
    assert f"10 queries: ours {ours}, torchattacks {torchattacks}, reference {reference} of {2 * photos} " \
           f"({verdict} ours >= each peer)" in out
