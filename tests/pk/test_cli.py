"""The ``genprog`` command line (:mod:`genprog.pk.cli`): the bundled example without a
data file, the short structure names, clear one-line errors for bad files, and a short
NUTS run writing InferenceData (slow). The ML run and the option errors are tested in
``test_diagnostics.py``."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import genprog as gp
from genprog import pk
from genprog.pk.cli import main


def _is_png(path):
    return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fit_without_data_runs_the_bundled_example(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(["fit", "--structure", "1cmt-oral", "--iiv", "cl,v", "--error", "additive",
               "--n-sim", "20", "--npde-sim", "50", "--individual", "4"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "bundled example theo_sd" in captured.err and "Traceback" not in captured.err
    out = tmp_path / "genprog-fit"
    for name in ("gof.png", "vpc.png", "npde.png", "individual.png"):
        assert _is_png(out / name), name
    summary = pd.read_csv(out / "summary.csv", index_col="parameter")
    assert {"ka", "cl", "v", "omega_cl", "omega_v", "sigma_add"} <= set(summary.index)
    assert "OFV" in captured.out and "NPDE: mean" in captured.out
    assert "sigma_add" in captured.out  # the table is printed too
    res = pd.read_csv(out / "residuals.csv")
    assert len(res) == 132 and np.isfinite(res.NPDE).all()
    assert not (out / "posterior.nc").exists()


@pytest.mark.parametrize("spec, absorption, n", [
    ("1cmt-oral", "first_order", 1), ("2cmt-iv", "iv", 2), ("3CMT-infusion", "iv", 3),
    ("1cmt-zero-order", "zero_order", 1), ("two", "first_order", 2),
], ids=lambda x: str(x))
def test_structure_names(spec, absorption, n, monkeypatch):
    from genprog.pk import cli

    seen = {}
    monkeypatch.setattr(cli, "_run_fit", lambda args, model, *rest: seen.setdefault("m", model) and 0)
    assert main(["fit", pk.dataset_path("theo_sd"), "--structure", spec, "--iiv", "cl",
                 "--out", "unused-out"]) == 0
    s = seen["m"].structure
    assert (s.n, s.absorption) == (n, absorption)


def test_bad_input_is_one_line(tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    binary = tmp_path / "binary.csv"
    binary.write_bytes(bytes(range(256)) * 4)
    no_id = tmp_path / "no_id.csv"
    no_id.write_text("TIME,DV\n0,1\n1,2\n")
    cases = [(empty, None), (binary, None), (no_id, "ID"), (tmp_path, None),
             (tmp_path / "absent.csv", "absent.csv")]
    for path, word in cases:
        assert main(["fit", str(path), "--out", str(tmp_path / "o")]) == 2, path
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err
        if word:
            assert word in err
    for argv, word in ((["--structure", "4cmt-oral"], "NCMT-ROUTE"),
                       (["--structure", "1cmt-iv", "--absorption", "first_order"], "contradicts")):
        assert main(["fit", pk.dataset_path("theo_sd"), *argv, "--out", str(tmp_path / "o")]) == 2
        assert word in capsys.readouterr().err


@pytest.mark.slow
def test_fit_nuts_writes_inference_data(tmp_path, capsys):
    out = tmp_path / "nuts"
    rc = main(["fit", "--structure", "1cmt-oral", "--iiv", "ka,cl,v", "--error", "additive",
               "--method", "nuts", "--chains", "1", "--warmup", "30", "--draws", "20",
               "--n-sim", "20", "--npde-sim", "50", "--individual", "4", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    for name in ("gof.png", "vpc.png", "npde.png", "individual.png"):
        assert _is_png(out / name), name
    loaded = gp.load(out / "posterior.nc")
    assert loaded.draws["cl"].shape == (1, 20)
    assert "mean" in pd.read_csv(out / "summary.csv", index_col="parameter").columns


def test_flip_flop_subjects_get_one_warning_line_each(tmp_path, capsys, monkeypatch):
    """A fit whose ``info["flip_flop_subjects"]`` names two subjects (the FOCE-I fit of
    theo_sd, with two IDs put into its info): the printout has one warning line for each,
    with its ka_i and k_i = CL_i/V_i from the written individual parameters, and none for
    the other subjects."""
    from genprog.pk import cli

    fit_once = cli._fit
    flagged = {}

    def fit_with_flags(args, model, data, err):
        fit = fit_once(args, model, data, err)
        assert fit.info["flip_flop_subjects"] == []   # theo_sd's EBEs are all in the ka > k mode
        flagged["ids"] = [data.ids[2], data.ids[7]]
        fit.info["flip_flop_subjects"] = list(flagged["ids"])
        return fit

    monkeypatch.setattr(cli, "_fit", fit_with_flags)
    out = tmp_path / "flagged"
    rc = main(["fit", pk.dataset_path("theo_sd"), "--structure", "1cmt-oral", "--iiv", "ka,cl,v",
               "--error", "additive", "--n-sim", "20", "--npde-sim", "50", "--individual", "2",
               "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    lines = [line for line in captured.out.splitlines() if "flip-flop" in line]
    assert len(lines) == 2, captured.out
    individual = pd.read_csv(out / "individual.csv", index_col=0)
    for subject, line in zip(flagged["ids"], lines):
        assert line.startswith(f"warning: subject {subject}: ")
        row = individual.loc[int(subject)]
        assert f"ka_i {row['ka']:.4g}" in line and f"k_i = CL_i/V_i {row['cl'] / row['v']:.4g}" in line


def test_flip_flop_lines_without_flags_or_rates():
    class Stub:
        info = {"flip_flop_subjects": ["A7"]}

    assert cli_lines(Stub()) == [("warning: subject A7: EBE in the flip-flop mode, the mirror image of the "
                                  "population's ka > k; its ka and V may be swapped: check its absorption "
                                  "data, or refit with ka_above_k=True")]
    Stub.info = {"flip_flop_subjects": []}
    assert cli_lines(Stub()) == []
    Stub.info = {}
    assert cli_lines(Stub()) == []


def cli_lines(fit):
    from genprog.pk.cli import flip_flop_lines

    return flip_flop_lines(fit)
