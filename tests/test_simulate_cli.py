"""`lrpilot simulate` as a user runs it: a real subprocess, the replay contract of
docs/policies.md."""

from __future__ import annotations

import json
import math
import subprocess
import warnings

import pytest
import torch

PLATEAU = json.dumps({"kind": "plateau", "metric": "val_loss", "patience": 1, "factor": 0.5})
PATIENT_0 = json.dumps({"kind": "plateau", "metric": "val_loss", "patience": 0, "factor": 0.5})


def simulate(exe, *args, stdin=""):
    return subprocess.run([exe, "simulate", *args], input=stdin, capture_output=True, text=True)


def records(*metrics):
    return "".join(
        json.dumps({"step": i, "metrics": m}) + "\n" for i, m in enumerate(metrics, start=1)
    )


def output(done):
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_plateau_matches_torch_through_the_command(lrpilot_exe):
    losses = [1.0, 0.9, 0.95, 0.97, None, 0.99, 0.5, 0.6, 0.7, 0.8]
    stream = records(*({} if v is None else {"val_loss": v, "loss": 3.0} for v in losses))
    got = output(
        simulate(
            lrpilot_exe, "--policy", PLATEAU, "--base-lr", "0.1", "--base-lr", "0.02", stdin=stream
        )
    )
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    opt = torch.optim.SGD([{"params": [params[0]], "lr": 0.1}, {"params": [params[1]], "lr": 0.02}])
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=1, factor=0.5)
    expected = []
    for value in losses:
        if value is not None:
            sched.step(value)
        expected.append(sched.get_last_lr())
    assert [line["step"] for line in got] == list(range(1, len(losses) + 1))
    assert all("momenta" not in line for line in got)
    for line, want in zip(got, expected, strict=True):
        assert all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(line["lrs"], want, strict=True))
    assert got[-1]["lrs"] != got[0]["lrs"], "the stream was meant to make plateau cut"


def test_cyclic_reports_momenta_like_torch(lrpilot_exe):
    spec = {
        "kind": "cyclic",
        "base_lr": 0.01,
        "max_lr": 0.1,
        "step_size_up": 3,
        "mode": "triangular2",
    }
    got = output(
        simulate(
            lrpilot_exe, "--policy", json.dumps(spec), "--base-lr", "0.5", stdin=records(*[{}] * 12)
        )
    )
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.5, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = torch.optim.lr_scheduler.CyclicLR(
            opt, 0.01, 0.1, step_size_up=3, mode="triangular2"
        )
        assert len(got) == 12
        for line in got:
            sched.step()
            assert math.isclose(line["lrs"][0], sched.get_last_lr()[0], rel_tol=1e-9)
            assert math.isclose(line["momenta"][0], opt.param_groups[0]["momentum"], rel_tol=1e-9)


def test_input_file_equals_stdin_and_blank_lines_are_skipped(lrpilot_exe, tmp_path):
    stream = records({"loss": 1.0}, {"loss": 1.0}, {"loss": 1.0})
    path = tmp_path / "metrics.jsonl"
    path.write_text(stream.replace("\n", "\n\n", 1))
    spec = json.dumps({"kind": "exponential", "gamma": 0.5})
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(spec)
    from_stdin = simulate(lrpilot_exe, "--policy", spec, "--base-lr", "1", stdin=stream)
    from_file = simulate(
        lrpilot_exe, "--policy", str(policy_file), "--base-lr", "1", "--input", str(path)
    )
    assert (
        output(from_file)
        == output(from_stdin)
        == [
            {"step": 1, "lrs": [0.5]},
            {"step": 2, "lrs": [0.25]},
            {"step": 3, "lrs": [0.125]},
        ]
    )


