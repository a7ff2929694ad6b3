"""Speed never changes a verdict: the memory format by a fixed rule, mixed precision judged in fp32, torch.compile."""
import argparse
import copy
import platform
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from step_2_pretrained import model_from_args
from utils.images import to_tensor
from utils.models import Classifier, freeze, load_model, predict, prepare_image, Preprocessing
from tests.conftest import OFFLINE, REPO, make_tiny_model, run_in_process, run_script
from utils import cli, speed
from utils.attacks import make_attack
from utils.cli import UsageError
from utils.images import to_uint8
from utils.samples import sample_paths

GOLDFISH = 1


# ---- mixed precision: the fp32 verdict decides ----------------------------------------------------------------

class BoundaryNet(nn.Module):
    """Two classes a hair apart: logit 0 is 1000, logit 1 is 1000 + the mean pixel (normalized to [-1, 1]), the rest
    far below. In bf16 both round to 1000 (bf16 steps by 4 there) and argmax breaks the tie towards class 0, so on a
    bright image fp32 says 1 and bf16 says 0; an epsilon of 1 level cannot move the mean across 0."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(1, 1000)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.weight[1] = 1.0
            self.linear.bias.fill_(-1000.0)
            self.linear.bias[:2] = 1000.0

    def forward(self, x):
        return self.linear(x.mean(dim=(1, 2, 3)).unsqueeze(1))


def boundary_model():
    return freeze(Classifier(BoundaryNet(), Preprocessing(8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), "boundary"))


def top_class(model, image, precision):
    with torch.no_grad(), speed.autocast(precision, "cpu"):
        return model(image).argmax(dim=1).item()


WHITE = torch.ones(1, 3, 8, 8)  # mean pixel 1: fp32 logits (1000, 1001), bf16 logits (1000, 1000)


def boundary_attack(model, target, precision, steps=4):
    return make_attack("pgd", model, epsilon=1, steps=steps, precision=precision)(WHITE, torch.tensor([target]))


def test_the_boundary_case_disagrees():
    model = boundary_model()
    assert top_class(model, WHITE, "bf16") == 0 and top_class(model, WHITE, "fp32") == 1


def test_a_bf16_success_the_fp32_forward_denies_is_no_success():
    model = boundary_model()
    result = boundary_attack(model, target=0, precision="bf16")
    assert not result.success.item(), "bf16 claims class 0 at every step; fp32 says 1, and fp32 decides"
    assert result.steps_used.item() == 4, "the unconfirmed claim must not stop the attack early"
    assert result.predictions.item() == 1
    assert top_class(model, result.adversarial, "fp32") == 1
    plain = boundary_attack(model, target=0, precision="fp32")
    assert not plain.success.item()


def test_an_fp32_success_bf16_misses_is_a_success_after_more_steps():
    model = boundary_model()
    result = boundary_attack(model, target=1, precision="bf16")
    plain = boundary_attack(model, target=1, precision="fp32")
    assert plain.success.item() and plain.steps_used.item() == 0
    assert result.success.item(), "the final image is judged in fp32, where it is class 1"
    assert result.predictions.item() == 1
    # bf16 ties the two logits at every step and never sees class 1, so the attack runs all 4 steps; fp32 found it at
    # step 0: precision cost every step, and the verdict is still fp32's
    assert result.steps_used.item() == 4, "precision may cost steps"


def test_fp16_is_refused_on_cpu(tmp_path):
    with pytest.raises(UsageError, match="^precision fp16 needs a CUDA device"):  # the library names its parameter
        speed.check_precision("fp16", "cpu")
    speed.check_precision("bf16", "cpu")
    photo = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(photo)
    # step 5's command line in this process (its parser and cli.run, as from the shell; tests/test_bad_input.py runs
    # one bad input per program in a fresh process): the same one line and exit status, without 5 s of start-up
    process = run_in_process("step_5_perturb.py", photo, "--precision", "fp16", "--device", "cpu", cwd=tmp_path)
    assert process.returncode == 2
    assert process.stderr.count("\n") == 1 and "error: --precision fp16 needs" in process.stderr, process.stderr
    assert not (tmp_path / "outputs").exists()



def test_cuda_without_a_cuda_device_is_refused(monkeypatch, tmp_path):
    """The library names its parameter, step 5's command line the flag, as before."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="^device cuda was asked for, but PyTorch sees no CUDA device; use device cpu"):
        speed.get_device("cuda")
    photo = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(photo)
    process = run_in_process("step_5_perturb.py", photo, "--device", "cuda", cwd=tmp_path)
    assert process.returncode == 2 and process.stderr.endswith(
        "error: --device cuda was asked for, but PyTorch sees no CUDA device; use --device cpu\n"), process.stderr


