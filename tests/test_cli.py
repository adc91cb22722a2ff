"""The ``kronfac`` command line: ``demo`` (optim, laplace, influence) and ``factors`` end to end,
argument errors, extras; the demo's calibration error and label flips by hand."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

import kronfac
from kronfac import cli, demo

needs_sklearn = pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None, reason="the digits need scikit-learn"
)

LINEAR_NAMES = [n for n, m in cli.build_mlp().named_modules() if isinstance(m, nn.Linear)]


def _table_rows(out: str) -> dict[str, list[str]]:
    """Rows of the printed factor table keyed by module name."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("module"))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.strip() or line.startswith("cond = inf"):
            break
        cells = line.split()
        rows[cells[0]] = cells
    return rows


@needs_sklearn
def test_factors_prints_a_row_per_linear_layer(capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    assert cli.main(["factors", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert LINEAR_NAMES == ["fc1", "fc2", "fc3"]
    assert "test accuracy" in out
    rows = _table_rows(out)
    assert list(rows) == LINEAR_NAMES
    # Joint bias: A is (d_in + 1)², S is d_out².
    assert rows["fc1"][1:3] == ["65x65", "128x128"]
    assert rows["fc2"][1:3] == ["129x129", "64x64"]
    assert rows["fc3"][1:3] == ["65x65", "10x10"]
    for cells in rows.values():
        assert len(cells) == 8
        for cell in cells[3:]:
            assert cell == "inf" or float(cell) >= 0
    assert "compute_factors:" in out and "forward+backward" in out
    assert torch.get_num_threads() == threads  # the demo restores the thread count


@needs_sklearn
def test_factors_save_writes_loadable_factors(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "f.safetensors"
    argv = ["factors", "--epochs", "1", "--fisher", "forward-only", "--threads", "1"]
    argv += ["--save", str(path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert str(path) in out
    factors = kronfac.KroneckerFactors.load(path)
    assert len(factors) == 3
    assert list(factors) == LINEAR_NAMES
    assert factors.options["fisher"] == "forward-only"
    assert factors.num_data == 1437
    torch.testing.assert_close(factors["fc3"].S, torch.eye(10))


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["factors", "--fisher", "bogus"],
        ["factors", "--epochs", "-1"],
        ["factors", "--epochs", "two"],
        ["factors", "--threads", "0"],
        ["demo", "--threads", "0"],
        ["demo", "--steps", "0"],
        ["demo", "--plot", "/no/such/folder/plot.png"],
        ["demo", "bogus"],
        ["demo", "laplace", "--steps", "3"],
        ["demo", "--epochs", "2"],
        ["demo", "optim", "--split", "100,30,30"],
        ["demo", "laplace", "--epochs", "-1"],
        ["demo", "laplace", "--split", "100,30"],
        ["demo", "laplace", "--split", "100,0,30"],
        ["demo", "laplace", "--split", "1000,500,400"],
        ["demo", "laplace", "--plot", "/no/such/folder/plot.png"],
        ["demo", "influence", "--split", "100,30,30"],
        ["demo", "influence", "--steps", "3"],
        ["demo", "laplace", "--train", "100"],
        ["demo", "--train", "100"],
        ["demo", "influence", "--train", "9"],
        ["demo", "influence", "--train", "1797"],
        ["demo", "influence", "--train", "many"],
        ["demo", "influence", "--epochs", "-1"],
        ["demo", "influence", "--plot", "/no/such/folder/plot.png"],
        ["factors", "--save", "/no/such/folder/f.safetensors"],
    ],
)
def test_bad_arguments_exit_with_status_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["demo", "--steps", "1"], ["factors", "--epochs", "1"]])
def test_without_sklearn_exits_with_status_2(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A None entry in sys.modules makes `import` raise ImportError, even for cached modules.
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert f"kronfac {argv[0]} needs scikit-learn: pip install 'kronfac[demo]'" in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""


def _method_rows(out: str, task: str) -> dict[str, list[str]]:
    """Rows of the demo's table for ``task``, keyed by method."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{task}:"))
    rows = {}
    for line in lines[start + 3 :]:
        if not line.strip():
            break
        rows[line.split()[0]] = line.split()
    return rows


@needs_sklearn
def test_demo_races_kfac_and_muon_to_adams_loss(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    threads = torch.get_num_threads()
    plot = tmp_path / "demo.png"
    assert cli.main(["demo", "--steps", "4", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    for task in ("autoencoder", "mlp"):
        rows = _method_rows(out, task)
        assert list(rows) == ["adam", "muon", "kfac"]
        # Adam defines the target: it reaches it at its last step, in 1.00x its own time
        assert rows["adam"][2] == "4"
        assert rows["adam"][4] == "1.00" and rows["adam"][5] == "1.00"
        for cells in rows.values():
            ms, ratio, ops, final = map(float, (cells[3], cells[4], cells[6], cells[7]))
            assert ms > 0 and ratio > 0 and ops >= 1 and final > 0
        # a K-FAC step dispatches more aten ops than Adam's
        assert float(rows["kfac"][6]) > float(rows["adam"][6])
    assert len(_method_rows(out, "mlp")["kfac"]) == 9  # with a test accuracy
    assert len(_method_rows(out, "autoencoder")["kfac"]) == 8  # without
    if importlib.util.find_spec("matplotlib") is not None:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plot: {plot}" in out
    else:
        assert not plot.exists() and "matplotlib not installed" in out
    assert torch.get_num_threads() == threads


@needs_sklearn
def test_demo_no_plot_writes_nothing(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--steps", "1", "--no-plot"]) == 0
    assert list(tmp_path.iterdir()) == []
    assert "plot:" not in capsys.readouterr().out


def test_demo_laplace_without_sklearn_exits_with_status_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert cli.main(["demo", "laplace", "--epochs", "1"]) == 2
    captured = capsys.readouterr()
    assert "kronfac demo laplace needs scikit-learn: pip install 'kronfac[demo]'" in captured.err
    assert captured.out == ""


@needs_sklearn
@pytest.mark.filterwarnings("ignore:The grid search chose")  # 2 epochs: the MAP's predictive wins
def test_demo_laplace_prints_its_table_and_plot(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # the plot's default path
    threads = torch.get_num_threads()
    assert cli.main(["demo", "laplace", "--epochs", "2", "--split", "100,30,40"]) == 0
    out = capsys.readouterr().out
    assert "digits 100 train / 30 val / 40 test (seed 0)" in out
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("method"))
    assert lines[start].split("  ")[0] == "method" and "ECE" in lines[start]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        name, cells = line[: line.index("  ")], line[line.index("  ") :].split()
        rows[name] = cells
    assert list(rows) == ["MAP", *demo.DEMO_LAPLACE_VARIANTS]
    for name, (prior, acc, nll, ece, ratio, seconds) in rows.items():
        assert 0 <= float(acc) <= 100 and float(nll) > 0 and 0 <= float(ece) <= 1
        assert float(ratio) >= 0
        if name == "MAP":
            assert (prior, seconds) == ("-", "-")
        else:
            assert float(prior) > 0 and float(seconds) > 0
    assert rows["MAP"][4] == "1.00"
    plot = tmp_path / "kronfac_laplace.png"
    if importlib.util.find_spec("matplotlib") is not None:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "plot: kronfac_laplace.png" in out
    else:
        assert not plot.exists() and "matplotlib not installed" in out
    assert torch.get_num_threads() == threads


def test_demo_influence_without_sklearn_exits_with_status_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert cli.main(["demo", "influence", "--epochs", "1"]) == 2
    captured = capsys.readouterr()
    assert "kronfac demo influence needs scikit-learn: pip install 'kronfac[demo]'" in captured.err
    assert captured.out == ""


@needs_sklearn
def test_demo_influence_prints_its_table_and_plot(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # the plot's default path
    threads = torch.get_num_threads()
    assert cli.main(["demo", "influence", "--epochs", "2", "--train", "100"]) == 0
    out = capsys.readouterr().out
    assert "digits 100 train (10 labels flipped) / 1697 test (seed 0)" in out
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("score"))
    assert lines[start].split() == ["score", "AUROC", "precision@k", "seconds"]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        name, cells = line[: line.index("  ")], line[line.index("  ") :].split()
        rows[name] = cells
    assert list(rows) == [*demo.INFLUENCE_CURVATURES, *demo.INFLUENCE_BASELINES]
    for auroc, precision, seconds in rows.values():
        assert 0 <= float(auroc) <= 1 and 0 <= float(precision) <= 1 and float(seconds) >= 0
    queries = [line for line in lines if line.startswith("  test #")]
    assert len(queries) == cli.DEMO_QUERIES
    assert all("most helpful" in q and "most harmful" in q for q in queries)
    plot = tmp_path / "kronfac_influence.png"
    if importlib.util.find_spec("matplotlib") is not None:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "plot: kronfac_influence.png" in out
    else:
        assert not plot.exists() and "matplotlib not installed" in out
    assert torch.get_num_threads() == threads


@needs_sklearn
def test_mislabeled_digits_flip_the_share_asked_to_other_classes() -> None:
    data = demo.mislabeled_digits(3, train=200, noise=0.25)
    X, noisy = data.train
    assert X.shape == (200, 64) and len(data.test[1]) == 1797 - 200
    assert int(data.flipped.sum()) == 50
    assert bool((noisy[data.flipped] != data.labels[data.flipped]).all())
    assert bool((noisy[~data.flipped] == data.labels[~data.flipped]).all())
    again = demo.mislabeled_digits(3, train=200, noise=0.25)
    assert torch.equal(again.train[1], noisy) and torch.equal(again.flipped, data.flipped)
    # a perfect score: the flipped labels first
    found = demo.Detection.of("x", 3, data.flipped.double(), data.flipped, 0.0)
    assert found.auroc == 1.0 and found.precision == 1.0


def test_expected_calibration_error_by_hand() -> None:
    probs = torch.tensor(
        [
            [0.95, 0.03, 0.02],  # confidence 0.95, correct: bin 14 of 15, (14/15, 1]
            [0.01, 0.02, 0.97],  # 0.97, wrong: bin 14
            [0.50, 0.30, 0.20],  # 0.50, correct: bin 7, (7/15, 8/15]
            [0.20, 0.70, 0.10],  # 0.70, wrong: bin 10, (10/15, 11/15]
            [0.30, 0.28, 0.42],  # 0.42, correct: bin 6, (6/15, 7/15]
        ]
    )
    labels = torch.tensor([0, 1, 0, 2, 2])
    # Σ_b |B_b|/n · |acc_b − conf_b| = 2/5 · |0.5 − 0.96| + 1/5 · (0.5 + 0.7 + 0.58) = 0.54
    assert demo.expected_calibration_error(probs, labels) == pytest.approx(0.54, abs=1e-7)
    # one bin: |accuracy − mean confidence| = |3/5 − 3.54/5|
    assert demo.expected_calibration_error(probs, labels, bins=1) == pytest.approx(0.108, abs=1e-7)
    metrics = demo.calibration(probs, labels)
    assert metrics.accuracy == pytest.approx(0.6)
    nll = -sum(math.log(p) for p in (0.95, 0.02, 0.5, 0.1, 0.42)) / 5
    assert metrics.nll == pytest.approx(nll, rel=1e-6)
    assert metrics.ece == pytest.approx(0.54, abs=1e-7)
    # a confidence on a bin's upper edge belongs to that bin: (0, 1/2] and (1/2, 1]
    edge = torch.tensor([[0.5, 0.3, 0.2], [0.75, 0.25, 0.0]])
    assert demo.expected_calibration_error(edge, torch.tensor([0, 0]), bins=2) == pytest.approx(
        (0.5 + 0.25) / 2
    )
    with pytest.raises(ValueError, match="labels"):
        demo.expected_calibration_error(probs, labels[:3])
    with pytest.raises(ValueError, match="bins"):
        demo.expected_calibration_error(probs, labels, bins=0)


def test_condition_number_is_inf_for_singular_factors() -> None:
    assert cli._condition_number(torch.tensor([0.0, 1.0, 4.0], dtype=torch.float64)) == float("inf")
    assert cli._condition_number(torch.tensor([-1e-12, 1.0], dtype=torch.float64)) == float("inf")
    assert cli._condition_number(torch.tensor([0.5, 2.0], dtype=torch.float64)) == 4.0


def test_library_imports_leave_out_the_demo() -> None:
    """The demo code (and scikit-learn, matplotlib) stays out of the library's imports."""
    code = (
        "import sys, kronfac, kronfac.optim, kronfac.compat\n"
        "print(sorted(m for m in ('kronfac.cli', 'kronfac.demo', 'sklearn', 'matplotlib')"
        " if m in sys.modules))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"
    assert importlib.util.find_spec("kronfac.optim.compare") is None