def test_step_numbers_are_echoed_not_used(lrpilot_exe):
    stream = "".join(json.dumps({"step": s, "metrics": {}}) + "\n" for s in (100, 7, 7, -3))
    got = output(
        simulate(
            lrpilot_exe,
            "--policy",
            '{"kind": "step", "step_size": 2}',
            "--base-lr",
            "1",
            stdin=stream,
        )
    )
    assert [line["step"] for line in got] == [100, 7, 7, -3]
    assert [line["lrs"][0] for line in got] == [1.0, 0.1, 0.1, 0.010000000000000002]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 3: invalid JSON"),
        ("[1, 2]", "line 3: expected a JSON object"),
        ('{"metrics": {}}', "line 3: step: required field is missing"),
        ('{"step": 1.5, "metrics": {}}', "line 3: step: expected an integer"),
        ('{"step": "3"}', "line 3: step: expected an integer"),
        ('{"step": 3, "metrics": [1]}', "line 3: metrics: expected an object"),
        ('{"step": 3, "metrics": {"val_loss": "low"}}', "line 3: metrics.val_loss: expected a num"),
        ('{"step": 3, "metrics": {"val_loss": true}}', "line 3: metrics.val_loss: expected a num"),
        ('{"step": 3, "metric": {"val_loss": 1.0}}', "line 3: metric: unknown field"),
    ],
)
def test_bad_line_stops_with_its_number_and_prints_nothing_for_it(lrpilot_exe, line, message):
    stream = records({"val_loss": 1.0}, {"val_loss": 1.0}) + line + "\n" + records({})
    done = simulate(lrpilot_exe, "--policy", PLATEAU, "--base-lr", "0.1", stdin=stream)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("lrpilot simulate: line 3: ")
    assert message in done.stderr
    assert len(done.stdout.splitlines()) == 2, "the two good lines before it, nothing for it"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policy", '{"kind": "warp"}', "--base-lr", "0.1"], "unknown policy kind 'warp'"),
        (["--policy", '{"kind": "plateau", "factor": 2}', "--base-lr", "0.1"], "plateau.factor"),
        (["--policy", "{oops", "--base-lr", "0.1"], "--policy: invalid JSON"),
        (["--policy", "/no/such/policy.json", "--base-lr", "0.1"], "cannot read"),
        (["--policy", PLATEAU, "--base-lr", "0.1", "--input", "/no/such.jsonl"], "--input"),
        (
            [
                "--policy",
                '{"kind": "cyclic", "base_lr": [0.1, 0.2], "max_lr": 1}',
                "--base-lr",
                "0.1",
            ],
            "cyclic.base_lr: expected 1 value(s), one per param group, got 2",
        ),
    ],
)
def test_bad_policy_or_file_is_one_line_exit_1(lrpilot_exe, args, message):
    done = simulate(lrpilot_exe, *args, stdin=records({"val_loss": 1.0}))
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1
    assert message in done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policy", PLATEAU], "--base-lr"),
        (["--policy", PLATEAU, "--base-lr", "fast"], "not a number: 'fast'"),
        (["--policy", PLATEAU, "--base-lr", "0"], "positive number"),
        (["--base-lr", "0.1"], "--policy"),
    ],
)
def test_bad_command_line_is_one_line_exit_2(lrpilot_exe, args, message):
    done = simulate(lrpilot_exe, *args)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert message in done.stderr


def test_onecycle_past_total_steps_names_the_line(lrpilot_exe):
    spec = json.dumps({"kind": "onecycle", "max_lr": 0.1, "total_steps": 4})
    done = simulate(lrpilot_exe, "--policy", spec, "--base-lr", "0.1", stdin=records(*[{}] * 6))
    assert done.returncode == 1
    assert "line 5: onecycle: step 5 is past total_steps=4" in done.stderr
    assert len(done.stdout.splitlines()) == 4


def test_help_explains_the_formats(lrpilot_exe):
    done = subprocess.run([lrpilot_exe, "simulate", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    for words in ("--policy", "--base-lr", "--input", '"metrics"', "momenta"):
        assert words in done.stdout


def test_closed_pipe_is_not_a_traceback(lrpilot_exe):
    stream = records(*[{}] * 50_000)
    cmd = (
        f'{lrpilot_exe} simulate --policy \'{{"kind": "exponential", "gamma": 0.99}}\' '
        "--base-lr 0.1 | head -n 1"
    )
    done = subprocess.run(cmd, shell=True, input=stream, capture_output=True, text=True)
    assert done.stdout.count("\n") == 1
    assert "Traceback" not in done.stderr


def test_a_nan_or_infinite_metric_is_data_as_torch_takes_it(lrpilot_exe):
    """A diverged loss is not a bad line: plateau counts NaN and inf as no
    improvement (torch's ReduceLROnPlateau does), so patience 0 cuts."""
    stream = records({"val_loss": 1.0}) + '{"step": 2, "metrics": {"val_loss": NaN}}\n'
    stream += '{"step": 3, "metrics": {"val_loss": Infinity}}\n'
    done = simulate(lrpilot_exe, "--policy", PATIENT_0, "--base-lr", "0.1", stdin=stream)
    assert done.returncode == 0, done.stderr
    lrs = [json.loads(line)["lrs"][0] for line in done.stdout.splitlines()]
    assert lrs == [0.1, 0.05, 0.025]