def test_bf16_attack_on_the_tiny_model_keeps_its_invariants(tiny_model, tiny_images):
    """Below fp32 everything the fp32 attack promises still holds, checked by an fp32 forward of the 8-bit image."""
    labels = torch.full((4,), GOLDFISH)
    result = make_attack("pgd", tiny_model, epsilon=32, steps=20, precision="bf16")(tiny_images, labels)
    assert result.success.any()
    assert torch.equal(predict(tiny_model, result.adversarial).argmax(dim=1) == GOLDFISH, result.success)
    assert (result.adversarial - tiny_images).abs().max() * 255 <= 32 + 1e-4


# ---- memory format --------------------------------------------------------------------------------------------

def test_the_rule_is_channels_last_for_2d_convolutions_on_cpu_and_cuda(offline_model, tiny_images):
    tiny = make_tiny_model()
    assert speed.memory_format_rule(tiny.net, "cpu") == torch.channels_last
    assert speed.memory_format_rule(tiny.net, "cuda") == torch.channels_last
    assert speed.memory_format_rule(tiny.net, "meta") == torch.contiguous_format, "no native NHWC kernels known there"
    assert speed.memory_format_rule(BoundaryNet(), "cpu") == torch.contiguous_format, "no convolution"
    # EfficientNet-Lite0 after folding is an fx graph calling F.conv2d: no nn.Conv2d module is left to find
    assert not any(isinstance(module, nn.Conv2d) for module in offline_model.net.modules())
    assert speed.memory_format_rule(offline_model.net, "cpu") == torch.channels_last
    tiny(tiny_images)
    assert tiny.weights_format == torch.channels_last
    assert tiny.net.features[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_the_rule_sees_the_convolutions_of_an_exported_program(tiny_images):
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(make_tiny_model().net, (tiny_images,), dynamic_shapes=({0: batch},))
    assert speed.memory_format_rule(program.module(), "cpu") == torch.channels_last


def test_channels_last_changes_the_layout_not_the_logits(tiny_images):
    plain, fast = make_tiny_model(), make_tiny_model()
    plain.memory_format, fast.memory_format = torch.contiguous_format, torch.channels_last
    with torch.no_grad():
        expected, logits = plain(tiny_images), fast(tiny_images)
    assert fast.net.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert plain.net.features[0].weight.is_contiguous()
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def clock_favouring(memory_format, models):
    """A clock under which every pass in `memory_format` looks 30 times faster than one in the other: it advances
    0.03 s per reading while the last model loaded holds its weights in `memory_format`, 1 s otherwise."""
    now = [0.0]

    def reading():
        now[0] += 0.03 if models and models[-1].weights_format == memory_format else 1.0
        return now[0]
    return reading


def step_5_bytes(tmp_path, name, monkeypatch, favour=None):
    """Every file step 5 writes for two sample photos in one batch of 2, on a fresh copy of EfficientNet-Lite0, with
    time.perf_counter and time.process_time favouring the memory format `favour`, or real."""
    import step_2_pretrained
    import step_5_perturb
    models = []
    monkeypatch.setattr(step_2_pretrained, "model_from_args",
                        lambda *args: models.append(copy.deepcopy(model_from_args(*args))) or models[-1])
    with monkeypatch.context() as patched:
        if favour is not None:
            patched.setattr(time, "perf_counter", clock_favouring(favour, models))
            patched.setattr(time, "process_time", clock_favouring(favour, models))
        photos = tmp_path / "photos"
        photos.mkdir(exist_ok=True)
        for path in sample_paths()[:2]:
            (photos / path.name).write_bytes(path.read_bytes())
        args = step_5_perturb.get_args_parser().parse_args(
            [str(photos), "--model", OFFLINE, "--device", "cpu", "--method", "pgd", "--epsilon", "2", "--steps", "3",
             "--no-early-stop", "--batch-size", "2", "--output-dir", str(tmp_path / name)])
        step_5_perturb.main(args)
    return {path.name: path.read_bytes() for path in sorted((tmp_path / name).iterdir())}


def test_no_clock_decides_a_float(tmp_path, monkeypatch):
    """The memory format is the rule's, however the clock reads: a clock making either format look 30 times faster
    leaves every byte step 5 writes as it is under the real clock (the two formats give different floats, so a
    timed choice would show here)."""
    expected = step_5_bytes(tmp_path, "real", monkeypatch)
    assert any(name.endswith(".png") for name in expected) and any(name.endswith(".npy") for name in expected)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        written = step_5_bytes(tmp_path, speed.format_name(memory_format), monkeypatch, memory_format)
        assert written == expected, f"a clock favouring {speed.format_name(memory_format)} changed the bytes"


def save_and_read_back(images_u8, folder):
    paths = []
    for index, image in enumerate(images_u8):
        paths.append(folder / f"{index}.png")
        Image.fromarray(image).save(paths[-1])
    return [np.asarray(Image.open(path).convert("RGB")) for path in paths]


def test_the_default_fast_path_reaches_the_plain_fp32_verdicts_on_the_sample_photos(offline_model, tmp_path):
    """The default fast path (batch norms folded, memory format by the rule) against the network as published in
    PyTorch's default settings. Other floats can send a sign-gradient attack down another path (1 thread against 2
    changes most pixels of a 10-step PGD image), so verdicts and budgets are compared, not bytes; the setting gives
    partial success, so a changed verdict would show. Every verdict is the published network's, on PNGs read back."""
    plain = copy.deepcopy(load_model(OFFLINE, "cpu", fold=False))
    plain.memory_format = torch.contiguous_format
    originals = [prepare_image(path, plain) for path in sample_paths()]
    labels = torch.full((len(originals),), GOLDFISH)
    epsilon, steps = 2, 3
    verdicts = {}
    for name, base, memory_format, precision in [("plain", plain, torch.contiguous_format, "fp32"),
                                                 ("default", offline_model, "auto", "fp32"),
                                                 ("contiguous", offline_model, torch.contiguous_format, "fp32")]:
        model = copy.deepcopy(base)
        model.memory_format = memory_format
        result = make_attack("pgd", model, epsilon=epsilon, steps=steps, alpha=1, precision=precision)(to_tensor(originals), labels)
        (tmp_path / name).mkdir()
        written = save_and_read_back(to_uint8(result.adversarial), tmp_path / name)
        assert max(np.abs(w.astype(int) - o.astype(int)).max() for w, o in zip(written, originals)) <= epsilon
        assert (result.steps_used <= steps).all()
        judged = predict(plain, to_tensor(written)).argmax(dim=1) == GOLDFISH
        assert torch.equal(judged, result.success), name
        verdicts[name] = judged.tolist()
    assert 0 < sum(verdicts["plain"]) < len(originals), f"the setting should give partial success: {verdicts}"
    assert verdicts["default"] == verdicts["plain"] and verdicts["contiguous"] == verdicts["plain"], verdicts


# ---- batch norms folded ---------------------------------------------------------------------------------------

class ConvBatchNormNet(nn.Module):
    """Both ways a network holds a convolution before a batch norm: an nn.Conv2d module, and F.conv2d on a weight
    (EfficientNet-Lite's same-padding convolutions), plus a batch norm that follows no convolution."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.weight = nn.Parameter(torch.randn(4, 8, 1, 1))
        self.bn2 = nn.BatchNorm2d(4, affine=False)
        self.bn3 = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 1000)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv(x)))
        x = self.bn3(torch.relu(self.bn2(torch.nn.functional.conv2d(x, self.weight))))
        return self.head(x.mean(dim=(2, 3)))


def test_folding_batch_norms_keeps_the_function_and_drops_the_folded_ones(tiny_images):
    torch.manual_seed(0)
    net = ConvBatchNormNet()
    for batch_norm in (net.bn1, net.bn2, net.bn3):  # statistics other than the identity, or folding proves nothing
        batch_norm.running_mean.uniform_(-1, 1)
        batch_norm.running_var.uniform_(0.5, 2)
        if batch_norm.affine:
            batch_norm.weight.data.uniform_(0.5, 2)
            batch_norm.bias.data.uniform_(-1, 1)
    net.eval()
    with torch.no_grad():
        before = net(tiny_images)
    folded = speed.fold_batch_norms(net)
    with torch.no_grad():
        assert torch.equal(net(tiny_images), before), "the network folded must be left as it was"
    kinds = [type(module) for module in folded.modules()]
    assert kinds.count(nn.BatchNorm2d) == 1, "bn1 and bn2 follow convolutions; bn3 follows a relu and stays"
    pixels = tiny_images.clone().requires_grad_(True)
    expected = net(pixels)
    expected_grad, = torch.autograd.grad(expected.logsumexp(dim=1).sum(), pixels)
    pixels = tiny_images.clone().requires_grad_(True)
    logits = folded(pixels)
    grad, = torch.autograd.grad(logits.logsumexp(dim=1).sum(), pixels)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)


def test_a_network_fx_cannot_trace_is_left_as_it_is():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x
    net = Branchy()
    assert speed.fold_batch_norms(net) is net


def test_the_offline_model_is_folded(offline_model):
    assert not any(isinstance(module, nn.BatchNorm2d) for module in offline_model.modules())
    assert any(isinstance(module, nn.BatchNorm2d) for module in load_model(OFFLINE, "cpu", fold=False).modules())


def test_the_speed_arguments_prepare_a_model():
    from utils.flags import add_speed_arguments
    parser = argparse.ArgumentParser()
    add_speed_arguments(parser)
    model = make_tiny_model()
    args = parser.parse_args(["--memory-format", "channels_last", "--precision", "bf16"])
    assert speed.prepare_model(model, args.precision, args.memory_format, 4, "cpu") is model
    assert model.memory_format == torch.channels_last
    assert speed.prepare_model(model, "fp32", "auto", 4, "cpu").memory_format == "auto"
    with pytest.raises(UsageError, match="fp16"):
        speed.prepare_model(model, "fp16", "auto", 4, "cpu")


# ---- torch.compile --------------------------------------------------------------------------------------------

def test_compile_on_the_tiny_model_matches_eager(tiny_images):
    reason = speed.compiler_missing()
    if reason:
        pytest.skip(reason)
    model = make_tiny_model()
    compiled, _ = speed.compile_model(model, tiny_images, "cpu")
    assert compiled.net is not model.net and compiled.preprocessing == model.preprocessing
    pixels = tiny_images.clone().requires_grad_(True)
    expected, = torch.autograd.grad(model(pixels).logsumexp(dim=1).sum(), pixels)
    pixels = tiny_images.clone().requires_grad_(True)
    logits = compiled(pixels)
    grad, = torch.autograd.grad(logits.logsumexp(dim=1).sum(), pixels)
    torch.testing.assert_close(logits.detach(), model(tiny_images).detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5)
    labels = torch.full((4,), GOLDFISH)
    ours = make_attack("pgd", compiled, epsilon=32, steps=10)(tiny_images, labels)
    judged = predict(model, ours.adversarial).argmax(dim=1) == GOLDFISH
    assert torch.equal(judged, ours.success)


# ---- the benchmark --------------------------------------------------------------------------------------------

@pytest.mark.smoke
def test_the_benchmark_prints_every_configuration_and_one_summary_line(tmp_path):
    process = run_script("bench/attack_speed.py", "--models", OFFLINE, "--batch-sizes", "1", "--steps", "1",
                         "--queries", "4", "--repeats", "1", "--threads", "1", cwd=tmp_path)
    assert process.returncode == 0, process.stderr[-2000:]
    out = process.stdout
    for run in ("fwd+bwd (the floor)", "torchattacks PGD", "ours fp32 [rule: channels_last]",
                "ours contiguous [contiguous]", "ours bf16 [rule: channels_last]"):
        assert run in out, out
    assert re.search(rf"^memory format, {OFFLINE} batch 1: channels_last \(the rule\) takes \d+\.\d{{3}} of contiguous's "
                     r"time per step$", out, re.M), out
    summary = [line for line in out.splitlines() if line.startswith(f"{OFFLINE} batch 1: ")]
    assert len(summary) == 1, out
    assert re.search(rf"^{OFFLINE} batch 1 \(apgd, square\): apgd/fwd\+bwd \d+\.\d{{3}} .*square/fwd \d+\.\d{{3}}", out, re.M), out
    # the norms table: each attack's step (a run of 2 steps less a run of one) and its call, and one verdict line
    for attack in ("pgd L2", "apgd L2", "apgd L1", "fab Linf", "fab L2", "fab L1"):
        assert re.search(rf"^{OFFLINE} +1 {attack} +(\d+\.\d +){{2}}(\d+\.\d|-) +\d+\.\d{{3}} +(\d+\.\d{{3}}|-) +"
                         r"\d+\.\d{3}$", out, re.M), (attack, out)
    assert "each run at 1 and at 2 steps" in out, out
    assert re.search(rf"^{OFFLINE} batch 1 \(norms\): step/fwd\+bwd <= 1\.1: (all meet|misses: .+)$", out, re.M), out
    assert re.fullmatch(rf"{OFFLINE} batch 1: ours/fwd\+bwd \d+\.\d{{3}} \(ours = [\w-]+\), "
                        r"ours/torchattacks \d+\.\d{3} \((meets|misses) <= 1\)", summary[0]), summary[0]
    # ours inside and outside the network, a clocked run per attack and norm: inside + outside = the run's total
    clocked = {attack: (int(forward), int(backward), float(inside), float(outside), float(total), ratio)
               for attack, forward, backward, inside, outside, total, ratio in re.findall(
                   rf"^{OFFLINE} +1 (\w+ \w+(?: \w+)?) +(\d+)\+(\d+) +(\d+\.\d\d) +(-?\d+\.\d\d) +(\d+\.\d\d) +"
                   r"(\d+\.\d{3}|-)$", out, re.M)}
    assert set(clocked) == {"pgd Linf fp32", "pgd Linf contiguous", "pgd Linf bf16", "apgd Linf", "square Linf",
                            "square L2", "pgd L2", "apgd L2", "apgd L1", "fab Linf", "fab L2", "fab L1"}, out
    for attack, (forward, backward, inside, outside, total, ratio) in clocked.items():
        assert inside + outside == pytest.approx(total, abs=0.011), attack  # each rounded to 0.005 ms
        assert forward > 0 and inside > 0 and outside >= 0, attack
        # outside/inside from the unrounded times, here from the printed ones (each off by up to 0.005 ms)
        assert float(ratio) == pytest.approx(outside / inside, abs=0.001 + 0.01 * (1 + outside / inside) / inside)
        if attack.startswith("square"):
            assert backward == 0 and forward >= 4, "gradient-free: a forward per query, no backward"
        else:
            assert backward > 0, attack
    for config in ("fp32", "contiguous", "bf16"):  # 1 step: its forward and backward, then the final image judged
        assert clocked[f"pgd Linf {config}"][:2] == (2, 1), clocked
    assert clocked["pgd L2"][:2] == (3, 2), "the norms table's clocked run is 2 steps"


FAULTS_PER_PASS = """
import resource, statistics, sys, torch
sys.path.insert(0, {repo!r})
from utils import speed
x, w = torch.rand(64, 3, 32, 32), torch.randn(16, 3, 3, 3)

def faults_per_pass():
    # the median pass: a burst the kernel or another thread causes in one pass (seen once in CI) is not the allocator's
    for _ in range(3):
        torch.conv2d(x, w, padding=1).relu().sum()
    counts = []
    for _ in range(21):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.conv2d(x, w, padding=1).relu().sum()
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return statistics.median(counts)

default = faults_per_pass()
assert speed.keep_freed_memory()
print(default, faults_per_pass())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_memory sets glibc's malloc only")
def test_kept_memory_spares_each_forward_its_page_faults():
    """A batch's 4 MB activations: by default glibc hands their pages back at every free and the next pass faults
    them in again (about 2,000 faults a pass); with keep_freed_memory, none after the first passes. One fresh
    process measures both, glibc's default first (nothing has set malloc yet there), then kept; each as its median
    pass, since CI once saw a mean of 51 kept faults a pass from a single pass's burst under load."""
    code = FAULTS_PER_PASS.format(repo=str(REPO))
    default, kept = map(float, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                              check=True).stdout.split())
    assert default > 500
    assert kept < 5


# The programs that do not start through cli.run, and why they need not keep freed memory
NOT_THROUGH_CLI_RUN = {"demo.py": "runs each step as a fresh process, which starts through cli.run",
                       "tools/create_idx_to_label.py": "copies a file; no tensor is allocated"}


def main_block_calls(path):
    """The names of the functions called in `path`'s `if __name__ == "__main__":` block (None if it has none)."""
    import ast
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            return {call.func.id for call in ast.walk(node) if isinstance(call, ast.Call) and
                    isinstance(call.func, ast.Name)}
    return None


def test_every_command_line_keeps_freed_memory(monkeypatch):
    """cli.run keeps freed memory before main runs (so main's own allocations are kept), and every program with a
    command line starts through cli.run, imported from utils.cli (the few exceptions named, with their reason)."""
    calls = []
    monkeypatch.setattr(speed, "keep_freed_memory", lambda: calls.append("keep"))
    with pytest.raises(SystemExit) as exit:
        cli.run(lambda args: calls.append("main"), cli.ArgumentParser(), [])
    assert exit.value.code == 0 and calls == ["keep", "main"]
    programs = sorted(str(path.relative_to(REPO)) for folder in (REPO, REPO / "tools", REPO / "bench")
                      for path in folder.glob("*.py") if main_block_calls(path) is not None)
    assert {"step_8_evaluate.py", "app.py", "bench/attack_speed.py", "tools/export_model.py"} <= set(programs)
    for program in programs:
        if program in NOT_THROUGH_CLI_RUN:
            continue
        assert "run" in main_block_calls(REPO / program), f"{program} does not start through cli.run"
        assert re.search(r"^from utils\.cli import .*\brun\b", (REPO / program).read_text(), re.M), program


# ---- the network's clock: what a run spends inside the network ------------------------------------------------

class _Slow(torch.autograd.Function):
    """The identity, whose forward advances the fake clock `now` by `forward_s` and whose backward by `backward_s`."""

    @staticmethod
    def forward(ctx, tensor, now, forward_s, backward_s):
        now[0] += forward_s
        ctx.now, ctx.backward_s = now, backward_s
        return tensor * 1.0

    @staticmethod
    def backward(ctx, grad):
        ctx.now[0] += ctx.backward_s
        return grad, None, None, None


class SlowNet(nn.Module):
    """A linear layer behind a forward of 3 s and a backward of 1 s, by the fake clock `now`."""

    def __init__(self, now):
        super().__init__()
        self.now = now
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        return self.linear(_Slow.apply(x, self.now, 3.0, 1.0))


def test_network_clock_times_forward_and_backward_passes_apart_without_touching_values(monkeypatch):
    """By a fake clock that only the network's passes (3 s forward, 1 s backward) and the loss around it (10 s forward,
    20 s backward) advance: the clock's forward span holds exactly the network's forwards, its backward span exactly
    its backward, and neither holds the loss's; passes and rows are counted, a forward without gradients adds no
    backward; outputs and input gradients are the network's own. (Real times, whose bounds flake under load, are
    the benchmarks' figures: bench/attack_speed.py and bench/robust_accuracy.py print them.)"""
    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    torch.manual_seed(0)
    net = SlowNet(now)
    clocked = speed.NetworkClock(net)
    x = torch.rand(5, 4, requires_grad=True)
    out = clocked(x)
    grad, = torch.autograd.grad(_Slow.apply(out, now, 10.0, 20.0).square().sum(), x)
    assert now[0] == 3 + 10 + 20 + 1, "every pass ran once"
    assert clocked.seconds == {"forward": 3.0, "backward": 1.0}
    assert clocked.passes == {"forward": 1, "backward": 1} and clocked.reading() == (1, 1, 4.0)
    with torch.no_grad():
        clocked(x[:2])
    assert clocked.seconds == {"forward": 6.0, "backward": 1.0} and clocked.inside() == 7.0
    assert clocked.passes == {"forward": 2, "backward": 1}
    assert clocked.images == {"forward": 7, "backward": 5}
    expected = net(x)
    expected_grad, = torch.autograd.grad(expected.square().sum(), x)
    assert torch.equal(out, expected) and torch.equal(grad, expected_grad)


# ---- start-up ---------------------------------------------------------------------------------------------------

def test_step_8_starts_without_scipy():
    """scipy takes about a second to import and only the certifiers use it (utils/certify/__init__.py): step 8
    imports the certifiers for their names, so their modules import scipy inside the functions that need it."""
    loaded = subprocess.run([sys.executable, "-c", "import sys, step_8_evaluate; print('scipy' in sys.modules)"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "False", "step 8 imports scipy at start-up"
